"""The optimizers' arithmetic as one pure function over lists, as ``torch.optim``'s functional SGD.

One entry per trainable tensor, in the order of the rounding keys. ``lrs``, ``weight_decays`` and ``momentums``
are 0-d float32 tensors (a scheduler changing them does not recompile); ``bits`` and ``roundings`` are constants
of the compiled code. A momentum buffer is ``None`` where the tensor's group has no momentum.
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import bit_centering


def halp_inner_steps(loss: Tensor, anchors: List[Tensor], offsets: List[Tensor], scales: List[Tensor],
                     grads: List[Tensor], anchor_grads: List[Tensor], full_grads: List[Tensor],
                     momentum_buffers: List[Optional[Tensor]], underflows: List[Tensor], keys: Optional[Tensor], *,
                     lrs: List[Tensor], weight_decays: List[Tensor], momentums: List[Tensor],
                     bits: List[Optional[int]], roundings: List[str],
                     ) -> Tuple[List[Tensor], List[Optional[Tensor]], List[Tensor], List[Tensor], Tensor]:
    """:func:`halp_fx.bit_centering.inner_step` of every tensor.

    Returns the new offsets, the new momentum buffers (``None`` where there is none), the new weights
    ``A + d*Z``, the new underflow sums, and one flag: whether the loss, every offset before rounding and every
    underflow sum are finite (the loop takes the step only then).
    """
    new_offsets, new_buffers, new_weights, new_underflows, checked = [], [], [], [], [loss]
    for i in range(len(anchors)):
        stochastic = bits[i] is not None and roundings[i] == "stochastic"
        new_offset, direction, moved, underflow = bit_centering.inner_step(
            anchors[i], offsets[i], scales[i], grads[i], anchor_grads[i], full_grads[i], momentum_buffers[i], lrs[i],
            weight_decay=weight_decays[i], momentum=momentums[i], bits=bits[i], rounding=roundings[i],
            key=keys[i] if stochastic else None)
        new_offsets.append(new_offset)
        new_buffers.append(None if momentum_buffers[i] is None else direction)
        new_weights.append(bit_centering.dequantize(anchors[i], new_offset, scales[i]))
        new_underflows.append(underflows[i] + underflow)
        checked += [moved, new_underflows[-1]]
    return new_offsets, new_buffers, new_weights, new_underflows, bit_centering.all_finite(*checked)
