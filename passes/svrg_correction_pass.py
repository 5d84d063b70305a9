"""SVRG correction: the gradient at the weights is corrected by the gradient at the anchor.

The gradient computation is copied once more, fed by the anchors instead of the
weights, and each parameter's gradient output ``g`` becomes ``u = g(W) - g(A) + G``
with ``G`` the full gradient, a new input.

Before::

    return (view, t_3, view_2)

After::

    t_4 = torch.ops.aten.t.default(anchor_weight)
    ...   # the same forward and backward, at the anchors
    corrected_grad_weight = halp_fx_bit_centering_svrg_corrected(t_3, t_7, full_grad_weight)
    return (view, corrected_grad_weight, corrected_grad_bias)

The copy at the anchor writes no buffer: it reads private clones of the
buffers (BatchNorm's running statistics), so whatever it writes is dropped.
Random ops (dropout's mask) depend on no parameter, so they are not copied:
both passes share one mask.
"""
import logging

import torch
from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import bit_centering
from halp_fx.capture import identifier
from halp_fx.matrix_work import ANCHOR_PASS
from halp_fx.roles import Role

from .graph_edit import (add_input, ancestors, descendants, finish, insert_call, nodes_with_role, output_node,
                         outputs, placeholders, set_output)
from .pass_base import HalpPass

log = logging.getLogger(__name__)

TWIN = "halp_anchor_twin"


class SvrgCorrectionPass(HalpPass):
    name = "svrg_correction"
    needs = ((Role.WEIGHT, "dequantize_weights"), (Role.GRAD, "capture"))
    guarantees = ((Role.FULL_GRAD, "node"), (Role.CORRECTED_GRAD, "output"))
    leaves_no = ((Role.GRAD, "output"),)

    def __init__(self):
        super().__init__()
        self.copied = 0
        self.corrected = 0

    def call(self, gm):
        graph = gm.graph
        weights = nodes_with_role(graph, Role.WEIGHT)
        anchors = placeholders(graph, Role.ANCHOR)
        grads = outputs(graph, Role.GRAD)
        out = output_node(graph)

        at_weights = descendants(weights.values()) - set(weights.values())
        needed = ancestors(value for _, value in grads.values())
        to_copy = [n for n in graph.nodes if n in at_weights and n in needed]
        copies = {weights[name]: anchors[name] for name in weights}
        # Ops such as native_batch_norm write buffers in place without saying so in
        # their schema, so the copy gets private clones of every buffer-derived input.
        from_buffers = descendants(placeholders(graph, Role.BUFFER).values())
        with graph.inserting_before(out):
            for node in to_copy:
                for arg in node.all_input_nodes:
                    if arg in from_buffers and arg not in copies:
                        copies[arg] = graph.call_function(torch.ops.aten.clone.default, (arg,))
                        copies[arg].meta["val"] = arg.meta.get("val")
                copies[node] = graph.node_copy(node, lambda n: copies.get(n, n))
                copies[node].meta[ANCHOR_PASS] = True
                node.meta[TWIN] = copies[node].name   # for later passes: the same value at the anchor, by name
        self.copied = len(to_copy)

        for name, (position, grad) in grads.items():
            full_grad = add_input(graph, (Role.FULL_GRAD, name), grad.meta["val"].shape, torch.float32)
            corrected = insert_call(graph, bit_centering.svrg_corrected, [grad, copies.get(grad, grad), full_grad],
                                    {}, out, f"corrected_grad_{identifier(name)}", role=(Role.CORRECTED_GRAD, name))
            set_output(graph, position, corrected, (Role.CORRECTED_GRAD, name))
            self.corrected += 1
        log.debug("copied %d nodes for the gradient at the anchor", self.copied)
        return PassResult(finish(gm), self.corrected > 0)

    def summary(self):
        return (f"copied the {self.copied} nodes of the gradient computation to run at the anchors; "
                f"{self.corrected} gradients corrected to g(W) - g(A) + full_grad")
