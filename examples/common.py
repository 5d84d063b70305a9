"""Small helpers the examples share: the low-precision SGD baseline, CSV, plots and the results table.

Each example reads top to bottom on its own; this file only holds what would
otherwise be copied into every one of them.
"""
import csv
import logging
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

import halp_fx  # noqa: E402
from halp_fx import bit_centering  # noqa: E402


def mu_value(text):
    """``--mu``'s type: ``"auto"`` (halp_fx chooses each tensor's mu at every recenter) or a number."""
    return text if text == "auto" else float(text)


def mu_label(mu):
    return mu if isinstance(mu, str) else f"{mu:g}"


def show_halp_fx_log():
    """Print halp_fx's INFO lines (the start and the end of each Inductor compile, which can take minutes) on
    stderr, so a run with ``--compile`` does not look stuck; other libraries stay at their default level. A level
    already more verbose (DEBUG, set by a caller such as ``benchmarks/auto_mu_telemetry.py``) is kept."""
    logging.basicConfig(format="%(message)s")
    logger = logging.getLogger("halp_fx")
    if not logger.level or logger.level > logging.INFO:
        logger.setLevel(logging.INFO)


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


def classification_methods(args, batches):
    """The image classifiers' five methods as ``(name, make_step)``, ``make_step(model)`` building a fresh training
    step, and ``halp(bits, mu)``, the HALP builder a mu sweep calls. ``batches`` feed HALP's full gradient."""
    def halp(bits, mu, arithmetic="fp32", anchor_precision="fp32"):
        return lambda model: halp_fx.transform(model, bits, loss_fn=F.cross_entropy, data_loader=batches, lr=args.lr,
                                               T=args.T, mu=mu, compile=args.compile, arithmetic=arithmetic,
                                               anchor_precision=anchor_precision)

    def sgd(model):
        return optimizer_step(model, torch.optim.SGD(model.parameters(), lr=args.lr), F.cross_entropy)

    def lp_sgd(model):
        optimizer = LowPrecisionSGD(model.parameters(), args.lr, bits=8, range_factor=args.lp_range_factor)
        return optimizer_step(model, optimizer, F.cross_entropy)

    methods = [("SGD", sgd), ("LP-SGD 8-bit", lp_sgd), ("SVRG", halp(None, args.mu)),
               ("HALP 8-bit", halp(8, args.mu)), ("HALP 4-bit", halp(4, args.mu4))]
    if getattr(args, "int8", False):
        methods += [("HALP 8-bit int8", halp(8, args.mu, "int8")),
                    ("HALP 8-bit int8 bf16-anchor", halp(8, args.mu, "int8", "bf16"))]
    return methods, halp


def train_classifier(name, step, train_data, test_data, args, evaluate):
    """``args.epochs`` passes of ``step`` over shuffled batches of ``train_data``; after each, ``evaluate(model, x, y)``
    -> (loss, accuracy) on the training and test sets. Returns (one row per epoch, a summary row)."""
    (x, y), n = train_data, len(train_data[1])
    order = torch.Generator().manual_seed(args.seed)
    rows, seconds, first_step = [], 0.0, None
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        permutation = torch.randperm(n, generator=order)
        for i in tqdm(range(0, n - args.batch_size + 1, args.batch_size), desc=f"{name} epoch {epoch}", leave=False):
            batch = permutation[i:i + args.batch_size]
            step(x[batch], y[batch])
            if first_step is None:
                first_step = time.perf_counter() - start
        seconds += time.perf_counter() - start
        train_loss, _ = evaluate(step.sync_model(), x, y)
        test_loss, test_accuracy = evaluate(step.sync_model(), *test_data)
        rows.append({"method": name, "epoch": epoch, "train_loss": train_loss, "test_loss": test_loss,
                     "test_accuracy": test_accuracy, "seconds": seconds})
    summary = {"method": name, "test_accuracy": rows[-1]["test_accuracy"], "train_loss": rows[-1]["train_loss"],
               "seconds": seconds, "first_step_seconds": first_step}
    return rows, summary


def saturated_fraction(step):
    """The fraction of all offset entries at the integer bounds: near 1, mu is too large for the steps taken."""
    at_bounds = sum(s["saturated"] * step.offset[n].numel() for n, s in step.stats().items())
    return at_bounds / sum(z.numel() for z in step.offset.values())


def final_mus(step):
    """The distinct mus the step's tensors ended with, e.g. ``"2/4/8"`` (one value with a numeric mu)."""
    return "/".join(f"{mu:g}" for mu in sorted({s["mu"] for s in step.stats().values()}))


def sweep_mu(args, halp, run):
    """HALP at 8 and 4 bits (``args.sweep_bits`` where an example has it) once per mu of ``args.sweep_mu``;
    ``run(name, make_step)`` trains and returns (summary row, step). Prints the table and returns its rows;
    ``mu_sweep.csv`` is rewritten after every run, so a long sweep that is stopped keeps what it measured."""
    sweep = []
    for bits in getattr(args, "sweep_bits", None) or (8, 4):
        for mu in [mu_value(m) for m in args.sweep_mu.split(",")]:
            summary, step = run(f"HALP {bits}-bit mu={mu_label(mu)}", halp(bits, mu))
            sweep.append({"bits": bits, "mu": mu_label(mu), "test_accuracy": summary["test_accuracy"],
                          "train_loss": summary["train_loss"], "saturated": saturated_fraction(step),
                          "final_mus": final_mus(step), "seconds": summary["seconds"]})
            path = write_csv(os.path.join(args.out, "mu_sweep.csv"), sweep)
    print_table(sweep)
    print("wrote", path)
    return sweep


def compare_classifiers(label, args, make_model, train_data, test_data, evaluate, title, after=None):
    """Train ``make_model()`` with each of the five methods (or, with ``--sweep-mu``, HALP at each mu); print the
    table, write ``summary.csv``, ``curves.csv`` and ``curves.png`` (titled ``title``) under ``args.out``.
    ``after(name, step)`` runs once each method has trained. Returns the summary rows (or the sweep's rows)."""
    x, y = train_data
    # The full gradient's batches: the training set in a fixed order, all of one shape. A short last batch is
    # dropped, as the training steps drop it: on a batch-norm model its statistics would pull the full gradient
    # away from the steps' gradients (halp_fx warns, SmallBatchWarning).
    batches = [(x[i:i + args.batch_size], y[i:i + args.batch_size])
               for i in range(0, len(y) - args.batch_size + 1, args.batch_size)]
    print(f"{label}: {len(y)} train / {len(test_data[1])} test images, {len(batches)} batches of {args.batch_size}")
    methods, halp = classification_methods(args, batches)
    only = getattr(args, "methods", None)
    if only:
        unknown = set(only) - {name for name, _ in methods}
        if unknown:
            raise SystemExit(f"--methods: unknown {sorted(unknown)}; choose from {[name for name, _ in methods]}")
        methods = [(name, make_step) for name, make_step in methods if name in only]

    def run(name, make_step):
        torch.manual_seed(args.seed)
        step = make_step(make_model())
        rows, summary = train_classifier(name, step, train_data, test_data, args, evaluate)
        return rows, summary, step

    if args.sweep_mu:
        return sweep_mu(args, halp, lambda name, make_step: run(name, make_step)[1:])
    curves, table = [], []
    for name, make_step in methods:
        rows, summary, step = run(name, make_step)
        curves += rows
        table.append(summary)
        if after is not None:
            after(name, step)
    print_table(table)
    write_csv(os.path.join(args.out, "summary.csv"), table)
    write_csv(os.path.join(args.out, "curves.csv"), curves)
    plot_curves(os.path.join(args.out, "curves.png"), curves, "epoch",
                [("train_loss", "training loss", True), ("test_accuracy", "test accuracy (%)", False)], title)
    print(f"wrote {args.out}/curves.png, curves.csv and summary.csv")
    return table


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
