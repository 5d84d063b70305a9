"""The char LSTM's held-out perplexity with fp32 and int8 arithmetic (float32 and bf16 anchor), over several seeds.

    python benchmarks/int8_char_lstm_seeds.py --seeds 0,1,2,3,4 --out docs/results/int8/char_lstm_seeds.csv

One seed of the char LSTM example is not enough to compare two arithmetics: its
300 steps at lr 4 end 9.05 to 10.0 apart for fp32 HALP alone as the seed changes
(weights and batch order). This trains HALP 8-bit (mu=1, the example's
defaults) with ``arithmetic="fp32"``, ``"int8"`` and ``"int8"`` with
``anchor_precision="bf16"`` (the row's arithmetic ``int8_bf16``) for every seed,
and writes one row per (arithmetic, seed) plus the mean of each.

The int8 and bf16 products run whatever the CPU (``HALP_FX_INT8_PRODUCTS=always``). On a
CPU without AVX512-VNNI or AMX, ``torch._int_mm`` runs a reference kernel 33x
slower than float32 (6 minutes a run here); ``--float32-sums`` computes the same
int8 x int8 products as float32 products of the int8 values instead. Every
partial sum is an integer below 2^24 (inner size x 127 x 127 < 2^24, checked), so
float32 holds it exactly and the result is the same to the bit: seed 0 gives the
same perplexity after every epoch either way.
"""
import argparse
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


def train_both(seed, example_args):
    """One row per arithmetic: HALP 8-bit's held-out perplexity on the char LSTM with this seed."""
    example = char_lstm.parse_args(["--seed", str(seed), "--mu", "1", *example_args])
    torch.set_num_threads(example.threads)
    train_batches, val_batches, vocabulary = char_lstm.load_batches(example)
    rows = []
    for arithmetic in ARITHMETICS:
        def make_step(model, arithmetic=arithmetic):
            return halp_fx.transform(model, 8, loss_fn=char_lstm.next_char_loss, data_loader=train_batches,
                                     lr=example.lr, T=example.T, mu=example.mu, compile=False,
                                     arithmetic=arithmetic.split("_")[0],
                                     anchor_precision="bf16" if arithmetic.endswith("_bf16") else "fp32")
        _, summary = char_lstm.train(f"HALP 8-bit {arithmetic} seed {seed}", make_step, len(vocabulary),
                                     train_batches, val_batches, example)
        rows.append({"arithmetic": arithmetic, "seed": seed, "val_perplexity": summary["val_perplexity"]})
        print(rows[-1], flush=True)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated seeds (default: 0,1,2,3,4)")
    parser.add_argument("--float32-sums", action="store_true",
                        help="int8 products as exact float32 products of the int8 values (same result, faster "
                             "on CPUs without VNNI/AMX)")
    parser.add_argument("--example-args", default="",
                        help="more arguments for examples/char_lstm.py, e.g. '--epochs 1' (default: its defaults)")
    parser.add_argument("--out", default="results/int8_char_lstm_seeds.csv")
    args = parser.parse_args(argv)
    forced, product = os.environ.get("HALP_FX_INT8_PRODUCTS"), centered_int8.int8_mm
    os.environ["HALP_FX_INT8_PRODUCTS"] = "always"
    if args.float32_sums:
        centered_int8.int8_mm = float32_sums
    try:
        rows = [row for seed in args.seeds.split(",") for row in train_both(int(seed), args.example_args.split())]
    finally:  # leave the process as it was (the tests call main)
        centered_int8.int8_mm = product
        if forced is None:
            os.environ.pop("HALP_FX_INT8_PRODUCTS")
        else:
            os.environ["HALP_FX_INT8_PRODUCTS"] = forced
    means = {}
    for arithmetic in ARITHMETICS:
        values = [r["val_perplexity"] for r in rows if r["arithmetic"] == arithmetic]
        means[arithmetic] = statistics.mean(values)
        rows.append({"arithmetic": arithmetic, "seed": "mean", "val_perplexity": means[arithmetic]})
    print("mean held-out perplexity: " + ", ".join(
        f"{a} {m:.3f} ({100 * (m / means['fp32'] - 1):+.1f}%)" for a, m in means.items()))
    print("wrote", write_csv(args.out, rows))
    return rows


if __name__ == "__main__":
    main()
