"""SVRG correction: the gradient at the weights is corrected by the gradient at the anchor.

The gradient computation is copied once more, fed by the anchors instead of the
weights, and each parameter's gradient ``g`` becomes ``u = g(W) - g(A) + G``
with ``G`` the full gradient, a new input.

Before::

    mul = torch.ops.aten.mul.Tensor(lr, t_8)
    sub = torch.ops.aten.sub.Tensor(w_fc_weight, mul)

After::

    t_10 = ...   # the same backward, computed from anchor_fc_weight
    corrected_grad_fc_weight = halp_fx_bit_centering_svrg_corrected(t_8, t_10, full_grad_fc_weight)
    mul = torch.ops.aten.mul.Tensor(lr, corrected_grad_fc_weight)

The copy at the anchor writes no buffer: it reads private clones of the
buffers (BatchNorm's running statistics), so whatever it writes is dropped.
"""
import logging

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from halp_fx import bit_centering
from halp_fx.capture import ROLE, identifier

from .graph_edit import add_input, device_of, finish, insert_call, outputs, placeholders

log = logging.getLogger(__name__)


def _ancestors(roots):
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.all_input_nodes)
    return seen


def _descendants(roots):
    seen, stack = set(), list(roots)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.users)
    return seen


class SvrgCorrectionPass(PassBase):
    def __init__(self):
        super().__init__()
        self.copied = 0
        self.corrected = 0

    def call(self, gm):
        graph = gm.graph
        device = device_of(graph)
        weights = {n.meta[ROLE][1]: n for n in graph.nodes if n.meta.get(ROLE, ("",))[0] == "weight"}
        anchors = placeholders(graph, "anchor")
        updates = outputs(graph, "param")
        # The plain step's update is sub(W, mul(lr, grad)): capture writes it that way.
        scaled = {name: update.args[1] for name, (_, update) in updates.items()}
        grads = {name: mul.args[1] for name, mul in scaled.items()}

        at_weights = _descendants(weights.values()) - set(weights.values())
        needed = _ancestors(grads.values())
        to_copy = [n for n in graph.nodes if n in at_weights and n in needed]
        first_update = next(n for n in graph.nodes if n in set(scaled.values()))
        copies = {weights[name]: anchors[name] for name in weights}
        # Ops such as native_batch_norm write buffers in place without saying so in
        # their schema, so the copy gets private clones of every buffer-derived input.
        from_buffers = _descendants(placeholders(graph, "buffer").values())
        with graph.inserting_before(first_update):
            for node in to_copy:
                for arg in node.all_input_nodes:
                    if arg in from_buffers and arg not in copies:
                        copies[arg] = graph.call_function(torch.ops.aten.clone.default, (arg,))
                        copies[arg].meta["val"] = arg.meta.get("val")
                copies[node] = graph.node_copy(node, lambda n: copies.get(n, n))
        self.copied = len(to_copy)

        for name, grad in grads.items():
            full_grad = add_input(graph, ("full_grad", name), grad.meta["val"].shape, torch.float32, device)
            corrected = insert_call(graph, bit_centering.svrg_corrected, [grad, copies[grad], full_grad], {},
                                    scaled[name], f"corrected_grad_{identifier(name)}")
            corrected.meta[ROLE] = ("corrected_grad", name)
            scaled[name].replace_input_with(grad, corrected)
            self.corrected += 1
        log.debug("copied %d nodes for the gradient at the anchor", self.copied)
        return PassResult(finish(gm), self.corrected > 0)

    def summary(self):
        return (f"copied the {self.copied} nodes of the gradient computation to run at the anchors; "
                f"{self.corrected} gradients corrected to g(W) - g(A) + full_grad")
