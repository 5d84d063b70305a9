"""Dequantize weights: each trainable parameter becomes an anchor, an integer offset and a scale.

Before::

    def forward(self, fc_weight, fc_bias, batch_0, batch_1, lr):
        t = torch.ops.aten.t.default(fc_weight)

After::

    def forward(self, anchor_fc_weight, offset_fc_weight, scale_fc_weight, ..., batch_0, batch_1, lr):
        w_fc_weight = halp_fx_bit_centering_dequantize(anchor_fc_weight, offset_fc_weight, scale_fc_weight)
        t = torch.ops.aten.t.default(w_fc_weight)

The weight ``W = A + d * Z`` is computed inside the step and never stored.
"""
import logging

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from halp_fx import bit_centering
from halp_fx.capture import ROLE

from .graph_edit import add_input, device_of, finish, insert_call, placeholders

log = logging.getLogger(__name__)


class DequantizeWeightsPass(PassBase):
    def __init__(self, bits):
        super().__init__()
        self.bits = bits
        self.rewritten = 0

    def call(self, gm):
        graph = gm.graph
        device = device_of(graph)
        first_op = next(n for n in graph.nodes if n.op != "placeholder")
        for name, param in placeholders(graph, "param").items():
            shape = param.meta["val"].shape
            anchor = add_input(graph, ("anchor", name), shape, torch.float32, device, after=param)
            offset = add_input(graph, ("offset", name), shape, bit_centering.offset_dtype(self.bits), device, after=anchor)
            scale = add_input(graph, ("scale", name), (), torch.float32, device, after=offset)
            weight = insert_call(graph, bit_centering.dequantize, [anchor, offset, scale], {}, first_op,
                                 f"w_{param.name}")
            param.replace_all_uses_with(weight)
            graph.erase_node(param)
            weight.meta[ROLE] = ("weight", name)
            self.rewritten += 1
        log.debug("dequantized %d parameters", self.rewritten)
        return PassResult(finish(gm), self.rewritten > 0)

    def summary(self):
        return (f"{self.rewritten} parameters now enter as anchor (float32), offset "
                f"({str(bit_centering.offset_dtype(self.bits)).replace('torch.', '')}) and scale; "
                "W = anchor + scale * offset")
