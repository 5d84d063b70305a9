"""bf16 anchor: the anchor products that centered products at W are built on take bf16 operands.

Before::

    addmm_4 = torch.ops.aten.addmm.default(anchor_bias, relu_2, t_15)
    addmm_1_int8 = torch.ops.aten.add.Tensor(addmm_4, addmm_1_difference)

After::

    to_bf16_relu_2 = halp_fx_bf16_anchor_to_bf16(relu_2)
    to_bf16_t_15 = halp_fx_bf16_anchor_to_bf16(t_15)
    addmm_4 = halp_fx_bf16_anchor_addmm(anchor_bias, to_bf16_relu_2, to_bf16_t_15)
    addmm_1_int8 = torch.ops.aten.add.Tensor(addmm_4, addmm_1_difference)

Why the error of a bf16 anchor cancels where it matters, and why a product whose
twin at W stayed float32 keeps a float32 anchor: :mod:`halp_fx.bf16_anchor`.
Where bf16 does not pay on the device, nothing changes and ``explain()`` says why.
"""
import torch
from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import bf16_anchor
from halp_fx.roles import Role, role_of

from .centered_int8_pass import CENTERED, VIEWS
from .graph_edit import device_of, finish, insert_call, stable_topological_sort
from .pass_base import HalpPass

_BF16 = {torch.ops.aten.mm.default: bf16_anchor.mm, torch.ops.aten.addmm.default: bf16_anchor.addmm}


class Bf16AnchorPass(HalpPass):
    name = "bf16_anchor"
    needs = ((Role.CORRECTED_GRAD, "svrg_correction"),)
    guarantees = ((Role.CORRECTED_GRAD, "output"),)

    def __init__(self, always=False):
        super().__init__()
        self.always = always
        self.rewritten, self.why = [], ""

    def call(self, gm):
        graph = gm.graph
        pays, self.why = bf16_anchor.products_pay(device_of(graph))
        if not (pays or self.always):
            return PassResult(gm, False)
        by_name = {n.name: n for n in graph.nodes}
        casts = {}
        for node in list(graph.nodes):
            if CENTERED not in node.meta:
                continue
            twin = by_name[node.meta[CENTERED][0]]
            if twin.target not in _BF16 or twin.kwargs:
                continue
            *bias, a, b = twin.args
            for operand in (a, b):
                if operand not in casts:
                    casts[operand] = self._cast(graph, operand, twin, casts)
            twin.target, twin.args = _BF16[twin.target], (*bias, casts[a], casts[b])
            self.rewritten.append(twin.name)
        stable_topological_sort(graph)
        return PassResult(finish(gm), bool(self.rewritten))

    @staticmethod
    def _cast(graph, operand, before, casts):
        """``operand`` in bf16; a view of an anchor as the same view of the anchor's one bf16 copy."""
        views, root = [], operand
        while root.op == "call_function" and root.target in VIEWS:
            views.append(root)
            root = root.args[0]
        if role_of(root)[0] is not Role.ANCHOR:
            views, root = [], operand
        if root not in casts:
            casts[root] = insert_call(graph, bf16_anchor.to_bf16, [root], {}, before, f"to_bf16_{root.name}")
        value = casts[root]
        for view in reversed(views):
            value = insert_call(graph, view.target, [value, *view.args[1:]], dict(view.kwargs), before,
                                f"{view.target.__name__.split('.')[0]}_{value.name}")
        return value

    def summary(self):
        if not self.rewritten:
            return f"no anchor product in bf16: {self.why}" if self.why else "no anchor product under a centered one"
        forced = "; forced where bf16 may not pay (HALP_FX_INT8_PRODUCTS=always)" if self.always else ""
        return (f"{len(self.rewritten)} anchor products under centered products take bf16 operands "
                f"(float32 results): {', '.join(self.rewritten)}{forced}")
