"""The arithmetic of bit centering, defined once.

Every trainable tensor p is held as an anchor ``A`` (float32), an integer
offset ``Z`` and a scale ``d`` (a float32 scalar); the weight the model sees is
``W = A + d * Z``. These functions are plain tensor code: the FX passes trace
them into the training-step graph and the optimizers in :mod:`halp_fx.optim`
call them under ``torch.compile``, so both run exactly the same arithmetic.
"""
import array

import torch

ROUNDINGS = ("stochastic", "nearest")

# The noise of stochastic rounding is a 32-bit integer hash of (key, element index).
# Tensors hold the 32 bits in int32, whose multiply wraps modulo 2**32 and is one
# vector instruction on CPUs and GPUs (an int64 multiply is emulated element by
# element on AVX2); Python ints compute the same function with explicit masks.
_MASK32 = 0xFFFFFFFF
_HASH_MULTIPLIER = 0x45D9F3B
# The hash maps 0 to 0; offsetting the seed keeps seed 0 from starting the chain at 0.
_SEED_OFFSET = 0x632BE5AB
assert array.array("i").itemsize == 4, "rounding_keys packs the keys as C ints, assumed 32-bit"


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
    return scale_from_norm(torch.linalg.vector_norm(full_grad.float()), mu, bits)


def scale_from_norm(norm, mu, bits):
    """:func:`scale_for` given ``||G||`` (a 0-d float32 tensor), for callers that have the norm already."""
    if bits is None:
        return torch.ones((), dtype=torch.float32, device=norm.device)
    return norm / (mu * offset_bounds(bits)[1])


def saturated_fractions(offsets, bits):
    """For each ``bits``-bit offset in ``offsets``, the fraction of its entries at the saturation bounds, as one
    float32 vector (zeros for ``bits=None`` and for empty offsets). A handful of ops for any number of tensors."""
    if bits is None:
        return torch.zeros(len(offsets), device=offsets[0].device)
    high = offset_bounds(bits)[1]
    lengths = [z.numel() for z in offsets]
    # float32 holds every integer and half-integer involved up to 24 bits; wider offsets are checked in float64.
    flat = torch.cat([z.reshape(-1) for z in offsets]).to(torch.float32 if bits <= 23 else torch.float64)
    # |z + 1/2| is high + 1/2 at both bounds and at most high - 1/2 elsewhere, so this is 1 at the bounds and 0
    # elsewhere: float arithmetic, which ATen runs several times faster than integer comparisons into bools.
    at_bounds = torch.clamp((flat + 0.5).abs_() - (high - 0.5), 0.0, 1.0)
    counts = torch.stack([part.sum() for part in at_bounds.split(lengths)])
    return (counts / torch.tensor(lengths, device=flat.device).clamp(min=1)).float()


def dequantize(anchor, offset, scale):
    """The full-precision weight ``W = A + d * Z``."""
    return anchor + scale * offset.to(anchor.dtype)


def _hash32(x):
    """The hash of an int32 tensor's 32 bits, in int32. ``(x >> 16) & 0xFFFF`` is the logical shift."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _HASH_MULTIPLIER
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * _HASH_MULTIPLIER
    return x ^ ((x >> 16) & 0xFFFF)


def _hash32_int(x):
    """:func:`_hash32` on a Python int in [0, 2**32)."""
    x ^= x >> 16
    x = (x * _HASH_MULTIPLIER) & _MASK32
    x ^= x >> 16
    x = (x * _HASH_MULTIPLIER) & _MASK32
    return x ^ (x >> 16)


def _as_int32(value):
    """The low 32 bits of a Python int, as the signed value an int32 tensor holds."""
    value &= _MASK32
    return value - (1 << 32) if value >= 1 << 31 else value


def rounding_key(counter, tensor_index):
    """The key of one tensor at one step: a signed 32-bit Python int.

    ``counter`` is a Python int: the seed in its high 32 bits, the step in its
    low 32 bits, advanced by one per step; it is the whole random state of
    stochastic rounding. The parts are chained through a bijective hash (seed,
    then step, then tensor), so keys of different (seed, step, tensor) coincide
    only by chance.
    """
    return _tensor_key(_step_key(counter), tensor_index)


def first_counter(seed):
    """The rounding counter before the first step: ``seed`` in the high 32 bits, no step counted in the low 32."""
    return int(seed) << 32


def counter_steps(counter):
    """The steps a rounding counter has counted: its low 32 bits (the seed is in the high 32; see
    :func:`rounding_key`). ``counter`` is a Python int or a 0-d integer tensor."""
    return int(counter) & _MASK32


def _step_key(counter):
    seed_key = _hash32_int(((counter >> 32) + _SEED_OFFSET) & _MASK32)
    return _hash32_int(seed_key ^ counter_steps(counter))


def _tensor_key(step_key, tensor_index):
    return _as_int32(_hash32_int((step_key + tensor_index) & _MASK32))


def rounding_keys(counter, count, device=None):
    """The keys of ``count`` tensors at the step ``counter``, as one int32 vector.

    Computed in Python, outside the compiled step, on purpose: inside it,
    Inductor folds the chained hash into every element's expression and
    compiling takes minutes; as tensor ops it costs more than the whole update
    of a small model.
    """
    step_key = _step_key(counter)
    keys = array.array("i", [_tensor_key(step_key, i) for i in range(count)])
    # frombuffer takes the keys without a per-element conversion: 1.5 us, against 4-8 us for torch.tensor(list).
    return torch.frombuffer(keys, dtype=torch.int32).to(device)


def uniform_noise(like, key):
    """Counter-based uniform noise in [0, 1) with ``like``'s shape: ``hash(element index ^ key)``.

    ``key`` is an int32 tensor or a Python int (see :func:`rounding_key`). A hash
    of (key, element index) instead of a stateful generator makes the noise
    identical eagerly, under Inductor and on any device, and makes a
    checkpoint's random state one integer.
    """
    if not isinstance(key, torch.Tensor):
        key = _as_int32(key)
    index = torch.arange(like.numel(), device=like.device, dtype=torch.int32).view(like.shape)
    bits24 = (_hash32(index ^ key) >> 8) & 0xFFFFFF
    return bits24.to(torch.float32) * (1.0 / (1 << 24))


def round_to_grid(x, bits, rounding, key):
    """Round float ``x`` to an integer and saturate to ``bits`` bits.

    ``"stochastic"`` is ``floor(x + U)`` with U uniform in [0, 1) (unbiased);
    ``"nearest"`` is ``floor(x + 0.5)``. Returns a float tensor holding integers.
    """
    low, high = offset_bounds(bits)
    if rounding == "stochastic":
        # floor(x) + floor(frac(x) + U): the fraction is exact, so an x on the grid stays there. Adding U to x
        # itself rounds k + U up to k + 1 whenever U is within half a unit in the last place of k below 1
        # (for k = 512 in float32, one draw in 2**15), which would bias every rounding of a grid point upwards.
        whole = torch.floor(x)
        rounded = whole + torch.floor((x - whole) + uniform_noise(x, key))
    else:
        rounded = torch.floor(x + 0.5)
    return torch.clamp(rounded, low, high)


def moved_offset(offset, scale, direction, lr, bits):
    """``Z - lr * direction / d`` before rounding, in the precision the offset moves in.

    A tensor with ``d == 0`` does not move. It is what the non-finite guard
    checks: finite exactly when the direction and ``lr / d`` are.
    """
    if bits is None:
        return offset - lr * direction
    # float32 holds every integer only up to 2**24: wider offsets move in float64.
    work = torch.float64 if bits > 24 else torch.float32
    # lr / d is one scalar: the per-element work is a multiply and a subtract.
    step_size = torch.where(scale > 0, lr / scale, torch.zeros_like(scale)).to(work)
    return offset.to(work) - direction.to(work) * step_size


def offset_step(offset, scale, direction, lr, bits, rounding, key=None):
    """One HALP update of the offset: ``Z <- Q(Z - lr * direction / d)``.

    ``direction`` is the corrected gradient (after weight decay and momentum). A
    tensor with ``d == 0`` keeps its offset. The new offset has the dtype of a
    ``bits``-bit offset whatever ``offset``'s dtype: the compiled CPU step reads
    the old one widened to float32 (see :mod:`halp_fx.programs`). With ``bits=None`` there is no
    rounding: the float32 offset moves by ``-lr * direction``.
    """
    return _rounded(moved_offset(offset, scale, direction, lr, bits), bits, rounding, key)


def _rounded(moved, bits, rounding, key):
    if bits is None:
        return moved
    return round_to_grid(moved, bits, rounding, key).to(offset_dtype(bits))


def svrg_corrected(grad, anchor_grad, full_grad):
    """The variance-reduced gradient ``u = g(W) - g(A) + G``."""
    return grad - anchor_grad + full_grad


def corrected_by_difference(difference, full_grad):
    """``u = G + (g(W) - g(A))`` where centered products gave the difference itself
    (:mod:`halp_fx.passes.anchor_difference_pass`): the same ``u``, with no two large numbers subtracted."""
    return full_grad + difference


def with_weight_decay(grad, weight, weight_decay):
    """Weight decay acts on the full weight ``W``, not on the offset."""
    return grad + weight_decay * weight


def momentum_step(momentum_buffer, direction, momentum):
    """The new float32 momentum buffer ``m * v + direction``; the offset then moves along it."""
    return momentum * momentum_buffer + direction


def offset_update(offset, scale, weight, corrected_grad, momentum_buffer, lr, *, weight_decay, momentum, bits,
                  rounding, key=None):
    """The inner step after the SVRG correction: weight decay on ``W``, then momentum, then the offset step.

    Returns ``(new offset, direction, moved, underflow)``: ``direction`` is the new
    momentum buffer when ``momentum_buffer`` is given, ``moved`` the offset before
    rounding (see :func:`moved_offset`), ``underflow`` the fraction of entries whose
    step was below half a grid step (see :func:`underflow_fraction`). ``weight_decay`` and ``momentum`` are numbers
    (constants of a graph) or 0-d tensors (so a scheduler changing them does not
    recompile the optimizers' update); a number 0 adds no operation.
    """
    direction = corrected_grad
    if isinstance(weight_decay, torch.Tensor) or weight_decay:
        direction = with_weight_decay(direction, weight, weight_decay)
    if momentum_buffer is not None:
        direction = momentum_step(momentum_buffer, direction, momentum)
    moved = moved_offset(offset, scale, direction, lr, bits)
    return _rounded(moved, bits, rounding, key), direction, moved, underflow_fraction(offset, moved, bits)


def underflow_fraction(offset, moved, bits):
    """The fraction of entries whose step ``|moved - Z| = |lr * direction / d|`` is below half a grid step: the
    steps that rounding to nearest would drop, and that stochastic rounding turns mostly into noise (a 0-d float32
    tensor; 0 for ``bits=None``, which does not round). A compare and a sum that Inductor fuses into the update."""
    if bits is None:
        return torch.zeros((), dtype=torch.float32, device=moved.device)
    small = (moved - offset.to(moved.dtype)).abs() < 0.5
    return _sum_of_all(small.to(torch.float32)) / max(moved.numel(), 1)


def inner_step(anchor, offset, scale, grad, anchor_grad, full_grad, momentum_buffer, lr, *, weight_decay, momentum,
               bits, rounding, key=None):
    """One HALP inner step of one tensor, the whole rule in the order it runs.

    ``dequantize`` -> ``svrg_corrected`` -> ``offset_update`` (weight decay,
    momentum, offset step). The optimizers call this function; the passes insert
    its three stages into the captured graph, one pass each (dequantize_weights,
    svrg_correction, offset_update), so the two routes run the same arithmetic.
    Returns :func:`offset_update`'s ``(new offset, direction, moved, underflow)``.
    """
    weight = dequantize(anchor, offset, scale)
    corrected = svrg_corrected(grad, anchor_grad, full_grad)
    return offset_update(offset, scale, weight, corrected, momentum_buffer, lr, weight_decay=weight_decay,
                         momentum=momentum, bits=bits, rounding=rounding, key=key)


def all_finite(*tensors):
    """True (a 0-d bool tensor) when no element of any tensor is NaN or infinite.

    Read from the sum of all elements, which is NaN or infinite whenever an
    element is: one addition per element, fused into the kernels that compute
    the tensors, instead of a chain of comparisons. The check errs on the safe
    side: a sum beyond float32's range (about 3.4e38) also counts as non-finite.
    """
    total = _sum_of_all(tensors[0])
    for tensor in tensors[1:]:
        total = total + _sum_of_all(tensor)
    return torch.isfinite(total)


def _sum_of_all(tensor):
    """The sum of all elements, summed over the trailing dimensions first.

    Summed that way, Inductor computes the sums in the loops over rows and columns that compute the tensor, and
    the tensor need not be stored (a whole tensor's sum at once is a flat loop of its own, which reads a stored
    copy back: 0.2 ms of a 2 ms offset update of a 1024x1024 weight).
    """
    if tensor.dim() < 2:
        return tensor.sum()
    return tensor.sum(dim=tuple(range(1, tensor.dim()))).sum()
