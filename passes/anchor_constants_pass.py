"""Anchor constants: what the step computes from the anchors alone is computed once per recenter instead.

Before::

    t_15 = torch.ops.aten.t.default(anchor_weight)
    quantize_t_15 = halp_fx_centered_int8_quantize_columns(t_15, levels = 127)
    q_t_15 = quantize_t_15[0]
    s_t_15 = quantize_t_15[1]
    int8_term = halp_fx_centered_int8_int8_term(q_sub, s_sub, q_t_15, s_t_15)

After::

    def forward(self, ..., anchor_constant_q_t_15, anchor_constant_s_t_15):
        int8_term = halp_fx_centered_int8_int8_term(q_sub, s_sub, anchor_constant_q_t_15, anchor_constant_s_t_15)

An anchor changes only at a recenter, so its quantized form (and its bf16 copy,
:mod:`halp_fx.passes.bf16_anchor_pass`) does too. The hoisted values become
inputs of role ``anchor_constant``; the graph that computes them from the
anchors is kept beside the step (``step_graph.anchor_constants``), and the
runtime runs it after each recenter (and after a ``load_state_dict``). Only the
quantizations and casts are hoisted: views of the anchors cost nothing per step.
"""
import operator

import torch
from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import bf16_anchor, centered_int8
from halp_fx.roles import OUTPUT_ROLES, ROLE, Role, role_of

from .graph_edit import add_input, ancestors, finish, find_nodes
from .pass_base import HalpPass

# Inputs that change only at a recenter (frozen parameters never).
PER_RECENTER = (Role.ANCHOR, Role.SCALE, Role.FULL_GRAD, Role.FROZEN)
HOISTED = (centered_int8.quantize_columns, centered_int8.quantize_rows, bf16_anchor.to_bf16)


class AnchorConstantsPass(HalpPass):
    name = "anchor_constants"
    guarantees = ((Role.OFFSET, "output"), (Role.ALL_FINITE, "output"))

    def __init__(self):
        super().__init__()
        self.hoisted = []

    def call(self, gm):
        graph = gm.graph
        constant = {n for n in find_nodes(graph, "placeholder") if role_of(n)[0] in PER_RECENTER}
        for node in graph.nodes:
            if node.op == "call_function" and node.all_input_nodes and all(a in constant for a in node.all_input_nodes):
                constant.add(node)
        hoisted = []
        for node in graph.nodes:
            if node in constant and node.op == "call_function" and node.target in HOISTED:
                if isinstance(node.meta["val"], tuple):
                    hoisted += sorted((u for u in node.users if u.target is operator.getitem), key=lambda u: u.args[1])
                else:
                    hoisted.append(node)
        if not hoisted:
            return PassResult(gm, False)
        gm.anchor_constants = self._constants_graph(gm, hoisted)
        for node in hoisted:
            value = node.meta["val"]
            placeholder = add_input(graph, (Role.ANCHOR_CONSTANT, node.name), value.shape, value.dtype)
            node.replace_all_uses_with(placeholder)
            self.hoisted.append(node.name)
        return PassResult(finish(gm), True)

    @staticmethod
    def _constants_graph(gm, hoisted):
        """``(anchors, ...) -> hoisted values``, a graph of the step's nodes that compute them."""
        needed = ancestors(hoisted)
        graph, env = torch.fx.Graph(), {}
        for node in gm.graph.nodes:
            if node not in needed:
                continue
            if node.op == "placeholder":
                env[node] = graph.placeholder(node.name)
                env[node].meta = dict(node.meta)
            else:
                env[node] = graph.node_copy(node, lambda n: env[n])
        out = graph.output(tuple(env[n] for n in hoisted))
        out.meta[OUTPUT_ROLES] = [(Role.ANCHOR_CONSTANT, n.name) for n in hoisted]
        graph.lint()
        return torch.fx.GraphModule(gm, graph)

    def summary(self):
        return (f"{len(self.hoisted)} values computed from the anchors alone (quantized or bf16 anchor operands) "
                "became inputs, computed once per recenter")
