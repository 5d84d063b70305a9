"""The char LSTM's held-out perplexity with fp32 and int8 arithmetic (float32 and bf16 anchor), over several seeds.

    python benchmarks/int8_char_lstm_seeds.py --seeds 0,1,2,3,4 --lr-nudges 0,1e-5,-1e-5,2e-5,-2e-5 --jobs 2 \
        --out docs/results/int8/char_lstm_seeds.csv

One seed of the char LSTM example is not enough to compare two arithmetics: its
300 steps at lr 4 end 9.05 to 10.0 apart for fp32 HALP alone as the seed changes
(weights and batch order). This trains HALP 8-bit (mu=1, the example's
defaults) with ``arithmetic="fp32"``, ``"int8"`` and ``"int8"`` with
``anchor_precision="bf16"`` (the row's arithmetic ``int8_bf16``) for every seed,
and writes one row per (arithmetic, seed) plus the mean of each.

``--lr-nudges`` measures how much of a difference is the training's own chaos:
each seed runs again with its step size changed by a tiny relative amount (1e-5
is far below anything a user would tune), for every arithmetic alike. Then a
mean over seeds *and* nudges compares the arithmetics on many trajectories
instead of five, and the nudged float32 runs show how far a float32 run moves
when nothing but its rounding changes. The rows of nudge 0 are the plain seeds;
their mean is written as ``seed=mean, lr_nudge=0``, the mean over every row of
an arithmetic as ``seed=mean, lr_nudge=all``.

The int8 and bf16 products run whatever the CPU (``HALP_FX_INT8_PRODUCTS=always``). On a
CPU without AVX512-VNNI or AMX, ``torch._int_mm`` runs a reference kernel 33x
slower than float32 (6 minutes a run here); ``--float32-sums`` computes the same
int8 x int8 products as float32 products of the int8 values instead. Every
partial sum is an integer below 2^24 (inner size x 127 x 127 < 2^24, checked), so
float32 holds it exactly and the result is the same to the bit: seed 0 gives the
same perplexity after every epoch either way.
"""
import argparse
import concurrent.futures
import multiprocessing
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "examples")):
    if path not in sys.path:
        sys.path.insert(0, path)
import torch  # noqa: E402

import char_lstm  # noqa: E402
from common import write_csv  # noqa: E402
import halp_fx  # noqa: E402
from halp_fx import centered_int8  # noqa: E402


def float32_sums(a, b):
    """``a @ b`` of int8 matrices through a float32 product: exact while every sum stays below 2^24."""
    if a.shape[1] * 127 * 127 >= 2 ** 24:
        raise ValueError(f"inner size {a.shape[1]}: int8 sums may not fit float32 exactly")
    return (a.to(torch.float32) @ b.to(torch.float32)).to(torch.int32)


ARITHMETICS = ("fp32", "int8", "int8_bf16")


def train_both(seed, example_args, lr_nudge=0.0):
    """One row per arithmetic: HALP 8-bit's held-out perplexity on the char LSTM with this seed, its step size
    times ``1 + lr_nudge``."""
    example = char_lstm.parse_args(["--seed", str(seed), "--mu", "1", *example_args])
    example.lr *= 1 + lr_nudge
    torch.set_num_threads(example.threads)
    train_batches, val_batches, vocabulary = char_lstm.load_batches(example)
    rows = []
    for arithmetic in ARITHMETICS:
        def make_step(model, arithmetic=arithmetic):
            return halp_fx.transform(model, 8, loss_fn=char_lstm.next_char_loss, data_loader=train_batches,
                                     lr=example.lr, T=example.T, mu=example.mu, compile=False,
                                     arithmetic=arithmetic.split("_")[0],
                                     anchor_precision="bf16" if arithmetic.endswith("_bf16") else "fp32")
        _, summary = char_lstm.train(f"HALP 8-bit {arithmetic} seed {seed} nudge {lr_nudge:g}", make_step,
                                     len(vocabulary), train_batches, val_batches, example)
        rows.append({"arithmetic": arithmetic, "seed": seed, "lr_nudge": f"{lr_nudge:g}",
                     "val_perplexity": summary["val_perplexity"]})
        print(rows[-1], flush=True)
    return rows


def train_forced(seed, example_args, lr_nudge, float32_sums_on):
    """:func:`train_both` with the low-precision products forced on (in this process or a worker)."""
    forced, product = os.environ.get("HALP_FX_INT8_PRODUCTS"), centered_int8.int8_mm
    os.environ["HALP_FX_INT8_PRODUCTS"] = "always"
    if float32_sums_on:
        centered_int8.int8_mm = float32_sums
    try:
        return train_both(seed, example_args, lr_nudge)
    finally:  # leave the process as it was (the tests call main)
        centered_int8.int8_mm = product
        if forced is None:
            os.environ.pop("HALP_FX_INT8_PRODUCTS")
        else:
            os.environ["HALP_FX_INT8_PRODUCTS"] = forced


def relative_change(value, reference):
    return f"{100 * (value / reference - 1):+.1f}%"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: 0,1,2,3,4)")
    parser.add_argument("--lr-nudges", default="0",
                        help="comma-separated relative changes of the step size, each run for every seed "
                             "(default: 0, the example's own step size)")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, in worker processes (default: 1)")
    parser.add_argument("--float32-sums", action="store_true",
                        help="int8 products as exact float32 products of the int8 values (same result, faster "
                             "on CPUs without VNNI/AMX)")
    parser.add_argument("--example-args", default="",
                        help="more arguments for examples/char_lstm.py, e.g. '--epochs 1' (default: its defaults)")
    parser.add_argument("--out", default="results/int8_char_lstm_seeds.csv")
    args = parser.parse_args(argv)
    try:
        nudges = [float(n) for n in args.lr_nudges.split(",")]
    except ValueError:
        parser.error(f"--lr-nudges must be comma-separated numbers, e.g. 0,1e-5,-1e-5; got {args.lr_nudges!r}")
    if 0.0 not in nudges:
        parser.error(f"--lr-nudges must include 0 (the plain seeds), got {args.lr_nudges!r}")
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    tasks = [(int(seed), args.example_args.split(), nudge, args.float32_sums)
             for seed in args.seeds.split(",") for nudge in nudges]
    if args.jobs == 1:
        results = [train_forced(*task) for task in tasks]
    else:
        with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            results = list(pool.map(train_forced, *zip(*tasks)))
    rows = [row for result in results for row in result]
    by_arithmetic = {a: [r for r in rows if r["arithmetic"] == a] for a in ARITHMETICS}
    means = {a: statistics.mean(r["val_perplexity"] for r in by_arithmetic[a] if r["lr_nudge"] == "0")
             for a in ARITHMETICS}
    rows += [{"arithmetic": a, "seed": "mean", "lr_nudge": "0", "val_perplexity": means[a]} for a in ARITHMETICS]
    print("mean held-out perplexity: " + ", ".join(
        f"{a} {m:.3f} ({relative_change(m, means['fp32'])})" for a, m in means.items()))
    if len(nudges) > 1:
        overall = {a: statistics.mean(r["val_perplexity"] for r in by_arithmetic[a]) for a in ARITHMETICS}
        rows += [{"arithmetic": a, "seed": "mean", "lr_nudge": "all", "val_perplexity": overall[a]}
                 for a in ARITHMETICS]
        spread = statistics.stdev(r["val_perplexity"] for r in by_arithmetic["fp32"])
        print(f"mean over every seed and nudge ({len(by_arithmetic['fp32'])} runs each): " + ", ".join(
            f"{a} {m:.3f} ({relative_change(m, overall['fp32'])})" for a, m in overall.items())
              + f"; fp32 runs' standard deviation {spread:.3f}")
    print("wrote", write_csv(args.out, rows))
    return rows


if __name__ == "__main__":
    main()
