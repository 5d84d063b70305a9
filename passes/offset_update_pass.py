"""Offset update: each corrected gradient output becomes the new integer offset it moves to.

Before::

    corrected_grad_weight = halp_fx_bit_centering_svrg_corrected(t_3, t_7, full_grad_weight)
    return (view, corrected_grad_weight, corrected_grad_bias)

After (``bits=8``, nearest rounding)::

    update_weight = halp_fx_bit_centering_offset_update(offset_weight, scale_weight, None, corrected_grad_weight, None, lr, weight_decay = 0.0, momentum = 0.0, bits = 8, rounding = 'nearest')
    new_offset_weight = update_weight[0]
    step_underflow_weight = update_weight[3]
    new_underflow_weight = torch.ops.aten.add.Tensor(underflow_weight, step_underflow_weight)
    return (view, new_offset_weight, new_offset_bias, new_underflow_weight, new_underflow_bias)

``offset_update`` is weight decay (on the full weight W, which it reads only
when ``weight_decay`` is not 0: the ``None`` above), momentum (a float32
buffer, a new input and output) and the rounded, saturated offset step, as
:mod:`halp_fx.bit_centering` defines them. ``lr`` is a new input; stochastic
rounding adds one more, ``rounding_keys``, one int32 key per tensor, made by
the runtime each step from its rounding counter
(:func:`halp_fx.bit_centering.rounding_keys`). The update's third value, the
offset before rounding, is what the non-finite guard checks. Its fourth, the
fraction of entries whose step was below half a grid step, is added to an
``underflow`` input (one 0-d float32 per tensor, a new output too): the runtime's
telemetry for ``mu="auto"`` and ``stats()``.
"""
import logging
import operator

import torch
from torch.fx.passes.infra.pass_base import PassResult

from halp_fx import bit_centering
from halp_fx.capture import identifier
from halp_fx.roles import Role

from .graph_edit import (add_input, append_output, finish, insert_call, nodes_with_role, output_node, outputs,
                         placeholders, set_output)
from .pass_base import HalpPass

log = logging.getLogger(__name__)


class OffsetUpdatePass(HalpPass):
    name = "offset_update"
    needs = ((Role.CORRECTED_GRAD, "svrg_correction"),)
    guarantees = ((Role.UPDATE, "node"), (Role.OFFSET, "output"), (Role.UNDERFLOW, "output"), (Role.LR, "node"))
    leaves_no = ((Role.CORRECTED_GRAD, "output"),)

    def __init__(self, bits, rounding, momentum, weight_decay):
        super().__init__()
        self.bits, self.rounding = bits, rounding
        self.momentum, self.weight_decay = momentum, weight_decay
        self.rewritten = 0

    def call(self, gm):
        graph = gm.graph
        offsets, scales = placeholders(graph, Role.OFFSET), placeholders(graph, Role.SCALE)
        anchors = placeholders(graph, Role.ANCHOR)
        weights = nodes_with_role(graph, Role.WEIGHT)
        out = output_node(graph)
        stochastic = self.bits is not None and self.rounding == "stochastic"
        corrected = outputs(graph, Role.CORRECTED_GRAD)
        lr = add_input(graph, (Role.LR, None), (), torch.float32)
        keys = add_input(graph, (Role.ROUNDING_KEYS, None), (len(corrected),), torch.int32) if stochastic else None
        for index, (name, (position, direction)) in enumerate(corrected.items()):
            label = identifier(name)
            buffer = None
            if self.momentum:
                buffer = add_input(graph, (Role.MOMENTUM, name), direction.meta["val"].shape, torch.float32)
            kwargs = {"weight_decay": self.weight_decay, "momentum": self.momentum, "bits": self.bits,
                      "rounding": self.rounding}
            if stochastic:
                kwargs["key"] = insert_call(graph, torch.ops.aten.select.int, [keys, 0, index], {}, out,
                                            f"key_{label}")
            weight = None
            if self.weight_decay:
                # Centered products may have left W = A + d*Z unused (and removed): weight decay reads it again.
                weight = weights.get(name) or insert_call(
                    graph, bit_centering.dequantize, [anchors[name], offsets[name], scales[name]], {}, out,
                    f"w_{label}", role=(Role.WEIGHT, name))
            update = insert_call(graph, bit_centering.offset_update,
                                 [offsets[name], scales[name], weight, direction, buffer, lr], kwargs, out,
                                 f"update_{label}", role=(Role.UPDATE, name))
            new_offset = insert_call(graph, operator.getitem, [update, 0], {}, out, f"new_offset_{label}")
            underflow = add_input(graph, (Role.UNDERFLOW, name), (), torch.float32)
            step_underflow = insert_call(graph, operator.getitem, [update, 3], {}, out, f"step_underflow_{label}")
            new_underflow = insert_call(graph, torch.ops.aten.add.Tensor, [underflow, step_underflow], {}, out,
                                        f"new_underflow_{label}")
            append_output(graph, new_underflow, (Role.UNDERFLOW, name))
            if self.momentum:
                new_momentum = insert_call(graph, operator.getitem, [update, 1], {}, out, f"new_momentum_{label}")
                append_output(graph, new_momentum, (Role.MOMENTUM, name))
            set_output(graph, position, new_offset, (Role.OFFSET, name))
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
        return f"{self.rewritten} corrected gradients became {rule}" + (f"; {', '.join(extras)}" if extras else "")
