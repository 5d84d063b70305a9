"""The matrix work of a step by precision: multiply-adds of every product, at the anchor and at W apart.

Products are ``mm``, ``addmm``, ``bmm``, convolutions (forward and backward), fused attention and the int8
and bf16 products the low-precision passes put in their place.

Counted from a graph's shapes alone, so it shows on any machine which products
a rewrite removed and what share of the work runs in low precision.
"""
import math
from collections import Counter

import torch

from . import bf16_anchor, centered_int8

aten = torch.ops.aten
ANCHOR_PASS = "halp_anchor_pass"  # node meta: the node belongs to the gradient pass at the anchor


def _shape(node):
    return tuple(node.meta["val"].shape)


def _dtype(node):
    return {torch.float32: "float32", torch.bfloat16: "bf16", torch.int8: "int8"}.get(node.meta["val"].dtype,
                                                                                      str(node.meta["val"].dtype))


def _attention(node):
    """``(precision, multiply-adds)`` of a fused attention node: the forward's two products (Q K^T, P V), the
    backward's five (P recomputed, dV, dP, dQ, dK), each B*H*L*S*E; ``None`` for any other node."""
    name = getattr(node.target, "__name__", "")
    if "scaled_dot_product" not in name:
        return None
    backward = "backward" in name
    q, k = (node.args[1], node.args[2]) if backward else (node.args[0], node.args[1])
    *batch, length, depth = _shape(q)
    return _dtype(q), (5 if backward else 2) * math.prod(batch) * length * _shape(k)[-2] * depth


def _product(node):
    """``(precision, multiply-adds)`` of a product node, or ``None``."""
    target, args = node.target, node.args
    if target in (aten.mm.default, bf16_anchor.mm) or target is centered_int8.int8_term:
        a, b = (args[0], args[2]) if target is centered_int8.int8_term else args
        (m, k), n = _shape(a), _shape(b)[1]
        return _dtype(a), m * k * n
    if target in (aten.addmm.default, bf16_anchor.addmm):
        (m, k), n = _shape(args[1]), _shape(args[2])[1]
        return _dtype(args[1]), m * k * n
    if target is aten.bmm.default:
        (batch, m, k), n = _shape(args[0]), _shape(args[1])[2]
        return _dtype(args[0]), batch * m * k * n
    if target is aten.convolution.default:
        weight = _shape(args[1])
        return _dtype(args[0]), math.prod(node.meta["val"].shape) * math.prod(weight[1:])
    if target is aten.convolution_backward.default:
        grad, weight, mask = args[0], _shape(args[2]), args[-1]
        per = math.prod(_shape(grad)) * math.prod(weight[1:])
        return _dtype(grad), per * (int(mask[0]) + int(mask[1]))
    return _attention(node)


def matrix_work(gm):
    """``{(pass, precision): multiply-adds}`` of one call of ``gm``: ``pass`` is ``"anchor"`` or ``"W"``."""
    work = Counter()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        product = _product(node)
        if product is not None:
            work[("anchor" if node.meta.get(ANCHOR_PASS) else "W", product[0])] += product[1]
    return dict(work)


def _amount(n):
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g}"


def describe(work):
    """One line: ``anchor: 0.55 G float32 + ...; W: ... multiply-adds per step (... in all, x% low precision)``."""
    if not work:
        return "no matrix products"
    parts = []
    for where in ("anchor", "W"):
        mine = {p: n for (w, p), n in sorted(work.items()) if w == where}
        if mine:
            parts.append(f"{where}: " + " + ".join(f"{_amount(n)} {p}" for p, n in mine.items()))
    total = sum(work.values())
    low = sum(n for (_, p), n in work.items() if p != "float32")
    return f"{'; '.join(parts)} multiply-adds per step ({_amount(total)} in all, {100 * low / total:.0f}% low precision)"
