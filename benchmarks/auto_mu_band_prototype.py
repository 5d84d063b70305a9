"""A research prototype for issue 14, not the library's rule: one mu per step moved by an underflow band.

    python benchmarks/auto_mu_band_prototype.py --runs band --out docs/results/auto_mu/band_prototype/band.csv

The telemetry at fixed mus (``docs/examples.md``, "The telemetry at fixed mus")
puts every example's best 4-bit grid at about 96-100 % underflow. This script
trains the examples under ``mu="auto"`` with the library's rule replaced, in
this process only, by one built on that band:

* all tensors share one mu, moved by the step's size-weighted saturation ``s``
  and underflow ``f``: halved when ``f < 0.95`` or ``s > 0.25``, doubled when
  ``f > 0.99`` and ``s <= 0.05``, within the library's bounds;
* ``--runs band_from_best`` starts it at each example's best fixed mu instead of
  the 4-bit default (4);
* ``--runs band_with_probes`` adds three recenters early in the first epoch,
  each ``ceil(T/8)`` steps after the last, so the rule can leave the default
  before a whole epoch is spent there.

The replacement patches ``halp_fx.training_step`` (``next_mus``) and, for the
probes, ``TrainingStep.__call__`` and ``halp_fx.recenter.first_mu``; nothing in
the library changes. One CSV row per (runs, example, bits, seed): the example's
own metric and the mus its tensors ended with.
"""
import argparse
import contextlib
import csv
import importlib
import math
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import write_csv  # noqa: E402
from halp_fx import bit_centering, recenter, training_step  # noqa: E402

UNDERFLOW_BAND = (0.95, 0.99)
SATURATED_ABOVE, REFINE_SATURATED_AT_MOST = 0.25, 0.05
PROBES, PROBE_FRACTION = 3, 8

# name: (the example's module, its metric column, its arguments for one HALP run under mu="auto" at `bits`
# with `seed`)
EXAMPLES = {
    "regression": ("regression", "final_distance", lambda bits, seed: ["--bits", str(bits), "--seed", str(seed)]),
    "digits": ("digits", "test_accuracy", lambda bits, seed: ["--sweep-bits", str(bits), "--seed", str(seed)]),
    "char_lstm": ("char_lstm", "val_perplexity", lambda bits, seed: ["--bits", str(bits), "--seed", str(seed)]),
    "fashion_mnist": ("fashion_mnist", "test_accuracy",
                      lambda bits, seed: ["--sweep-bits", str(bits), "--seed", str(seed)]),
    "fashion_mnist_full": ("fashion_mnist", "test_accuracy",
                           lambda bits, seed: ["--full", "--sweep-bits", str(bits), "--seed", str(seed)]),
}
BEST_FIXED_MU_AT_4_BITS = {"regression": 2.0, "digits": 8.0, "char_lstm": 1.0, "fashion_mnist": 4.0,
                           "fashion_mnist_full": 4.0}
# The runs docs/examples.md quotes: (example, bits, seeds) per set.
RUNS = {
    "band": [("regression", 4, [0]), ("digits", 4, range(5)), ("char_lstm", 4, range(4)),
             ("fashion_mnist", 4, [0])],
    "band_from_best": [("digits", 4, range(4)), ("char_lstm", 4, range(2))],
    "band_with_probes": [("regression", 4, [0]), ("digits", 4, range(5)), ("char_lstm", 4, range(10)),
                         ("fashion_mnist", 4, [0]), ("regression", 8, [0]), ("digits", 8, range(5)),
                         ("char_lstm", 8, range(3)), ("fashion_mnist_full", 4, [0])],
}


def band_factor(saturated, underflow):
    """The prototype's move: 1/2, 2 or 1."""
    if saturated > SATURATED_ABOVE or underflow < UNDERFLOW_BAND[0]:
        return 0.5
    if saturated <= REFINE_SATURATED_AT_MOST and underflow > UNDERFLOW_BAND[1]:
        return 2.0
    return 1.0


def band_next_mus(mus, offsets, underflow_sums, steps, bits):
    """``recenter.next_mus``'s signature; one move for all tensors, from their size-weighted telemetry."""
    if steps == 0:
        return list(mus)
    sizes = [z.numel() for z in offsets]
    underflow = recenter.underflow_fractions(underflow_sums, steps)
    saturated = bit_centering.saturated_fractions(list(offsets), bits[0]).tolist()

    def weighted(values):
        return sum(v * n for v, n in zip(values, sizes)) / sum(sizes)
    factor = band_factor(weighted(saturated), weighted(underflow))
    low, high = recenter.AUTO_MU_BOUNDS
    return [min(max(mu * factor, low), high) for mu in mus]


@contextlib.contextmanager
def band_rule(first=None, probes=False):
    """The prototype in place of the library's rule while the block runs."""
    saved = training_step.next_mus, recenter.first_mu, training_step.TrainingStep.__call__
    training_step.next_mus = band_next_mus
    if first is not None:
        recenter.first_mu = lambda bits: first
    if probes:
        call = saved[2]

        def with_probes(step, *batch):
            state = step.state
            due = max(1, math.ceil(step.T / PROBE_FRACTION)) if step.T else None
            if state.auto_mu and due and 1 <= state.recenters <= PROBES and state.steps_since_recenter >= due:
                step.recenter()
            return call(step, *batch)
        training_step.TrainingStep.__call__ = with_probes
    try:
        yield
    finally:
        training_step.next_mus, recenter.first_mu, training_step.TrainingStep.__call__ = saved


def run_one(example, bits, seed, extra_args, out):
    """Train ``example``'s HALP once under ``mu="auto"``; return its metric and final mus."""
    module, metric, arguments = EXAMPLES[example]
    importlib.import_module(module).main(["--sweep-mu", "auto", *arguments(bits, seed), *extra_args, "--out", out])
    with open(os.path.join(out, "mu_sweep.csv"), newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("bits", str(bits)) == str(bits)]
    return float(row[metric]), row.get("final_mus", "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", choices=sorted(RUNS), required=True, help="which set of runs")
    parser.add_argument("--examples", default=",".join(EXAMPLES),
                        help=f"comma-separated subset of {', '.join(EXAMPLES)} (default: all)")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST's folder")
    parser.add_argument("--example-args", default="", help="more arguments for every example (tests shorten runs)")
    parser.add_argument("--out", required=True, help="the CSV to write")
    args = parser.parse_args(argv)
    wanted = args.examples.split(",")
    rows = []
    for example, bits, seeds in RUNS[args.runs]:
        if example not in wanted:
            continue
        extra = args.example_args.split() + (["--data", args.data] if example.startswith("fashion_mnist") else [])
        first = BEST_FIXED_MU_AT_4_BITS[example] if args.runs == "band_from_best" else None
        for seed in seeds:
            with band_rule(first=first, probes=args.runs == "band_with_probes"), \
                    tempfile.TemporaryDirectory() as out:
                value, final_mus = run_one(example, bits, seed, extra, out)
            rows.append({"runs": args.runs, "example": example, "bits": bits, "seed": seed,
                         "metric": EXAMPLES[example][1], "value": value, "final_mus": final_mus})
            print(rows[-1], flush=True)
    write_csv(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
