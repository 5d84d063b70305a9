"""An independent NumPy oracle for HALP and full-precision SVRG, written from the algorithm, not from halp_fx.

It covers the two models whose gradients are short enough to write by hand:

* linear regression: ``nn.Linear(d, 1)`` with ``F.mse_loss(output, target)``,
  output and target of shape ``(n, 1)``: ``loss = mean((X w^T + b - y)^2)``;
* multi-class logistic regression: ``nn.Linear(d, c)`` with ``F.cross_entropy``
  on integer targets: ``loss = mean(-log softmax(X W^T + b)[y])``.

Parameters are a dict ``{"weight": (out, in), "bias": (out,)}``, named as
``nn.Linear`` names them, so results compare key by key with ``step.weights()``.

The algorithm (De Sa et al. 2018, "High-Accuracy Low-Precision Training"), per
trainable tensor p with anchor ``A``, integer offset ``Z`` and scale ``d``, and
weight ``W = A + d * Z``:

* recenter, at the start of the first step and then at the start of a step once
  ``T`` inner steps have run since the last recenter:
  ``A <- A + d*Z``; ``G = grad of the mean loss over the whole data set at A``;
  ``d = ||G||_2 / (mu * (2**(b-1) - 1))`` (``d = 0`` where ``G == 0``); ``Z <- 0``.
* inner step on batch B: ``u = grad_B(W) - grad_B(A) + G`` (``+ wd * W``);
  with momentum ``v <- m*v + u`` and the step follows ``v``;
  ``Z <- clamp(round(Z - lr * u / d), -2**(b-1), 2**(b-1) - 1)`` with
  ``round(x) = floor(x + 0.5)`` ("nearest"). A tensor with ``d == 0`` keeps ``Z``.
* ``bits=None`` is full-precision SVRG: ``d = 1``, no rounding, ``Z <- Z - lr*u``.

Precision: the oracle computes in float64 by default. float64 is the "exact"
answer the float32 implementation approximates; its own rounding error is ~1e-16,
so any disagreement beyond float32 noise (rtol ~1e-6 per op) is the
implementation's. The one place float64 cannot follow float32 is the rounding of
a value that lands within float32 noise of a half-integer (``k + 0.5``): there
the two could round to neighbouring integers and the trajectories would part by
a whole grid step. ``Result.closest_tie`` records how close any rounding came,
and the parity tests use only cases where it stays above 2e-4 grid steps
(``NEAR_TIE``; one case at 4e-5 rounded the other way on one CPU and not on
another); there halp_fx's weights agree with this oracle to 3e-7, and
``dtype=np.float32`` runs the same code in float32 for such an investigation (a
float32 oracle cannot reproduce torch's summation order either, so float64 is
the cleaner reference).
"""
import numpy as np


# -- the two models: loss and hand-written gradients -------------------------------------------

def linear_regression_loss(params, X, y):
    """``mean((X w^T + b - y)^2)`` with X (n, d), y (n, 1), weight (1, d), bias (1,)."""
    residual = X @ params["weight"].T + params["bias"] - y
    return float(np.mean(residual ** 2))


def linear_regression_grad(params, X, y):
    """d/dw mean(r^2) = 2/n r^T X, d/db = 2/n sum(r), with r = X w^T + b - y of shape (n, 1)."""
    n = X.shape[0]
    residual = X @ params["weight"].T + params["bias"] - y
    return {"weight": (2.0 / n) * residual.T @ X,
            "bias": (2.0 / n) * residual.sum(axis=0)}


def _softmax(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def logistic_regression_loss(params, X, y):
    """``mean(-log softmax(X W^T + b)[y])`` with integer targets y (n,)."""
    logits = X @ params["weight"].T + params["bias"]
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    return float(-np.mean(log_probs[np.arange(len(y)), y]))


def logistic_regression_grad(params, X, y):
    """d/dW = 1/n (softmax - onehot)^T X, d/db = 1/n sum(softmax - onehot)."""
    n = X.shape[0]
    logits = X @ params["weight"].T + params["bias"]
    delta = _softmax(logits)
    delta[np.arange(n), y] -= 1.0
    return {"weight": delta.T @ X / n, "bias": delta.sum(axis=0) / n}


MODELS = {
    "linear": (linear_regression_loss, linear_regression_grad),
    "logistic": (logistic_regression_loss, logistic_regression_grad),
}


# -- HALP / SVRG -------------------------------------------------------------------------------

def offset_bounds(bits):
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_nearest(x):
    """Round half up: ``floor(x + 0.5)``."""
    return np.floor(x + 0.5)


class Result:
    """What a run leaves: final weights, the per-step losses and the state at the end."""

    def __init__(self, weights, losses, anchor, offset, scale, full_grad, recenters, clamped, closest_tie):
        self.weights, self.losses = weights, losses
        self.anchor, self.offset, self.scale, self.full_grad = anchor, offset, scale, full_grad
        self.recenters = recenters
        self.clamped = clamped   # how many offset entries, over the run, the clamp moved to a bound
        # min over all roundings of |frac(x) - 0.5| in grid units: how close a rounding came to a tie.
        self.closest_tie = closest_tie


def halp(model, params, X, y, *, lr, epochs, bits, mu, T=None, momentum=0.0, weight_decay=0.0,
         dtype=np.float64):
    """Run HALP (``bits`` an int) or full-precision SVRG (``bits=None``) with batch size 1.

    Steps go over the samples ``0..n-1`` in order, ``epochs`` times; the full
    gradient is over all ``n`` samples. ``T=None`` means ``T = n``. ``params`` is
    the initial ``{"weight", "bias"}``; it is not modified.
    """
    loss_fn, grad_fn = MODELS[model]
    X = np.asarray(X, dtype=dtype)
    y = np.asarray(y, dtype=dtype) if model == "linear" else np.asarray(y, dtype=np.int64)
    n = X.shape[0]
    T = n if T is None else T
    lr, mu, momentum, weight_decay = dtype(lr), dtype(mu), dtype(momentum), dtype(weight_decay)

    anchor = {k: np.array(v, dtype=dtype) for k, v in params.items()}
    offset = {k: np.zeros_like(v) for k, v in anchor.items()}
    scale = {k: dtype(0.0) if bits is not None else dtype(1.0) for k in anchor}
    full_grad = {k: np.zeros_like(v) for k, v in anchor.items()}
    velocity = {k: np.zeros_like(v) for k, v in anchor.items()}
    if bits is not None:
        low, high = offset_bounds(bits)

    def weights():
        return {k: anchor[k] + scale[k] * offset[k] for k in anchor}

    losses, recenters, steps_since_recenter, clamped, closest_tie = [], 0, 0, 0, np.inf
    for _ in range(epochs):
        for i in range(n):
            if recenters == 0 or steps_since_recenter >= T:
                anchor = weights()
                full_grad = grad_fn(anchor, X, y)   # the mean over all n samples
                if bits is None:
                    scale = {k: dtype(1.0) for k in anchor}
                else:
                    scale = {k: dtype(np.linalg.norm(g.ravel()) / (mu * high)) for k, g in full_grad.items()}
                offset = {k: np.zeros_like(v) for k, v in anchor.items()}
                recenters += 1
                steps_since_recenter = 0

            xb, yb = X[i:i + 1], y[i:i + 1]
            W = weights()
            losses.append(loss_fn(W, xb, yb))
            g_w, g_a = grad_fn(W, xb, yb), grad_fn(anchor, xb, yb)
            for k in anchor:
                u = g_w[k] - g_a[k] + full_grad[k]
                if weight_decay:
                    u = u + weight_decay * W[k]
                if momentum:
                    velocity[k] = momentum * velocity[k] + u
                    u = velocity[k]
                if bits is None:
                    offset[k] = offset[k] - lr * u
                elif scale[k] > 0:
                    moved = offset[k] - lr * u / scale[k]
                    closest_tie = min(closest_tie, float(np.min(np.abs(moved - np.floor(moved) - 0.5))))
                    rounded = round_nearest(moved)
                    clamped += int(np.sum((rounded < low) | (rounded > high)))
                    offset[k] = np.clip(rounded, low, high)
                # scale == 0 (zero full gradient): the offset stays where it is.
            steps_since_recenter += 1

    return Result(weights(), losses, anchor, offset, scale, full_grad, recenters, clamped, closest_tie)


def least_squares_optimum(X, y):
    """The (w, b) minimizing mean((X w^T + b - y)^2), from lstsq on [X, 1] in float64."""
    X = np.asarray(X, dtype=np.float64)
    design = np.hstack([X, np.ones((X.shape[0], 1))])
    solution, *_ = np.linalg.lstsq(design, np.asarray(y, dtype=np.float64).reshape(-1), rcond=None)
    return {"weight": solution[:-1].reshape(1, -1), "bias": solution[-1:]}
