"""All-reduce: the step averages its corrected directions, loss and new buffers over the data-parallel ranks.

Before::

    corrected_grad_weight = halp_fx_bit_centering_svrg_corrected(t_3, t_7, full_grad_weight)
    return (view, corrected_grad_weight, corrected_grad_bias)

After::

    average_over_ranks = halp_fx_distributed_average_over_ranks(view, corrected_grad_weight, corrected_grad_bias, group = 'ranks_0_1', world_size = 2)
    mean_loss = average_over_ranks[0]
    mean_corrected_grad_weight = average_over_ranks[1]
    return (mean_loss, mean_corrected_grad_weight, mean_corrected_grad_bias)

One flat bucket, one functional all-reduce (:mod:`halp_fx.distributed`), so
every rank moves its offsets by the same direction and stays identical. The
loss is averaged too: a NaN on one rank reaches every rank's guard.
"""
import operator

from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import distributed
from halp_fx.roles import Role

from .graph_edit import finish, insert_call, output_node, outputs, set_output
from .pass_base import HalpPass


class AllReducePass(HalpPass):
    name = "all_reduce"
    needs = ((Role.CORRECTED_GRAD, "svrg_correction"),)
    guarantees = ((Role.CORRECTED_GRAD, "output"), (Role.LOSS, "output"))

    def __init__(self, group, world_size):
        super().__init__()
        self.group, self.world_size = group, world_size
        self.averaged = []

    def call(self, gm):
        graph = gm.graph
        out = output_node(graph)
        averaged = []
        for kind in (Role.LOSS, Role.CORRECTED_GRAD, Role.BUFFER):
            for name, (position, value) in outputs(graph, kind).items():
                if kind is Role.BUFFER and (value.op == "placeholder" or not value.meta["val"].dtype.is_floating_point):
                    continue
                averaged.append((kind, name, position, value))
        bucket = insert_call(graph, distributed.average_over_ranks, [value for *_, value in averaged],
                             {"group": self.group, "world_size": self.world_size}, out, "average_over_ranks")
        for i, (kind, name, position, value) in enumerate(averaged):
            label = "mean_loss" if kind is Role.LOSS else f"mean_{value.name}"
            mean = insert_call(graph, operator.getitem, [bucket, i], {}, out, label)
            set_output(graph, position, mean, (kind, name))
            self.averaged.append(label)
        return PassResult(finish(gm), True)

    def summary(self):
        return (f"averages {len(self.averaged)} tensors (loss, corrected gradients, new float buffers) over "
                f"{self.world_size} ranks in one all-reduce of one bucket")
