"""Offset update: each parameter's SGD update becomes a rounded, saturated update of its integer offset.

Before::

    mul = torch.ops.aten.mul.Tensor(lr, corrected_grad_fc_weight)
    sub = torch.ops.aten.sub.Tensor(w_fc_weight, mul)
    return (view, sub, ...)

After (``bits=8``, stochastic rounding)::

    key_fc_weight = torch.ops.aten.select.int(rounding_keys, 0, 0)
    new_offset_fc_weight = halp_fx_bit_centering_offset_step(offset_fc_weight, scale_fc_weight,
        corrected_grad_fc_weight, lr, bits = 8, rounding = 'stochastic', key = key_fc_weight)
    return (view, new_offset_fc_weight, ...)

Weight decay (on the full weight W) and momentum (a float32 buffer, a new input
and output) add a node each before the offset step. The arithmetic is
:mod:`halp_fx.bit_centering`'s; stochastic rounding adds one input,
``rounding_keys``, one int32 key per tensor, made by the runtime each step
from its rounding counter (:func:`halp_fx.bit_centering.rounding_keys`).
"""
import logging

import torch
from torch.fx.passes.infra.pass_base import PassBase, PassResult

from halp_fx import bit_centering
from halp_fx.capture import identifier

from .graph_edit import (add_input, append_output, device_of, finish, insert_call, outputs,
                         placeholders, set_output)

log = logging.getLogger(__name__)


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
        params = outputs(graph, "param")
        keys = add_input(graph, ("rounding_keys", None), (len(params),), torch.int32, device) if stochastic else None
        for index, (name, (position, update)) in enumerate(params.items()):
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
                kwargs["key"] = insert_call(graph, torch.ops.aten.select.int, [keys, 0, index], {}, update,
                                            f"key_{label}")
            new_offset = insert_call(graph, bit_centering.offset_step,
                                     [offsets[name], scales[name], direction, lr], kwargs, update,
                                     f"new_offset_{label}")
            set_output(graph, position, new_offset, ("offset", name))
            self.rewritten += 1
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
