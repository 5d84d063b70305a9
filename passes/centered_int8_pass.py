"""Centered int8: each matrix product at the weights becomes the anchor's product plus int8 corrections.

Before::

    addmm = torch.ops.aten.addmm.default(w_bias, batch_0, t)
    ...
    addmm_1 = torch.ops.aten.addmm.default(anchor_bias, batch_0, t_4)

After::

    addmm_1 = torch.ops.aten.addmm.default(anchor_bias, batch_0, t_4)
    addmm_int8 = halp_fx_centered_int8_centered_addmm(addmm_1, w_bias, anchor_bias, batch_0, None, t, t_4, second_levels = 63)

``f(a, b) = f(a_A, b_A) + f(a - a_A, b_A) + f(a, b - b_A)``
(:mod:`halp_fx.centered_int8`): the anchor pass's float32 product (its twin,
which ``svrg_correction`` recorded) plus two int8 products of differences,
which vanish at a recenter. Forward and backward products alike (``mm``,
``addmm``); a product whose operands are the same in both passes keeps none.
A product falls back to float32, and ``explain()`` says why, where int8 does
not pay on the device (or the shape does not fit the int8 kernel).
Convolutions and batched products stay float32.
"""
import torch
from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import centered_int8
from halp_fx.roles import Role

from .graph_edit import device_of, finish, find_nodes, insert_call, stable_topological_sort
from .pass_base import HalpPass
from .svrg_correction_pass import TWIN
_PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
_FLOAT32_ONLY = (torch.ops.aten.bmm.default, torch.ops.aten.convolution.default,
                 torch.ops.aten.convolution_backward.default)


class CenteredInt8Pass(HalpPass):
    name = "centered_int8"
    needs = ((Role.CORRECTED_GRAD, "svrg_correction"),)

    def __init__(self, always=False):
        super().__init__()
        self.always = always
        self.rewritten, self.fell_back = [], []  # node names; (node name, why)

    def call(self, gm):
        graph = gm.graph
        device = device_of(graph)
        by_name = {n.name: n for n in graph.nodes}
        pays, why = centered_int8.products_pay(device)
        levels = centered_int8.second_operand_levels(device)
        for target in _FLOAT32_ONLY:
            self.fell_back += [(n.name, f"{target.__name__.split('.')[0]}: no int8 kernel here")
                               for n in find_nodes(graph, "call_function", target) if TWIN in n.meta]
        for node in [n for target in _PRODUCTS for n in find_nodes(graph, "call_function", target) if TWIN in n.meta]:
            reason = self._why_float32(node, device, pays, why)
            if reason:
                self.fell_back.append((node.name, reason))
                continue
            twin = by_name[node.meta[TWIN]]
            operands = []
            for mine, theirs in zip(node.args, twin.args):
                operands += [mine, theirs if theirs is not mine else None]
            fn = centered_int8.centered_mm if node.target is torch.ops.aten.mm.default else centered_int8.centered_addmm
            centered = insert_call(graph, fn, [twin, *operands], {"second_levels": levels}, node, f"{node.name}_int8")
            node.replace_all_uses_with(centered)
            graph.erase_node(node)
            self.rewritten.append(centered.name)
        stable_topological_sort(graph)
        return PassResult(finish(gm), bool(self.rewritten))

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
                f"the differences; {len(self.fell_back)} stayed float32")
        details = [f"\n       int8: {', '.join(self.rewritten)}"] if self.rewritten else []
        reasons = {}
        for name, why in self.fell_back:
            reasons.setdefault(why, []).append(name)
        details += [f"\n       float32 ({why}): {', '.join(names)}" for why, names in reasons.items()]
        return line + "".join(details)
