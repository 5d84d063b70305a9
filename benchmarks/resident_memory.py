"""Resident memory per parameter that a training method keeps, on a 10M-parameter MLP.

    python benchmarks/resident_memory.py                # graphs run eagerly (compile=False): memory is the same
    python benchmarks/resident_memory.py --inductor     # compiled, as the benchmark runs them

Each method runs in a fresh subprocess (benchmarks/run.py's worker): build the
784-2048-2048-2048-10 MLP, take 3 steps at batch 32 (with 2 batches in the data
set, so HALP and SVRG recenter on the first and the third), then read the
resident set. Its growth over the resident set before the model was built,
divided by the 10.0M parameters, is what the method keeps per parameter: for
HALP at 8 bits the anchor (4 bytes), the offset (1) and the full gradient (4);
for torch.optim.SGD the parameters and their gradients (4 + 4). Part of the
growth does not scale with the model (code paged in, graphs, Python objects):
the same run on the 650-parameter logistic regression measures it, and the
last column is the growth less that, per parameter of the difference.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks import run  # noqa: E402

METHODS = ["compiled_halp8", "compiled_svrg", "eager_sgd", "compiled_sgd"]
MODEL, SMALL_MODEL, BATCH_SIZE, BATCHES = "mlp10m", "logreg", 32, 2


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS)
    p.add_argument("--inductor", action="store_true", help="compile the graphs (slow; Inductor's code is resident too)")
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    worker_args = run.parse_args(["--batches-per-epoch", str(BATCHES), *([] if args.inductor else ["--no-inductor"]),
                                  *(["--threads", str(args.threads)] if args.threads else [])])
    cache_dir = os.path.abspath(worker_args.cache_dir)
    print(f"{MODEL}, batch {BATCH_SIZE}, 3 steps, {'compiled' if args.inductor else 'compile=False'}")
    header = (f"{'method':16s} {'kept MiB':>9s} {'kept B/param':>12s} {'fixed MiB':>9s} {'net B/param':>11s} "
              f"{'peak +MiB':>9s}")
    print(header + "\n" + "-" * len(header))
    for name in args.methods:
        large = run.spawn_worker(worker_args, MODEL, BATCH_SIZE, name, cache_dir)
        small = run.spawn_worker(worker_args, SMALL_MODEL, BATCH_SIZE, name, cache_dir)
        failed = [r["error"] for r in (large, small) if "error" in r]
        if failed:
            print(f"{name:16s} FAILED: {failed[0]}")
            continue
        net = ((large["retained_rss_mib"] - small["retained_rss_mib"]) * 2 ** 20
               / (large["trainable_parameters"] - small["trainable_parameters"]))
        print(f"{name:16s} {large['retained_rss_mib']:9.1f} {large['retained_rss_bytes_per_param']:12.2f} "
              f"{small['retained_rss_mib']:9.1f} {net:11.2f} {run.rss_growth(large):9.0f}", flush=True)

if __name__ == "__main__":
    main()
