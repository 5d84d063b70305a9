"""Non-finite guard: the step also returns whether everything it would commit is finite.

Before::

    return (view, new_offset_weight, new_offset_bias)

After::

    moved_offset_weight = update_weight[2]
    moved_offset_bias = update_bias[2]
    all_finite = halp_fx_bit_centering_all_finite(view, moved_offset_weight, moved_offset_bias, new_underflow_weight, new_underflow_bias)
    return (view, new_offset_weight, new_offset_bias, new_underflow_weight, new_underflow_bias, all_finite)

It checks the loss, each offset before rounding (finite exactly when the
corrected gradient, weight decay, momentum and ``lr / scale`` are: a NaN there
would be cast to an arbitrary integer), each new floating-point buffer and each
new underflow sum.
The check runs inside the compiled step; the runtime reads one boolean and,
when it is False, keeps the old state instead of the step's outputs.
"""
import operator

from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import bit_centering
from halp_fx.capture import identifier
from halp_fx.roles import Role

from .graph_edit import append_output, finish, insert_call, nodes_with_role, output_node, outputs
from .pass_base import HalpPass


class NonfiniteGuardPass(HalpPass):
    name = "nonfinite_guard"
    needs = ((Role.UPDATE, "offset_update"),)
    guarantees = ((Role.ALL_FINITE, "output"), (Role.OFFSET, "output"))

    def __init__(self):
        super().__init__()
        self.moved = self.buffers = self.underflows = 0

    def call(self, gm):
        graph = gm.graph
        loss = [value for _, value in outputs(graph, Role.LOSS).values()]
        out = output_node(graph)
        moved = [insert_call(graph, operator.getitem, [update, 2], {}, out, f"moved_offset_{identifier(name)}")
                 for name, update in nodes_with_role(graph, Role.UPDATE).items()]
        buffers = [value for _, value in outputs(graph, Role.BUFFER).values()
                   if value.op != "placeholder" and value.meta["val"].dtype.is_floating_point]
        # The underflow sums are finite whenever the moved offsets are; checked anyway (0-d, free) so that no
        # output of the step is committed unchecked.
        underflows = [value for _, value in outputs(graph, Role.UNDERFLOW).values()]
        flag = insert_call(graph, bit_centering.all_finite, loss + moved + buffers + underflows, {}, out, "all_finite")
        append_output(graph, flag, (Role.ALL_FINITE, None))
        self.moved, self.buffers, self.underflows = len(moved), len(buffers), len(underflows)
        return PassResult(finish(gm), True)

    def summary(self):
        return (f"returns all_finite: the loss, {self.moved} moved offsets, {self.buffers} new buffers and "
                f"{self.underflows} underflow sums checked for NaN/Inf")
