"""halp_fx.transform against an independent NumPy oracle (tests/numpy_reference.py).

Both run the same schedule: batch size 1, samples in a fixed order, ``epochs``
passes, recentering over the whole data set at the first step and then every
``T`` steps, nearest rounding (deterministic, so the trajectories can agree
exactly), eager graphs (``compile=False``).

Tolerances: ``rtol=1e-4`` on the final weights, and ``atol=1e-6`` for entries
near zero (a bias can end near 0, where a relative bound means nothing). The
weights are O(0.1..1); float32 arithmetic in halp_fx differs from the float64
oracle by ~1e-7 relative per operation, a few ulps after hundreds of steps, so
1e-6 absolute is about ten float32 ulps at the weights' scale. The observed
disagreement is below 3e-7. A single 8-bit rounding that went the other way
would move a weight by one grid step ``d`` (1e-4..1e-2 here) and fail the test;
see numpy_reference's docstring on ties.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import halp_fx
import numpy_reference as ref

RTOL, ATOL = 1e-4, 1e-6
# A rounding this close to a tie (in grid steps) may go either way in float32, by the CPU's summation order. The
# bound is empirical: a 16-bit case (logistic, lr 0.1, mu 0.2) came within 4e-5 and rounded the other way on an
# AMX Xeon, not on an EPYC; the cases below clear it by 2x or more and agree on both.
NEAR_TIE = 2e-4


# -- data and models -----------------------------------------------------------------------------

def linear_regression_data(samples, features, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, features, generator=g)
    true_w = torch.randn(1, features, generator=g)
    y = X @ true_w.T + 0.5 + 0.1 * torch.randn(samples, 1, generator=g)
    return X, y


def logistic_regression_data(samples, features, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, features, generator=g)
    true_w = torch.randn(classes, features, generator=g)
    y = (X @ true_w.T + 0.5 * torch.randn(samples, classes, generator=g)).argmax(dim=1)
    return X, y


def problem(model, samples, features, classes, seed=0):
    """(torch module, loss_fn, X, y) with the module's weights drawn from ``seed``."""
    torch.manual_seed(seed)
    if model == "linear":
        X, y = linear_regression_data(samples, features, seed)
        return nn.Linear(features, 1), F.mse_loss, X, y
    X, y = logistic_regression_data(samples, features, classes, seed)
    return nn.Linear(features, classes), F.cross_entropy, X, y


def run_halp_fx(module, loss_fn, X, y, *, bits, lr, epochs, mu, T, **options):
    """Drive halp_fx the way the oracle iterates: batch size 1, samples in order, ``epochs`` passes."""
    batches = [(X[i:i + 1], y[i:i + 1]) for i in range(len(X))]
    step = halp_fx.transform(module, bits, loss_fn=loss_fn, data_loader=batches, lr=lr, T=T, mu=mu,
                             rounding="nearest", compile=False, **options)
    losses = [float(step(xb, yb)) for _ in range(epochs) for xb, yb in batches]
    return step, losses


def initial_params(module):
    return {n: p.detach().double().numpy().copy() for n, p in module.named_parameters()}


def run_oracle(model, module, X, y, **kwargs):
    return ref.halp(model, initial_params(module), X.double().numpy(), y.numpy(), **kwargs)


def assert_weights_match(step, expected):
    got = step.weights()
    assert set(got) == set(expected)
    for name in expected:
        np.testing.assert_allclose(got[name].double().numpy(), expected[name], rtol=RTOL, atol=ATOL,
                                   err_msg=f"weights of {name!r}")


# -- parity with HALP ------------------------------------------------------------------------------

# (model, samples, features, classes, lr, epochs, bits, mu, T); in these no offset reaches its bounds, and no
# rounding comes within NEAR_TIE grid steps of a half-integer.
HALP_CASES = [
    ("linear", 24, 3, None, 0.05, 3, 8, 0.5, None),      # T = data size
    ("linear", 24, 3, None, 0.05, 3, 8, 1.0, 7),         # T smaller than the data size, not a divisor
    ("linear", 32, 5, None, 0.02, 3, 16, 0.2, None),
    ("linear", 20, 4, None, 0.05, 4, 16, 1.0, 5),
    ("logistic", 24, 3, 3, 0.2, 3, 8, 0.2, None),
    ("logistic", 24, 4, 3, 0.2, 3, 8, 0.3, 6),
    ("logistic", 30, 5, 4, 0.12, 2, 16, 0.25, None),
    ("logistic", 20, 3, 4, 0.3, 3, 16, 0.3, 8),
]


@pytest.mark.parametrize("model,samples,features,classes,lr,epochs,bits,mu,T", HALP_CASES)
def test_halp_final_weights_match_numpy_reference(model, samples, features, classes, lr, epochs, bits, mu, T):
    module, loss_fn, X, y = problem(model, samples, features, classes)
    expected = run_oracle(model, module, X, y, lr=lr, epochs=epochs, bits=bits, mu=mu, T=T)
    assert expected.clamped == 0, "saturating cases belong in SATURATING_CASES"
    assert expected.closest_tie > NEAR_TIE, "a near-tie: float32 on another CPU may round it the other way"
    step, _ = run_halp_fx(module, loss_fn, X, y, bits=bits, lr=lr, epochs=epochs, mu=mu, T=T)
    assert step.recenters == expected.recenters
    assert_weights_match(step, expected.weights)


@pytest.mark.parametrize("model,samples,features,classes,lr,epochs,bits,mu,T", HALP_CASES[:2] + HALP_CASES[4:6])
def test_halp_state_matches_numpy_reference(model, samples, features, classes, lr, epochs, bits, mu, T):
    """Not only W: the anchor, the integer offsets, the scale and the full gradient agree too."""
    module, loss_fn, X, y = problem(model, samples, features, classes)
    expected = run_oracle(model, module, X, y, lr=lr, epochs=epochs, bits=bits, mu=mu, T=T)
    step, _ = run_halp_fx(module, loss_fn, X, y, bits=bits, lr=lr, epochs=epochs, mu=mu, T=T)
    for name in expected.weights:
        np.testing.assert_array_equal(step.offset[name].numpy(), expected.offset[name].astype(np.int64))
        np.testing.assert_allclose(step.anchor[name].double().numpy(), expected.anchor[name], rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose(float(step.scale[name]), expected.scale[name], rtol=RTOL)
        np.testing.assert_allclose(step.full_grad[name].double().numpy(), expected.full_grad[name],
                                   rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("model,classes,lr", [("linear", None, 0.02), ("logistic", 3, 0.05)])
def test_halp_with_momentum_and_weight_decay_matches_numpy_reference(model, classes, lr):
    module, loss_fn, X, y = problem(model, 24, 4, classes)
    kwargs = dict(lr=lr, epochs=3, bits=8, mu=0.5, T=10, momentum=0.5, weight_decay=0.01)
    expected = run_oracle(model, module, X, y, **kwargs)
    step, _ = run_halp_fx(module, loss_fn, X, y, **kwargs)
    assert_weights_match(step, expected.weights)


# (model, samples, features, classes, lr, epochs, bits, mu, T): the grid's range ||G||/mu is too
# narrow for the steps, so offsets hit the bounds and the clamp decides the result.
SATURATING_CASES = [
    ("linear", 20, 4, None, 0.1, 2, 4, 4.0, 10),
    ("logistic", 20, 3, 4, 0.3, 3, 16, 1.0, 8),
]


@pytest.mark.filterwarnings("ignore::halp_fx.SaturationWarning")
@pytest.mark.parametrize("model,samples,features,classes,lr,epochs,bits,mu,T", SATURATING_CASES)
def test_halp_saturating_offsets_match_numpy_reference(model, samples, features, classes, lr, epochs, bits, mu, T):
    module, loss_fn, X, y = problem(model, samples, features, classes)
    expected = run_oracle(model, module, X, y, lr=lr, epochs=epochs, bits=bits, mu=mu, T=T)
    assert expected.clamped > 0, "the case must exercise saturation"
    step, _ = run_halp_fx(module, loss_fn, X, y, bits=bits, lr=lr, epochs=epochs, mu=mu, T=T)
    assert_weights_match(step, expected.weights)


@pytest.mark.parametrize("model,classes", [("linear", None), ("logistic", 3)])
def test_per_step_losses_match_numpy_reference(model, classes):
    module, loss_fn, X, y = problem(model, 20, 3, classes)
    kwargs = dict(lr=0.05, epochs=2, bits=8, mu=0.5, T=6)
    expected = run_oracle(model, module, X, y, **kwargs)
    _, losses = run_halp_fx(module, loss_fn, X, y, **kwargs)
    np.testing.assert_allclose(losses, expected.losses, rtol=RTOL, atol=ATOL)


# -- parity with full-precision SVRG -----------------------------------------------------------------

SVRG_CASES = [
    ("linear", 24, 3, None, 0.05, 3, None),
    ("linear", 20, 5, None, 0.05, 3, 7),
    ("logistic", 24, 4, 3, 0.2, 3, None),
    ("logistic", 20, 3, 4, 0.2, 3, 6),
]


@pytest.mark.parametrize("model,samples,features,classes,lr,epochs,T", SVRG_CASES)
def test_svrg_final_weights_match_numpy_reference(model, samples, features, classes, lr, epochs, T):
    module, loss_fn, X, y = problem(model, samples, features, classes)
    expected = run_oracle(model, module, X, y, lr=lr, epochs=epochs, bits=None, mu=0.5, T=T)
    step, _ = run_halp_fx(module, loss_fn, X, y, bits=None, lr=lr, epochs=epochs, mu=0.5, T=T)
    assert all(z.dtype == torch.float32 for z in step.offset.values())
    assert_weights_match(step, expected.weights)


# -- HALP converges ----------------------------------------------------------------------------------

def test_halp_8bit_linear_regression_converges_linearly_to_least_squares_optimum():
    """HALP's claim: with a fixed lr, low-precision offsets still converge linearly (SGD would stall at a noise floor)."""
    module, loss_fn, X, y = problem("linear", 32, 4, None, seed=1)
    Xd, yd = X.double().numpy(), y.double().numpy()
    optimum = ref.least_squares_optimum(Xd, yd)

    def distance(params):
        return float(np.sqrt(sum(np.sum((np.asarray(params[k], dtype=np.float64) - optimum[k]) ** 2)
                                 for k in optimum)))

    def excess_loss(params):
        params = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
        return ref.linear_regression_loss(params, Xd, yd) - ref.linear_regression_loss(optimum, Xd, yd)

    start = initial_params(module)
    batches = [(X[i:i + 1], y[i:i + 1]) for i in range(len(X))]
    step = halp_fx.transform(module, 8, loss_fn=loss_fn, data_loader=batches, lr=0.02, mu=1.0,
                             rounding="nearest", compile=False)
    distances = [distance(start)]
    for _ in range(8):
        for xb, yb in batches:
            step(xb, yb)
        distances.append(distance({k: w.numpy() for k, w in step.weights().items()}))
    ratios = np.array(distances[1:]) / np.array(distances[:-1])
    assert np.all(ratios < 0.75), f"distance to the optimum per epoch: {distances}"
    final = {k: w.numpy() for k, w in step.weights().items()}
    assert distances[-1] < 0.02 * distances[0]
    assert 0 <= excess_loss(final) < 1e-3 * excess_loss(start)
