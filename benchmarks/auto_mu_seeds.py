"""Train one example's HALP under ``mu="auto"`` at one width over several seeds: the auto column of docs/examples.md's table.

    python benchmarks/auto_mu_seeds.py --example digits --bits 4 --seeds 0,1,2,3,4 \
        --out docs/results/auto_mu/digits_4bit_auto.csv

Each run is the example's own ``main`` with ``--sweep-mu auto`` (HALP only, no
sweep), so the figures are the ones its ``mu_sweep.csv`` gives. One CSV row per
seed: the example's row (its metric, and ``final_mus`` where it writes them)
with ``example``, ``bits`` and ``seed`` in front, and a last row ``mean`` of the
metric over the seeds.
"""
import argparse
import csv
import importlib
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)

from common import write_csv  # noqa: E402

# name: (the example's module, its metric column, its arguments for one HALP run at `bits` with `seed`)
EXAMPLES = {
    "regression": ("regression", "final_distance", lambda bits, seed: ["--bits", str(bits), "--seed", str(seed)]),
    "digits": ("digits", "test_accuracy", lambda bits, seed: ["--sweep-bits", str(bits), "--seed", str(seed)]),
    "char_lstm": ("char_lstm", "val_perplexity", lambda bits, seed: ["--bits", str(bits), "--seed", str(seed)]),
    "fashion_mnist": ("fashion_mnist", "test_accuracy",
                      lambda bits, seed: ["--sweep-bits", str(bits), "--seed", str(seed)]),
    "fashion_mnist_full": ("fashion_mnist", "test_accuracy",
                           lambda bits, seed: ["--full", "--sweep-bits", str(bits), "--seed", str(seed)]),
}


def run_one(example, bits, seed, extra_args, out):
    """Train ``example``'s HALP once under ``mu="auto"``; return the row of its ``mu_sweep.csv``."""
    module, _, arguments = EXAMPLES[example]
    importlib.import_module(module).main(["--sweep-mu", "auto", *arguments(bits, seed), *extra_args, "--out", out])
    with open(os.path.join(out, "mu_sweep.csv"), newline="") as f:
        (row,) = [r for r in csv.DictReader(f) if r.get("bits", str(bits)) == str(bits)]
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--example", choices=sorted(EXAMPLES), required=True)
    parser.add_argument("--bits", type=int, required=True, help="HALP's offset width")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    parser.add_argument("--data", default="/usr/share/datasets/fashion-mnist", help="Fashion-MNIST's folder")
    parser.add_argument("--example-args", default="", help="more arguments for the example (tests shorten runs)")
    parser.add_argument("--out", required=True, help="the CSV to write")
    args = parser.parse_args(argv)
    metric = EXAMPLES[args.example][1]
    extra = args.example_args.split() + (["--data", args.data] if args.example.startswith("fashion_mnist") else [])
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        with tempfile.TemporaryDirectory() as out:
            row = run_one(args.example, args.bits, seed, extra, out)
        rows.append({"example": args.example, "bits": args.bits, "seed": seed, **row})
        print(rows[-1], flush=True)
    mean = statistics.mean(float(r[metric]) for r in rows)
    rows.append({"example": args.example, "bits": args.bits, "seed": "mean", metric: f"{mean:.6g}"})
    print(rows[-1])
    write_csv(args.out, rows)
    return rows


if __name__ == "__main__":
    main()
