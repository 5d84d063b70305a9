"""Dequantize weights: each trainable parameter becomes an anchor, an integer offset and a scale.

Before::

    def forward(self, weight, bias, batch_0, batch_1):
        t = torch.ops.aten.t.default(weight)

After::

    def forward(self, anchor_weight, offset_weight, scale_weight, anchor_bias, offset_bias, scale_bias, batch_0, batch_1):
        w_weight = halp_fx_bit_centering_dequantize(anchor_weight, offset_weight, scale_weight)
        t = torch.ops.aten.t.default(w_weight)

The weight ``W = A + d * Z`` is computed inside the step and never stored.
"""
import logging

import torch
from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import bit_centering
from halp_fx.roles import Role

from .graph_edit import add_input, finish, insert_call, placeholders
from .pass_base import HalpPass

log = logging.getLogger(__name__)


class DequantizeWeightsPass(HalpPass):
    name = "dequantize_weights"
    needs = ((Role.PARAM, "capture"),)
    guarantees = ((Role.ANCHOR, "node"), (Role.OFFSET, "node"), (Role.SCALE, "node"), (Role.WEIGHT, "node"))
    leaves_no = ((Role.PARAM, "node"),)

    def __init__(self, bits):
        super().__init__()
        self.bits = bits
        self.rewritten = 0

    def call(self, gm):
        graph = gm.graph
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        for name, param in placeholders(graph, Role.PARAM).items():
            shape = param.meta["val"].shape
            anchor = add_input(graph, (Role.ANCHOR, name), shape, torch.float32, after=param)
            offset = add_input(graph, (Role.OFFSET, name), shape, bit_centering.offset_dtype(self.bits), after=anchor)
            scale = add_input(graph, (Role.SCALE, name), (), torch.float32, after=offset)
            weight = insert_call(graph, bit_centering.dequantize, [anchor, offset, scale], {}, first_op,
                                 f"w_{param.name}", role=(Role.WEIGHT, name))
            param.replace_all_uses_with(weight)
            graph.erase_node(param)
            self.rewritten += 1
        log.debug("dequantized %d parameters", self.rewritten)
        return PassResult(finish(gm), self.rewritten > 0)

    def summary(self):
        return (f"{self.rewritten} parameters now enter as anchor (float32), offset "
                f"({str(bit_centering.offset_dtype(self.bits)).replace('torch.', '')}) and scale; "
                "W = anchor + scale * offset")
