"""Centered int8: each matrix product at the weights becomes the anchor's product plus int8 corrections.

Before::

    addmm = torch.ops.aten.addmm.default(w_bias, batch_0, t)
    ...
    addmm_1 = torch.ops.aten.addmm.default(anchor_bias, batch_0, t_4)

After::

    quantize_batch_1 = halp_fx_centered_int8_quantize_rows(batch_0)
    int8_term_1 = halp_fx_centered_int8_int8_term(q_batch_1, s_batch_1, t_offset_weight, scale_weight)
    offset_value = halp_fx_centered_int8_offset_value(offset_bias, scale_bias)
    addmm_difference = torch.ops.aten.add.Tensor(int8_term_1, offset_value)
    addmm_1 = torch.ops.aten.addmm.default(anchor_bias, batch_0, t_4)
    addmm_int8 = torch.ops.aten.add.Tensor(addmm_1, addmm_difference)

``f(a, b) = f(a_A, b_A) + f(a - a_A, b_A) + f(a, b - b_A)``
(:mod:`halp_fx.centered_int8`): the anchor pass's product (its twin, which
``svrg_correction`` recorded) plus the difference ``f(W) - f(A)`` as int8
products. A weight's own difference ``W - A`` is ``d * Z``: its integer offset
and scale enter as they are, viewed as the product needs them (``t_offset_weight``
above), never quantized; an activation's difference (``relu - relu_2``, the
same value at W and at the anchor) is quantized per row, and the anchor operand
it multiplies per column (``quantize_columns``). Forward and backward products alike (``mm``,
``addmm``); a product whose operands are the same in both passes keeps none.
A product falls back to float32, and ``explain()`` says why, where int8 does
not pay on the device (or the shape does not fit the int8 kernel).
Convolutions and batched products stay float32. An int8 term shaped like a weight's
gradient (a short summed dimension, a large output) passes ``via_bf16=True`` on a CPU
with AMX-BF16: its integers go through a bf16 kernel with float32 sums, faster there
and bit for bit the same result (:func:`halp_fx.centered_int8.bf16_kernel_pays`).
"""
import operator

import torch
from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import centered_int8
from halp_fx.roles import Role, role_of

from .graph_edit import device_of, finish, find_nodes, insert_call, placeholders, stable_topological_sort
from .pass_base import HalpPass
from .svrg_correction_pass import TWIN

aten = torch.ops.aten
_PRODUCTS = (aten.mm.default, aten.addmm.default)
# Products left float32, with the reason explain() gives. A convolution's int8 correction would cost more than the
# float32 convolution it corrects (two corrections each; benchmarks/int8_convolution.py measures every route).
_FLOAT32_ONLY = {aten.bmm.default: "no int8 batched product here",
                 aten.convolution.default: "int8 does not pay for a convolution (benchmarks/int8_convolution.py)",
                 aten.convolution_backward.default: "int8 does not pay for a convolution "
                                                    "(benchmarks/int8_convolution.py)"}
# Ops through which a weight's difference stays d * (the same op of Z): W - A = d * Z, view(W) - view(A) = d * view(Z).
VIEWS = (aten.t.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.permute.default,
         aten.transpose.int, aten.expand.default, aten.alias.default, aten.clone.default)
# A product's output at W: its twin at the anchor plus the int8 difference, by node name (anchor_difference reads it).
CENTERED = "halp_centered"


def weight_views(at_weights, at_anchor):
    """``(name, views)`` when ``at_weights`` is ``views(W)`` and ``at_anchor`` the same ``views(A)`` of one
    trainable tensor ``name`` (``views`` innermost first), else ``None``."""
    views = []
    while isinstance(at_weights, torch.fx.Node) and isinstance(at_anchor, torch.fx.Node):
        kind, name = role_of(at_weights)
        if kind is Role.WEIGHT:
            return (name, views[::-1]) if role_of(at_anchor) == (Role.ANCHOR, name) else None
        if not (at_weights.op == at_anchor.op == "call_function" and at_weights.target is at_anchor.target
                and at_weights.target in VIEWS and at_weights.args[1:] == at_anchor.args[1:]
                and at_weights.kwargs == at_anchor.kwargs):
            return None
        views.append(at_weights)
        at_weights, at_anchor = at_weights.args[0], at_anchor.args[0]
    return None


class CenteredInt8Pass(HalpPass):
    name = "centered_int8"
    needs = ((Role.CORRECTED_GRAD, "svrg_correction"),)
    guarantees = ((Role.CORRECTED_GRAD, "output"),)

    def __init__(self, bits=8, always=False):
        super().__init__()
        self.bits, self.always = bits, always
        self.rewritten, self.fell_back = [], []  # node names; (node name, why)
        self.exact = 0   # weight differences that entered as d * Z
        self.via_bf16 = []   # int8 terms multiplied by a bf16 kernel (exactly)

    def call(self, gm):
        graph = gm.graph
        device = self.device = device_of(graph)
        by_name = {n.name: n for n in graph.nodes}
        pays, why = centered_int8.products_pay(device)
        self.levels = centered_int8.second_operand_levels(device)
        self.offsets, self.scales = placeholders(graph, Role.OFFSET), placeholders(graph, Role.SCALE)
        for target, reason in _FLOAT32_ONLY.items():
            self.fell_back += [(n.name, f"{target.__name__.split('.')[0]}: {reason}")
                               for n in find_nodes(graph, "call_function", target) if TWIN in n.meta]
        for node in [n for target in _PRODUCTS for n in find_nodes(graph, "call_function", target) if TWIN in n.meta]:
            reason = self._why_float32(node, device, pays, why)
            if reason:
                self.fell_back.append((node.name, reason))
                continue
            twin = by_name[node.meta[TWIN]]
            centered = self._centered(graph, node, twin)
            node.replace_all_uses_with(centered)
            graph.erase_node(node)
            self.rewritten.append(centered.name)
        stable_topological_sort(graph)
        return PassResult(finish(gm), bool(self.rewritten))

    def _centered(self, graph, node, twin):
        """``twin + f(W) - f(A)``, the difference as int8 terms inserted before ``node``."""
        *bias, a, b = node.args
        *bias_anchor, a_anchor, b_anchor = twin.args
        (m, k), n = a.meta["val"].shape, b.meta["val"].shape[1]
        via_bf16 = centered_int8.bf16_kernel_pays(m, k, n, self.device, self.always)
        terms = []
        if a is not a_anchor:   # f(a - a_A, b_A)
            qa, sa, _ = self._difference(graph, a, a_anchor, node, rows=True)
            qb, sb = self._quantized(graph, b_anchor, node, rows=False)
            terms.append(self._term(graph, [qa, sa, qb, sb], False, via_bf16, node))
        if b is not b_anchor:   # f(a, b - b_A)
            qa, sa = self._quantized(graph, a, node, rows=True)
            qb, sb, wide = self._difference(graph, b, b_anchor, node, rows=False)
            terms.append(self._term(graph, [qa, sa, qb, sb], wide, via_bf16, node))
        if bias and bias[0] is not bias_anchor[0]:
            terms.append(self._bias_difference(graph, bias[0], bias_anchor[0], node))
        difference = terms[0]
        for i, term in enumerate(terms[1:], 1):
            last = i == len(terms) - 1
            difference = insert_call(graph, aten.add.Tensor, [difference, term], {}, node,
                                     f"{node.name}_difference" if last else "add")
        out = insert_call(graph, aten.add.Tensor, [twin, difference], {}, node, f"{node.name}_int8")
        out.meta[CENTERED] = (twin.name, difference.name)
        return out

    def _term(self, graph, args, wide, via_bf16, before):
        kwargs = {"via_bf16": True} if via_bf16 else {"wide_second": True} if wide else {}
        term = insert_call(graph, centered_int8.int8_term, args, kwargs, before, "int8_term")
        if via_bf16:
            self.via_bf16.append(term.name)
        return term

    def _difference(self, graph, at_weights, at_anchor, before, rows):
        """``(q, scale, wide)`` of ``at_weights - at_anchor``: a weight's ``views(Z)`` and ``d`` as they are
        (``wide``: its offsets use all 8 bits where the int8 kernel is exact within 7), else the quantized
        float difference."""
        weight = weight_views(at_weights, at_anchor)
        if weight is not None and self.offsets[weight[0]].meta["val"].dtype == torch.int8:
            name, views = weight
            value = self.offsets[name]
            for view in views:
                value = insert_call(graph, view.target, [value, *view.args[1:]], dict(view.kwargs), before,
                                    f"{view.target.__name__.split('.')[0]}_{value.name}")
            self.exact += 1
            wide = not rows and self.levels < centered_int8.FULL_RANGE and self.bits > 7
            return value, self.scales[name], wide
        difference = insert_call(graph, aten.sub.Tensor, [at_weights, at_anchor], {}, before, "sub")
        return (*self._quantized(graph, difference, before, rows), False)

    def _quantized(self, graph, value, before, rows):
        if rows:
            fn, kwargs = centered_int8.quantize_rows, {}
        else:
            fn, kwargs = centered_int8.quantize_columns, {"levels": self.levels}
        pair = insert_call(graph, fn, [value], kwargs, before, f"quantize_{value.name}")
        return (insert_call(graph, operator.getitem, [pair, 0], {}, before, f"q_{value.name}"),
                insert_call(graph, operator.getitem, [pair, 1], {}, before, f"s_{value.name}"))

    def _bias_difference(self, graph, bias, bias_anchor, before):
        weight = weight_views(bias, bias_anchor)
        if weight is not None and not weight[1]:
            name = weight[0]
            return insert_call(graph, centered_int8.offset_value, [self.offsets[name], self.scales[name]], {}, before,
                               "offset_value")
        return insert_call(graph, aten.sub.Tensor, [bias, bias_anchor], {}, before, "sub")

    def _why_float32(self, node, device, pays, why):
        if node.kwargs:
            return "addmm with beta/alpha"
        if not (pays or self.always):
            return why
        if device.type == "cuda":
            m, k = node.args[-2].meta["val"].shape
            n = node.args[-1].meta["val"].shape[1]
            if m <= 16 or k % 8 or n % 8:
                return f"CUDA int8 products need more than 16 rows and sizes divisible by 8; got {m}x{k}x{n}"
        return ""

    def summary(self):
        line = (f"{len(self.rewritten)} matrix products at W became the anchor's product plus int8 corrections of "
                f"the differences ({self.exact} weight differences as d * Z); {len(self.fell_back)} stayed float32")
        details = [f"\n       int8: {', '.join(self.rewritten)}"] if self.rewritten else []
        if self.via_bf16:
            details.append(f"\n       through a bf16 kernel with float32 sums (exact; faster than int8 for "
                           f"a weight's gradient with AMX-BF16; HALP_FX_BF16_KERNEL=off keeps int8): "
                           f"{', '.join(self.via_bf16)}")
        if self.always and self.rewritten:
            details.append("\n       forced where int8 may not pay (HALP_FX_INT8_PRODUCTS=always)")
        reasons = {}
        for name, why in self.fell_back:
            reasons.setdefault(why, []).append(name)
        details += [f"\n       float32 ({why}): {', '.join(names)}" for why, names in reasons.items()]
        return line + "".join(details)
