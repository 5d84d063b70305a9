"""Offset update: each parameter's SGD update becomes a rounded, saturated update of its integer offset.

Before::

    mul = torch.ops.aten.mul.Tensor(lr, corrected_grad_fc_weight)
    sub = torch.ops.aten.sub.Tensor(w_fc_weight, mul)
    return (view, sub, ...)

After (``bits=8``, stochastic rounding)::

    key_fc_weight = halp_fx_bit_centering_rounding_key(rounding_counter, 0)
    new_offset_fc_weight = halp_fx_bit_centering_offset_step(offset_fc_weight, scale_fc_weight,
        corrected_grad_fc_weight, lr, bits = 8, rounding = 'stochastic', key = key_fc_weight)
    return (view, new_offset_fc_weight, ..., next_rounding_counter)

Weight decay (on the full weight W) and momentum (a float32 buffer, a new input
and output) add a node each before the offset step. The arithmetic is
:mod:`halp_fx.bit_centering`'s; stochastic rounding adds one input,
``rounding_counter``, and returns it advanced by one.
"""
import logging

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from halp_fx import bit_centering
from halp_fx.capture import identifier

from .graph_edit import (add_input, append_output, device_of, finish, insert_call, output_node, outputs,
                         placeholders, set_output)

log = logging.getLogger(__name__)


def advance_counter(counter):
    return counter + 1


class OffsetUpdatePass(PassBase):
    def __init__(self, bits, rounding, momentum, weight_decay):
        super().__init__()
        self.bits, self.rounding = bits, rounding
        self.momentum, self.weight_decay = momentum, weight_decay
        self.rewritten = 0

    def call(self, gm):
        graph = gm.graph
        device = device_of(graph)
        offsets, scales = placeholders(graph, "offset"), placeholders(graph, "scale")
        lr = placeholders(graph, "lr")[None]
        stochastic = self.bits is not None and self.rounding == "stochastic"
        counter = add_input(graph, ("rounding_counter", None), (), torch.int64, device) if stochastic else None
        for index, (name, (position, update)) in enumerate(outputs(graph, "param").items()):
            label = identifier(name)
            weight, scaled = update.args
            direction = scaled.args[1]
            if self.weight_decay:
                direction = insert_call(graph, bit_centering.with_weight_decay, [direction, weight],
                                        {"weight_decay": self.weight_decay}, update, f"decayed_grad_{label}")
            if self.momentum:
                buffer = add_input(graph, ("momentum", name), direction.meta["val"].shape, torch.float32, device)
                direction = insert_call(graph, bit_centering.momentum_step, [buffer, direction],
                                        {"momentum": self.momentum}, update, f"new_momentum_{label}")
                append_output(graph, direction, ("momentum", name))
            kwargs = {"bits": self.bits, "rounding": self.rounding}
            if stochastic:
                kwargs["key"] = insert_call(graph, bit_centering.rounding_key, [counter, index], {}, update,
                                            f"key_{label}")
            new_offset = insert_call(graph, bit_centering.offset_step,
                                     [offsets[name], scales[name], direction, lr], kwargs, update,
                                     f"new_offset_{label}")
            set_output(graph, position, new_offset, ("offset", name))
            self.rewritten += 1
        if stochastic:
            advanced = insert_call(graph, advance_counter, [counter], {}, output_node(graph), "next_rounding_counter")
            append_output(graph, advanced, ("rounding_counter", None))
        return PassResult(finish(gm), self.rewritten > 0)

    def summary(self):
        if self.bits is None:
            rule = "offset -= lr * direction (float32, no rounding)"
        else:
            low, high = bit_centering.offset_bounds(self.bits)
            rule = f"offset = clamp({self.rounding} round(offset - lr * direction / scale), {low}, {high})"
        extras = [f"weight_decay={self.weight_decay} on W"] if self.weight_decay else []
        extras += [f"momentum={self.momentum} (float32 buffer)"] if self.momentum else []
        return f"{self.rewritten} SGD updates became {rule}" + (f"; {', '.join(extras)}" if extras else "")
