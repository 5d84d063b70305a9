"""Non-finite guard: the step also returns whether its loss and every corrected gradient are finite.

Before::

    return (view, new_offset_fc_weight, ...)

After::

    all_finite = halp_fx_passes_nonfinite_guard_pass_all_finite(view, corrected_grad_fc_weight, ...)
    return (view, new_offset_fc_weight, ..., all_finite)

The check runs inside the compiled step; the runtime reads one boolean and,
when it is False, keeps the old state instead of the step's outputs.
"""
import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from halp_fx.capture import ROLE

from .graph_edit import append_output, finish, insert_call, output_node, outputs


def all_finite(*tensors):
    """True when no element of any tensor is NaN or infinite.

    Read from the sum of all elements, which is NaN or infinite whenever an
    element is: one addition per element, fused into the kernels that compute
    the tensors, instead of a chain of comparisons. The check errs on the safe
    side: a sum beyond float32's range (about 3.4e38) also counts as non-finite.
    """
    total = tensors[0].sum()
    for tensor in tensors[1:]:
        total = total + tensor.sum()
    return torch.isfinite(total)


class NonfiniteGuardPass(PassBase):
    def __init__(self):
        super().__init__()
        self.checked = 0

    def call(self, gm):
        graph = gm.graph
        checked = [value for _, value in outputs(graph, "loss").values()]
        checked += [n for n in graph.nodes if n.meta.get(ROLE, ("",))[0] == "corrected_grad"]
        flag = insert_call(graph, all_finite, checked, {}, output_node(graph), "all_finite")
        append_output(graph, flag, ("all_finite", None))
        self.checked = len(checked)
        return PassResult(finish(gm), True)

    def summary(self):
        return f"returns all_finite: the loss and {self.checked - 1} corrected gradients checked for NaN/Inf"
