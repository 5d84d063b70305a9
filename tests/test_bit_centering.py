"""halp_fx.bit_centering against the HALP spec: offset types and bounds, the scale, the offset update, rounding.

Spec, per trainable tensor: weight ``W = A + d * Z`` with a ``b``-bit integer
offset ``Z`` in ``[-2**(b-1), 2**(b-1) - 1]``; ``d = ||G||_2 / (mu * (2**(b-1) - 1))``;
an inner step is ``Z <- clamp(round(Z - lr * u / d))``; a tensor with ``d = 0``
keeps its offset; nearest rounding is ``floor(x + 0.5)``, stochastic rounding is
``floor(x + U)`` with ``U`` uniform in [0, 1). ``bits=None`` is full-precision
SVRG: float32 offset, ``d = 1``, no rounding.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from halp_fx import bit_centering as bc

ALL_BITS = list(range(2, 33))
# float32 holds every integer up to 2**24 exactly; the property tests stay there.
EXACT_BITS = st.integers(min_value=2, max_value=24)
PROPERTY = settings(max_examples=50, deadline=None)


def key(value):
    """A rounding key as the step graph receives it: a 0-d int32 tensor holding 32 bits."""
    return torch.tensor(bc._as_int32(value), dtype=torch.int32)


def float32_values(low=-1e4, high=1e4):
    return st.lists(st.floats(min_value=low, max_value=high, allow_nan=False, allow_infinity=False, width=32),
                    min_size=1, max_size=16)


# -- offset_dtype and offset_bounds ------------------------------------------------------------------

@pytest.mark.parametrize("bits", range(2, 9))
def test_offset_dtype_is_int8_up_to_8_bits(bits):
    assert bc.offset_dtype(bits) == torch.int8


@pytest.mark.parametrize("bits", range(9, 17))
def test_offset_dtype_is_int16_from_9_to_16_bits(bits):
    assert bc.offset_dtype(bits) == torch.int16


@pytest.mark.parametrize("bits", range(17, 33))
def test_offset_dtype_is_int32_from_17_to_32_bits(bits):
    assert bc.offset_dtype(bits) == torch.int32


def test_offset_dtype_is_float32_for_full_precision():
    assert bc.offset_dtype(None) == torch.float32


@pytest.mark.parametrize("bits", ALL_BITS)
def test_offset_bounds_are_the_twos_complement_range(bits):
    assert bc.offset_bounds(bits) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)


@pytest.mark.parametrize("bits", ALL_BITS)
def test_offset_bounds_fit_the_offset_dtype(bits):
    low, high = bc.offset_bounds(bits)
    info = torch.iinfo(bc.offset_dtype(bits))
    assert info.min <= low and high <= info.max


# -- scale_for ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,mu", [(4, 0.5), (8, 0.1), (8, 2.0), (16, 1.0), (24, 0.3)])
def test_scale_is_full_gradient_norm_over_mu_times_largest_offset(bits, mu):
    g = torch.Generator().manual_seed(bits)
    full_grad = torch.randn(3, 5, generator=g)
    norm = math.sqrt(sum(float(v) ** 2 for v in full_grad.flatten()))
    expected = norm / (mu * (2 ** (bits - 1) - 1))
    scale = bc.scale_for(full_grad, mu, bits)
    assert scale.shape == () and scale.dtype == torch.float32
    assert float(scale) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bits", [2, 8, 16, 32])
def test_scale_of_zero_full_gradient_is_zero(bits):
    assert float(bc.scale_for(torch.zeros(4, 3), 0.5, bits)) == 0.0


def test_scale_for_full_precision_is_one():
    scale = bc.scale_for(torch.randn(4, 3), 0.5, None)
    assert scale.shape == () and scale.dtype == torch.float32 and float(scale) == 1.0


# -- offset_step ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("rounding", bc.ROUNDINGS)
@pytest.mark.parametrize("bits", [4, 8, 16])
def test_offset_step_with_zero_scale_keeps_offset_and_makes_no_nan(bits, rounding):
    offset = torch.tensor([-3, 0, 2, 5], dtype=bc.offset_dtype(bits))
    direction = torch.tensor([1.0, -2.0, 0.0, 3.5])
    moved = bc.offset_step(offset, torch.zeros(()), direction, 0.1, bits, rounding, key(7))
    assert moved.dtype == offset.dtype
    assert torch.equal(moved, offset)


@pytest.mark.parametrize("bits", [4, 8, 16])
def test_offset_step_moves_by_lr_times_direction_over_scale_then_rounds_to_nearest(bits):
    offset = torch.tensor([-3, 0, 2, 5], dtype=bc.offset_dtype(bits))
    direction = torch.tensor([1.0, -2.0, 0.25, 3.5])
    scale, lr = 0.05, 0.1
    expected = np.floor(offset.numpy().astype(np.float64) - lr * direction.numpy().astype(np.float64) / scale + 0.5)
    moved = bc.offset_step(offset, torch.tensor(scale), direction, lr, bits, "nearest")
    assert moved.dtype == offset.dtype
    np.testing.assert_array_equal(moved.numpy(), expected)


@pytest.mark.parametrize("rounding", bc.ROUNDINGS)
@pytest.mark.parametrize("bits", [2, 8, 9, 16, 17, 24, 25, 31, 32])
def test_offset_step_saturates_at_the_bounds(bits, rounding):
    low, high = bc.offset_bounds(bits)
    dtype = bc.offset_dtype(bits)
    offset = torch.tensor([0, 0, low, high], dtype=dtype)
    # Steps of 1e12 grid units, each way: far past both bounds.
    direction = torch.tensor([-1.0, 1.0, 1.0, -1.0])
    moved = bc.offset_step(offset, torch.tensor(1e-12), direction, 1.0, bits, rounding, key(3))
    assert moved.dtype == dtype
    assert moved.tolist() == [high, low, low, high]


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_offset_step_of_zero_keeps_offsets_at_the_bounds(bits):
    low, high = bc.offset_bounds(bits)
    offset = torch.tensor([low, -1, 0, 1, high], dtype=bc.offset_dtype(bits))
    moved = bc.offset_step(offset, torch.tensor(0.5), torch.zeros(5), 0.1, bits, "nearest")
    assert moved.tolist() == offset.tolist()


def test_offset_step_full_precision_moves_by_lr_times_direction_without_rounding():
    offset = torch.tensor([0.0, 0.3, -1.25])
    direction = torch.tensor([1.0, -0.7, 0.01])
    moved = bc.offset_step(offset, torch.ones(()), direction, 0.1, None, "nearest")
    assert moved.dtype == torch.float32
    np.testing.assert_allclose(moved.numpy(), offset.numpy() - 0.1 * direction.numpy(), rtol=1e-6)


# -- the other spec formulas ----------------------------------------------------------------------------

def test_dequantize_is_anchor_plus_scale_times_offset():
    anchor = torch.tensor([0.5, -1.0, 2.0])
    offset = torch.tensor([3, -4, 0], dtype=torch.int8)
    weight = bc.dequantize(anchor, offset, torch.tensor(0.25))
    assert weight.dtype == torch.float32
    assert weight.tolist() == [0.5 + 0.75, -1.0 - 1.0, 2.0]


def test_svrg_correction_is_gradient_minus_anchor_gradient_plus_full_gradient():
    grad, anchor_grad, full_grad = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 3.0]), torch.tensor([0.25, -1.0])
    assert bc.svrg_corrected(grad, anchor_grad, full_grad).tolist() == [0.75, -2.0]


def test_weight_decay_acts_on_the_weight():
    assert bc.with_weight_decay(torch.tensor([1.0]), torch.tensor([2.0]), 0.25).tolist() == [1.5]


def test_momentum_buffer_is_momentum_times_buffer_plus_direction():
    assert bc.momentum_step(torch.tensor([2.0]), torch.tensor([1.0]), 0.5).tolist() == [2.0]


# -- nearest rounding ----------------------------------------------------------------------------------

def test_nearest_rounding_rounds_half_up():
    x = torch.tensor([2.5, -2.5, -0.5, 0.5, 2.4999, -2.5001, 0.0, 7.0])
    expected = [3.0, -2.0, 0.0, 1.0, 2.0, -3.0, 0.0, 7.0]
    assert bc.round_to_grid(x, 8, "nearest", None).tolist() == expected


@PROPERTY
@given(values=float32_values(-200.0, 200.0), bits=EXACT_BITS)
def test_nearest_rounding_is_floor_of_x_plus_half_then_clamp(values, bits):
    x = torch.tensor(values, dtype=torch.float32)
    low, high = bc.offset_bounds(bits)
    expected = np.clip(np.floor(x.numpy() + np.float32(0.5)), low, high)
    np.testing.assert_array_equal(bc.round_to_grid(x, bits, "nearest", None).numpy(), expected)


@PROPERTY
@given(bits=EXACT_BITS, data=st.data())
def test_nearest_rounding_leaves_grid_points_unchanged(bits, data):
    low, high = bc.offset_bounds(bits)
    grid = data.draw(st.lists(st.integers(low, high), min_size=1, max_size=16))
    x = torch.tensor(grid, dtype=torch.float32)
    assert bc.round_to_grid(x, bits, "nearest", None).tolist() == [float(v) for v in grid]


@PROPERTY
@given(values=float32_values(), bits=EXACT_BITS)
def test_nearest_rounding_is_idempotent(values, bits):
    once = bc.round_to_grid(torch.tensor(values, dtype=torch.float32), bits, "nearest", None)
    assert torch.equal(bc.round_to_grid(once, bits, "nearest", None), once)


# -- both roundings: integers in range ----------------------------------------------------------------------

@PROPERTY
@given(values=float32_values(-1e7, 1e7), bits=EXACT_BITS, rounding=st.sampled_from(bc.ROUNDINGS),
       seed=st.integers(0, 2 ** 32 - 1))
def test_rounding_gives_integers_within_the_bounds(values, bits, rounding, seed):
    rounded = bc.round_to_grid(torch.tensor(values, dtype=torch.float32), bits, rounding, key(seed))
    low, high = bc.offset_bounds(bits)
    assert torch.equal(rounded, torch.floor(rounded))
    assert bool(((rounded >= low) & (rounded <= high)).all())


@PROPERTY
@given(values=float32_values(-1e7, 1e7), bits=EXACT_BITS, rounding=st.sampled_from(bc.ROUNDINGS),
       seed=st.integers(0, 2 ** 32 - 1))
def test_offset_step_gives_offsets_within_the_bounds(values, bits, rounding, seed):
    offset = torch.zeros(len(values), dtype=bc.offset_dtype(bits))
    moved = bc.offset_step(offset, torch.tensor(1.0), torch.tensor(values), 1.0, bits, rounding, key(seed))
    low, high = bc.offset_bounds(bits)
    assert moved.dtype == offset.dtype
    assert bool(((moved >= low) & (moved <= high)).all())


@PROPERTY
@given(bits=st.integers(4, 16), rounding=st.sampled_from(bc.ROUNDINGS), seed=st.integers(0, 2 ** 32 - 1),
       scale=st.floats(1e-4, 1e2), anchor=st.floats(-10.0, 10.0), data=st.data())
def test_dequantize_of_quantize_is_within_one_grid_step(bits, rounding, seed, scale, anchor, data):
    low, high = bc.offset_bounds(bits)
    # Values the grid can reach: anchor + scale * [low, high].
    units = data.draw(st.lists(st.floats(float(low), float(high)), min_size=1, max_size=16))
    a = torch.full((len(units),), anchor, dtype=torch.float32)
    d = torch.tensor(scale, dtype=torch.float32)
    x = a + d * torch.tensor(units, dtype=torch.float32)
    offset = bc.round_to_grid((x - a) / d, bits, rounding, key(seed)).to(bc.offset_dtype(bits))
    error = (bc.dequantize(a, offset, d) - x).abs()
    # One grid step, plus float32 rounding of x, anchor and d * offset.
    slack = 1e-5 * (abs(anchor) + scale * 2 ** (bits - 1))
    bound = (0.5 if rounding == "nearest" else 1.0) * scale + slack
    assert float(error.max()) <= bound


# -- stochastic rounding --------------------------------------------------------------------------------

@pytest.mark.parametrize("x", [0.1, 0.5, 0.73, -1.3, 5.999, -0.02])
def test_stochastic_rounding_is_unbiased_over_elements(x):
    n = 20000
    rounded = bc.round_to_grid(torch.full((n,), x), 8, "stochastic", key(12345))
    p = x - math.floor(x)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(float(rounded.double().mean()) - x) < 5 * sigma + 1e-6


@pytest.mark.parametrize("x", [0.25, -2.6])
def test_stochastic_rounding_is_unbiased_over_steps(x):
    """The same entry rounded at successive steps, with the keys the training step uses."""
    steps = 4000
    values = torch.full((3,), x)
    rounded = torch.stack([bc.round_to_grid(values, 8, "stochastic", bc.rounding_key(c, 0))
                           for c in range(steps)])
    p = x - math.floor(x)
    sigma = math.sqrt(p * (1 - p) / steps)
    for entry in range(3):
        assert abs(float(rounded[:, entry].double().mean()) - x) < 5 * sigma


@PROPERTY
@given(values=float32_values(-100.0, 100.0), seed=st.integers(0, 2 ** 32 - 1))
def test_stochastic_rounding_goes_to_a_neighbouring_grid_point(values, seed):
    x = torch.tensor(values, dtype=torch.float32)
    rounded = bc.round_to_grid(x, 16, "stochastic", key(seed))
    floor = torch.floor(x)
    assert bool(((rounded == floor) | (rounded == floor + 1)).all())


@PROPERTY
@given(bits=EXACT_BITS, seed=st.integers(0, 2 ** 32 - 1), data=st.data())
def test_stochastic_rounding_leaves_grid_points_unchanged(bits, seed, data):
    # Every integer a float32 holds exactly (|k| <= 2**23 here): k + U alone would round up to k + 1 for U near 1.
    low, high = bc.offset_bounds(bits)
    grid = data.draw(st.lists(st.integers(low, high), min_size=1, max_size=16))
    rounded = bc.round_to_grid(torch.tensor(grid, dtype=torch.float32), bits, "stochastic", key(seed))
    assert rounded.tolist() == [float(v) for v in grid]


def test_stochastic_rounding_is_deterministic_for_the_same_key():
    x = torch.linspace(-5, 5, 1000)
    first = bc.round_to_grid(x, 8, "stochastic", key(42))
    assert torch.equal(first, bc.round_to_grid(x.clone(), 8, "stochastic", key(42)))


def test_stochastic_rounding_differs_for_different_keys():
    x = torch.linspace(-5, 5, 1000) + 0.5   # mostly off the grid
    assert not torch.equal(bc.round_to_grid(x, 8, "stochastic", key(42)),
                           bc.round_to_grid(x, 8, "stochastic", key(43)))


def training_key(seed, step, tensor_index):
    """The key the training step uses: its counter starts at ``seed << 32`` and advances by one per step."""
    return bc.rounding_key((seed << 32) + step, tensor_index)


def test_tensor_hash_is_the_python_hash_on_all_32_bits():
    """Keys are hashed in Python and elements in int32 tensors: the two must be one function."""
    values = [0, 1, 0xFFFF, 0x10000, 2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1] + list(range(12345, 2 ** 32, 2 ** 32 // 997))
    hashed = bc._hash32(torch.tensor([bc._as_int32(v) for v in values], dtype=torch.int32))
    assert hashed.tolist() == [bc._as_int32(bc._hash32_int(v)) for v in values]


def test_rounding_keys_vector_holds_each_tensors_key():
    keys = bc.rounding_keys((7 << 32) + 3, 5)
    assert keys.dtype == torch.int32
    assert keys.tolist() == [bc.rounding_key((7 << 32) + 3, i) for i in range(5)]


def test_rounding_keys_are_distinct_for_every_step_and_tensor():
    keys = {(step, tensor): training_key(0, step, tensor) for step in range(50) for tensor in range(4)}
    assert len(set(keys.values())) == len(keys)


def test_rounding_keys_of_different_seeds_share_no_stream():
    seed0 = {training_key(0, step, tensor) for step in range(20) for tensor in range(4)}
    seed1 = {training_key(1, step, tensor) for step in range(20) for tensor in range(4)}
    assert not seed0 & seed1


# -- uniform_noise ----------------------------------------------------------------------------------------

@PROPERTY
@given(seed=st.integers(0, 2 ** 32 - 1), shape=st.lists(st.integers(1, 7), min_size=0, max_size=3))
def test_uniform_noise_is_in_zero_one_with_the_shape_of_like(seed, shape):
    noise = bc.uniform_noise(torch.empty(shape), key(seed))
    assert noise.shape == torch.Size(shape) and noise.dtype == torch.float32
    assert bool(((noise >= 0) & (noise < 1)).all())


def test_uniform_noise_fills_every_tenth_of_zero_one_evenly():
    n = 50000
    noise = bc.uniform_noise(torch.empty(n), key(2024)).numpy()
    counts, _ = np.histogram(noise, bins=10, range=(0.0, 1.0))
    expected, sigma = n / 10, math.sqrt(n * 0.1 * 0.9)
    assert np.all(np.abs(counts - expected) < 5 * sigma), counts


# -- saturated_fractions ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", ALL_BITS)
def test_saturated_fractions_count_entries_at_either_bound_per_tensor(bits):
    low, high = bc.offset_bounds(bits)
    dtype = bc.offset_dtype(bits)
    offsets = [torch.tensor([low, high, low + 1, high - 1], dtype=dtype), torch.zeros(0, dtype=dtype),
               torch.tensor([[high, 0], [0, 0]], dtype=dtype)]
    assert bc.saturated_fractions(offsets, bits).tolist() == [0.5, 0.0, 0.25]


def test_saturated_fractions_of_full_precision_offsets_are_zero():
    assert bc.saturated_fractions([torch.full((3,), 1e9)], None).tolist() == [0.0]


def test_stochastic_rounding_keeps_grid_points_even_for_noise_just_below_one():
    """512 + (1 - 2**-24) is 513 in float32: the rounding must not add the noise to the integer part."""
    grid = torch.arange(-2 ** 12, 2 ** 12, dtype=torch.float32)
    for seed in range(64):
        assert torch.equal(bc.round_to_grid(grid, 16, "stochastic", key(seed)), grid)


@pytest.mark.parametrize("shape", [(7,), (5, 6), (3, 4, 2, 2)])
def test_underflow_fraction_counts_the_steps_below_half_a_grid_step_whatever_the_shape(shape):
    offset = torch.zeros(shape, dtype=torch.int8)
    moved = torch.linspace(-1, 1, math.prod(shape)).view(shape)
    below = int((moved.abs() < 0.5).sum())
    assert 0 < below < moved.numel()
    assert bc.underflow_fraction(offset, moved, 8).item() == torch.tensor(below / moved.numel()).item()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("shape", [(), (7,), (5, 6), (3, 4, 2, 2)])
def test_all_finite_finds_one_nonfinite_element_in_a_tensor_of_any_shape(shape, bad):
    clean = torch.ones(shape)
    dirty = clean.clone()
    dirty.view(-1)[-1] = bad
    assert bool(bc.all_finite(torch.tensor(1.0), clean))
    assert not bool(bc.all_finite(torch.tensor(1.0), dirty))
    assert not bool(bc.all_finite(dirty, clean))
