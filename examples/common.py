"""Small helpers the examples share: the low-precision SGD baseline, CSV, plots and the results table.

Each example reads top to bottom on its own; this file only holds what would
otherwise be copied into every one of them.
"""
import csv
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from halp_fx import bit_centering  # noqa: E402


class LowPrecisionSGD:
    """SGD whose weights live on a fixed integer grid: ``W = d * Z``, ``Z`` a ``bits``-bit integer.

    The baseline HALP improves on. The grid never moves (no anchor, no
    recentering), so once ``lr * grad`` is smaller than ``d`` the weights only
    jitter around the optimum: the noise floor of low-precision SGD. The update
    ``Z <- Q(Z - lr * grad / d)`` is halp_fx's own stochastic rounding
    (:func:`halp_fx.bit_centering.round_to_grid`), not a second quantizer.

    ``grid_range``: the grid of every tensor covers ``[-grid_range, grid_range]``;
    ``None`` sizes each tensor's grid from its initial values: ``range_factor``
    times their largest magnitude (``[-1, 1]`` for a tensor that starts at zero).
    """

    def __init__(self, params, lr, bits=8, grid_range=None, range_factor=4.0, seed=0):
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.bits = lr, bits
        high = bit_centering.offset_bounds(bits)[1]
        self.scales = []
        for p in self.params:
            extent = grid_range if grid_range is not None else range_factor * float(p.detach().abs().max())
            self.scales.append(torch.tensor((extent or 1.0) / high))
        self.counter = int(seed) << 32
        self.dtype = bit_centering.offset_dtype(bits)
        self.offsets = []
        with torch.no_grad():
            for i, (p, d) in enumerate(zip(self.params, self.scales)):
                key = bit_centering.rounding_key(self.counter, i)
                self.offsets.append(bit_centering.round_to_grid(p / d, bits, "stochastic", key).to(self.dtype))
                p.copy_(d * self.offsets[-1].float())

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self):
        self.counter += 1
        for i, (p, d) in enumerate(zip(self.params, self.scales)):
            if p.grad is None:
                continue
            key = bit_centering.rounding_key(self.counter, i)
            moved = self.offsets[i].float() - self.lr * p.grad / d
            self.offsets[i] = bit_centering.round_to_grid(moved, self.bits, "stochastic", key).to(self.dtype)
            p.copy_(d * self.offsets[i].float())


def optimizer_step(model, optimizer, loss_fn):
    """A plain PyTorch training step shaped like halp_fx's: ``step(*inputs, target)`` returns the loss and
    ``step.sync_model()`` returns the model, so a training loop treats every method alike."""
    def step(*batch):
        optimizer.zero_grad()
        loss = loss_fn(model(*batch[:-1]), batch[-1])
        loss.backward()
        optimizer.step()
        return loss.detach()
    step.sync_model = lambda: model
    return step


def write_csv(path, rows):
    """``rows``: a list of dicts with the same keys, written as one CSV with a header; floats keep 6 digits."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    return path


def plot_curves(path, rows, x, panels, title):
    """One subplot per ``(column, label, log_scale)`` in ``panels``, one line per method in ``rows``."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, (column, label, log_scale) in zip(axes[0], panels):
        for method in methods:
            points = [(r[x], r[column]) for r in rows if r["method"] == method and r[column] != ""]
            ax.plot(*zip(*points), label=method)
        ax.set_xlabel(x.replace("_", " "))
        ax.set_ylabel(label)
        if log_scale:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def print_table(rows):
    """Print a list of dicts as an aligned text table (floats with 4 significant digits)."""
    def text(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    columns = list(rows[0])
    widths = [max(len(c), *(len(text(r[c])) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(text(r[c]).ljust(w) for c, w in zip(columns, widths)))
