"""Anchor difference: a gradient at W that centered products give as ``g(A) + difference`` is corrected by the
difference alone, and the anchor's own product for it goes dead.

Before::

    mm_1_int8 = torch.ops.aten.add.Tensor(mm_6, mm_1_difference)
    t_5 = torch.ops.aten.t.default(mm_1_int8)
    t_19 = torch.ops.aten.t.default(mm_6)
    corrected_grad_weight = halp_fx_bit_centering_svrg_corrected(t_5, t_19, full_grad_weight)

After::

    t_mm_1_difference = torch.ops.aten.t.default(mm_1_difference)
    corrected_grad_weight = halp_fx_bit_centering_corrected_by_difference(t_mm_1_difference, full_grad_weight)

HALP needs ``u = g(W) - g(A) + G``. Where ``g(W)`` is ``views(g(A) + difference)``
(a weight's gradient from a centered product, summed over its uses), ``g(W) -
g(A)`` is ``views(difference)``: no two large numbers are subtracted, and the
anchor's weight-gradient product (``mm_6``), needed by nothing else, is removed.
A gradient that does not reduce so (a bias's sum through a ReLU mask) keeps
``svrg_corrected``. Right after a recenter every difference is exactly zero and
``u = G``, as in float32.
"""
import torch
from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import bit_centering
from halp_fx.roles import Role

from .centered_int8_pass import CENTERED, VIEWS
from .graph_edit import finish, find_nodes, insert_call
from .pass_base import HalpPass

_ADD = torch.ops.aten.add.Tensor
_SAME = "same"   # the node at W is the node at the anchor: its difference is zero


class AnchorDifferencePass(HalpPass):
    name = "anchor_difference"
    needs = ((Role.CORRECTED_GRAD, "svrg_correction"),)
    guarantees = ((Role.CORRECTED_GRAD, "output"),)

    def __init__(self):
        super().__init__()
        self.rewritten = []

    def call(self, gm):
        graph = gm.graph
        self.by_name = {n.name: n for n in graph.nodes}
        products = _product_count(graph)
        for node in list(find_nodes(graph, "call_function", bit_centering.svrg_corrected)):
            grad, anchor_grad, full_grad = node.args
            difference = self._difference(graph, grad, anchor_grad, node)
            if difference is None or difference is _SAME:
                continue
            node.target, node.args = bit_centering.corrected_by_difference, (difference, full_grad)
            self.rewritten.append(node.name)
        finish(gm)
        self.removed = products - _product_count(graph)
        return PassResult(gm, bool(self.rewritten))

    def _difference(self, graph, at_weights, at_anchor, before):
        """``at_weights - at_anchor`` as a node built from centered differences, ``_SAME``, or ``None``."""
        if at_weights is at_anchor:
            return _SAME
        if not (isinstance(at_weights, torch.fx.Node) and isinstance(at_anchor, torch.fx.Node)):
            return None
        centered = at_weights.meta.get(CENTERED)
        if centered is not None:
            return self.by_name[centered[1]] if centered[0] == at_anchor.name else None
        if at_weights.op != "call_function" or at_weights.target is not at_anchor.target:
            return None
        if at_weights.target in VIEWS and at_weights.args[1:] == at_anchor.args[1:] and \
                at_weights.kwargs == at_anchor.kwargs:
            inner = self._difference(graph, at_weights.args[0], at_anchor.args[0], before)
            if inner is None or inner is _SAME:
                return inner
            return insert_call(graph, at_weights.target, [inner, *at_weights.args[1:]], dict(at_weights.kwargs),
                               before, f"{at_weights.target.__name__.split('.')[0]}_{inner.name}")
        if at_weights.target is _ADD and not at_weights.kwargs and not at_anchor.kwargs:
            parts = [self._difference(graph, w, a, before) for w, a in zip(at_weights.args, at_anchor.args)]
            if any(p is None for p in parts):
                return None
            parts = [p for p in parts if p is not _SAME]
            if not parts:
                return _SAME
            if len(parts) == 1:
                return parts[0]
            return insert_call(graph, _ADD, parts, {}, before, "add")
        return None

    def summary(self):
        return (f"{len(self.rewritten)} corrected gradients became full_grad + the centered difference; "
                f"{self.removed} anchor products they no longer need were removed")


def _product_count(graph):
    return sum(len(find_nodes(graph, "call_function", t))
               for t in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
                         torch.ops.aten.convolution_backward.default))
