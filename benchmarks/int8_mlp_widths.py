"""Whether int8 corrections pay on small matrix products: compiled int8 HALP against compiled float32 HALP on
three-layer MLPs (``w -> w -> w -> 10``) of growing width ``w``, batch 128, one thread.

A product falls back to float32 where int8 does not pay on the device (``explain()`` names each). Whether
small products should fall back too is what this measures: if a product of ``128 x w x w`` only paid above some
size, the ratio would cross 1 as ``w`` shrinks. The two steps are timed in interleaved rounds (``--rounds``, each
the median of ``--steps`` inner steps per method), and the ratio is the median over rounds of the ratio within a
round.

``python benchmarks/int8_mlp_widths.py --csv docs/results/benchmarks/int8_mlp_widths_epyc_avx_vnni.csv``
"""
import argparse
import csv
import os
import re
import statistics
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.methods import CompiledHALP8, CompiledHALP8Int8  # noqa: E402
from halp_fx import centered_int8  # noqa: E402
from halp_fx.freed_memory import keep_freed_memory  # noqa: E402

CLASSES = 10
METHODS = {"fp32": CompiledHALP8, "int8": CompiledHALP8Int8}


def mlp(width):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, CLASSES))


def measure(width, batch_size, rounds, steps, compile=True):
    """One CSV row: the median inner step of each method (ms) and their ratio, for the ``width`` MLP."""
    g = torch.Generator().manual_seed(width)
    count = 2 + rounds * steps  # no recenter falls among the timed steps
    batches = [(torch.randn(batch_size, width, generator=g), torch.randint(0, CLASSES, (batch_size,), generator=g))
               for _ in range(count)]
    built = {}
    for name, method in METHODS.items():
        built[name] = method(mlp(width), batches, compile=compile)
        built[name].start()
    samples, i = {name: [] for name in built}, 1
    for r in range(rounds):
        for name in (list(built) if r % 2 == 0 else list(built)[::-1]):
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                built[name].step(1 + (i % (count - 1)))
                times.append(time.perf_counter() - start)
                i += 1
            samples[name].append(statistics.median(times))
    rewritten = re.search(r"(\d+) matrix products at W became", built["int8"].halp_step.explain())
    return {"width": width, "batch_size": batch_size,
            "multiply_adds_per_hidden_product": batch_size * width * width,
            "fp32_halp_ms": round(1e3 * statistics.median(samples["fp32"]), 4),
            "int8_halp_ms": round(1e3 * statistics.median(samples["int8"]), 4),
            "int8_over_fp32": round(statistics.median(a / b for a, b in zip(samples["int8"], samples["fp32"])), 4),
            "int8_pays_here": centered_int8.products_pay(torch.device("cpu"))[0],
            "int8_products": int(rewritten.group(1)) if rewritten else 0}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-inductor", action="store_true", help="run the graphs uncompiled (for tests)")
    parser.add_argument("--csv", help="write the rows here")
    args = parser.parse_args(argv)
    for name in ("batch_size", "rounds", "steps", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if min(args.widths) < 1:
        parser.error(f"--widths must be positive, got {args.widths}")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    keep_freed_memory()
    flags = " ".join(sorted(centered_int8.cpu_flags() & (centered_int8.LOW_PRECISION_FLAGS | {"avx2"})))
    print(f"torch {torch.__version__}, CPU flags {flags or 'not read'}, {args.threads} thread(s), "
          f"batch {args.batch_size}; ms per inner step, median of {args.rounds} rounds", flush=True)
    rows = []
    for width in args.widths:
        row = measure(width, args.batch_size, args.rounds, args.steps, compile=not args.no_inductor)
        rows.append(row)
        print(f"width {width:5d} ({row['multiply_adds_per_hidden_product'] / 1e6:.1f} M multiply-adds per hidden "
              f"product): float32 HALP {row['fp32_halp_ms']:.3f}, int8 HALP {row['int8_halp_ms']:.3f}, "
              f"ratio {row['int8_over_fp32']:.3f}", flush=True)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    return rows


if __name__ == "__main__":
    main()
