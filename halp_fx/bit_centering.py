"""The arithmetic of bit centering, defined once.

Every trainable tensor p is held as an anchor ``A`` (float32), an integer
offset ``Z`` and a scale ``d`` (a float32 scalar); the weight the model sees is
``W = A + d * Z``. These functions are plain tensor code: the FX passes trace
them into the training-step graph and the optimizers in :mod:`halp_fx.optim`
call them under ``torch.compile``, so both run exactly the same arithmetic.
"""
import torch

ROUNDINGS = ("stochastic", "nearest")

# Element-wise integer hash on int64 tensors whose values stay below 2**32.
# The multiplier is below 2**27, so no product can overflow int64.
_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B
# The hash maps 0 to 0; offsetting the seed keeps seed 0 from starting the chain at 0.
_SEED_OFFSET = 0x632BE5AB


def offset_dtype(bits):
    """The integer dtype that holds a ``bits``-bit offset (float32 for ``bits=None``)."""
    if bits is None:
        return torch.float32
    if bits <= 8:
        return torch.int8
    if bits <= 16:
        return torch.int16
    return torch.int32


def offset_bounds(bits):
    """The saturation bounds ``(-2**(bits-1), 2**(bits-1) - 1)`` of a ``bits``-bit offset."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def scale_for(full_grad, mu, bits):
    """``d = ||G|| / (mu * (2**(bits-1) - 1))``: the grid shrinks with the full gradient.

    A tensor whose full gradient is exactly zero gets ``d = 0``. With ``bits=None``
    (full-precision SVRG) the offset is held in float32 and ``d`` is 1.
    """
    if bits is None:
        return torch.ones((), dtype=torch.float32, device=full_grad.device)
    return torch.linalg.vector_norm(full_grad.float()) / (mu * offset_bounds(bits)[1])


def saturated_fraction(offset, bits):
    """The fraction of a ``bits``-bit offset's entries that sit at the saturation bounds (0 for ``bits=None``)."""
    if bits is None or offset.numel() == 0:
        return 0.0
    low, high = offset_bounds(bits)
    return float(((offset == low) | (offset == high)).float().mean())


def dequantize(anchor, offset, scale):
    """The full-precision weight ``W = A + d * Z``."""
    return anchor + scale * offset.to(anchor.dtype)


def _hash32(x):
    x = x ^ (x >> 16)
    x = (x * _HASH_MULTIPLIER) & _MASK32
    x = x ^ (x >> 16)
    x = (x * _HASH_MULTIPLIER) & _MASK32
    return x ^ (x >> 16)


def rounding_key(counter, tensor_index):
    """An int64 key for one tensor at one step, from the step counter and the tensor's index.

    ``tensor_index`` may be an int64 tensor of indices; the keys broadcast.
    ``counter`` is a 0-d int64 tensor: the seed in its high 32 bits, the step in
    its low 32 bits, advanced by one per step; it is the whole random state of
    stochastic rounding. The parts are chained through a bijective hash (seed,
    then step, then tensor), so keys of different (seed, step, tensor) coincide
    only by chance.
    """
    seed_key = _hash32(((counter >> 32) + _SEED_OFFSET) & _MASK32)
    step_key = _hash32(seed_key ^ (counter & _MASK32))
    return _hash32((step_key + tensor_index) & _MASK32)


def rounding_keys(counter, count, device=None):
    """The keys of ``count`` tensors at the step ``counter`` (a Python int), as one int64 vector.

    Computed outside the compiled step on purpose: inside it, Inductor folds the
    chained hash into every element's expression and compiling takes minutes.
    """
    counter = torch.tensor(counter, dtype=torch.int64, device=device)
    return rounding_key(counter, torch.arange(count, dtype=torch.int64, device=device))


def uniform_noise(like, key):
    """Counter-based uniform noise in [0, 1) with ``like``'s shape: ``hash(element index ^ key)``.

    A hash of (key, element index) instead of a stateful generator makes the
    noise identical eagerly, under Inductor and on any device, and makes a
    checkpoint's random state two integers.
    """
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
    bits24 = _hash32(index ^ key) >> 8
    return bits24.to(torch.float32) * (1.0 / (1 << 24))


def round_to_grid(x, bits, rounding, key):
    """Round float ``x`` to an integer and saturate to ``bits`` bits.

    ``"stochastic"`` is ``floor(x + U)`` with U uniform in [0, 1) (unbiased);
    ``"nearest"`` is ``floor(x + 0.5)``. Returns a float tensor holding integers.
    """
    low, high = offset_bounds(bits)
    shift = uniform_noise(x, key) if rounding == "stochastic" else 0.5
    return torch.clamp(torch.floor(x + shift), low, high)


def offset_step(offset, scale, direction, lr, bits, rounding, key=None):
    """One HALP update of the offset: ``Z <- Q(Z - lr * direction / d)``.

    ``direction`` is the corrected gradient (after weight decay and momentum). A
    tensor with ``d == 0`` keeps its offset. With ``bits=None`` there is no
    rounding: the float32 offset moves by ``-lr * direction``.
    """
    if bits is None:
        return offset - lr * direction
    # float32 holds every integer only up to 2**24: wider offsets move in float64.
    work = torch.float64 if bits > 24 else torch.float32
    inverse_scale = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale)).to(work)
    moved = offset.to(work) - (lr * direction).to(work) * inverse_scale
    return round_to_grid(moved, bits, rounding, key).to(offset.dtype)


def svrg_corrected(grad, anchor_grad, full_grad):
    """The variance-reduced gradient ``u = g(W) - g(A) + G``."""
    return grad - anchor_grad + full_grad


def with_weight_decay(grad, weight, weight_decay):
    """Weight decay acts on the full weight ``W``, not on the offset."""
    return grad + weight_decay * weight


def momentum_step(momentum_buffer, direction, momentum):
    """The new float32 momentum buffer ``m * v + direction``; the offset then moves along it."""
    return momentum * momentum_buffer + direction
