"""Linear least squares with batch size 1: SGD, low-precision SGD, SVRG and HALP.

The distance to the least-squares optimum after every step shows the paper's
point in one picture: SGD and 8-bit SGD on a fixed grid stall at a noise floor,
SVRG converges linearly, and HALP with 8-bit offsets follows SVRG down because
its grid shrinks with the full gradient at every recenter.

    python examples/regression.py                 # writes results/regression/
    python examples/regression.py --sweep-mu 1,4,16
"""
import argparse
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import make_regression
from tqdm import tqdm

import halp_fx
from common import (LowPrecisionSGD, mu_label, mu_value, optimizer_step, plot_curves, print_table, show_halp_fx_log,
                    write_csv)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="number of examples (default: 100)")
    parser.add_argument("--features", type=int, default=5, help="number of features (default: 5)")
    parser.add_argument("--noise", type=float, default=10.0,
                        help="std of the label noise: SGD then has a floor, not an exact fit (default: 10)")
    parser.add_argument("--epochs", type=int, default=30, help="passes over the data (default: 30)")
    parser.add_argument("--lr", type=float, default=0.01, help="step size of every method (default: 0.01)")
    parser.add_argument("--T", type=int, default=None, help="steps between recenters (default: one epoch)")
    parser.add_argument("--mu", type=mu_value, default="auto",
                        help="HALP's mu, a number or 'auto' (default: auto; --sweep-mu compares)")
    parser.add_argument("--bits", type=int, default=8, help="bits of LP-SGD weights and HALP offsets (default: 8)")
    parser.add_argument("--lp-range", type=float, default=64.0,
                        help="LP-SGD's fixed grid covers [-r, r]; the optimum's largest entry is 46 (default: 64)")
    parser.add_argument("--sweep-mu", type=str, default=None,
                        help="comma-separated mu values ('auto' among them): run only HALP, once per mu, and write mu_sweep.csv")
    parser.add_argument("--compile", action="store_true", help="compile the HALP/SVRG graphs with Inductor")
    parser.add_argument("--int8", action="store_true",
                        help="also run HALP with arithmetic='int8', with a float32 and with a bf16 anchor "
                             "(HALP_FX_INT8_PRODUCTS=always forces the low-precision products on a CPU where they "
                             "do not pay)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, the model is tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data order (default: 0)")
    parser.add_argument("--out", type=str, default="results/regression", help="output directory")
    return parser.parse_args(argv)


def linear_model(features):
    model = nn.Linear(features, 1, bias=False)
    nn.init.zeros_(model.weight)
    return model


def epoch_orders(args):
    generator = torch.Generator().manual_seed(args.seed)
    return [torch.randperm(args.samples, generator=generator).tolist() for _ in range(args.epochs)]


def train(name, make_step, batches, w_opt, args):
    """Run ``make_step()``'s step over the epochs; return one row per step with the distance to w_opt."""
    step = make_step()
    rows, iteration = [], 0
    start = time.perf_counter()
    for order in tqdm(epoch_orders(args), desc=name, leave=False):
        for i in order:
            step(*batches[i])
            iteration += 1
            weight = step.sync_model().weight.detach().numpy().ravel()
            distance = float(np.linalg.norm(weight.astype(np.float64) - w_opt))
            rows.append({"method": name, "iteration": iteration, "distance": distance})
    return rows, time.perf_counter() - start


def main(argv=None):
    args = parse_args(argv)
    show_halp_fx_log()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)

    X, Y = make_regression(n_samples=args.samples, n_features=args.features, noise=args.noise,
                           random_state=0xC0FFEE)
    w_opt = np.linalg.lstsq(X, Y, rcond=None)[0]
    X, Y = torch.tensor(X, dtype=torch.float32), torch.tensor(Y, dtype=torch.float32).view(-1, 1)
    batches = [(X[i:i + 1], Y[i:i + 1]) for i in range(args.samples)]
    T = args.T or args.samples

    def halp_step(bits, mu=args.mu, arithmetic="fp32", anchor_precision="fp32"):
        model = linear_model(args.features)
        return halp_fx.transform(model, bits, loss_fn=F.mse_loss, data_loader=batches, lr=args.lr, T=T, mu=mu,
                                 compile=args.compile, arithmetic=arithmetic, anchor_precision=anchor_precision)

    def sgd():
        model = linear_model(args.features)
        return optimizer_step(model, torch.optim.SGD(model.parameters(), lr=args.lr), F.mse_loss)

    def lp_sgd():
        model = linear_model(args.features)
        optimizer = LowPrecisionSGD(model.parameters(), args.lr, args.bits, grid_range=args.lp_range)
        return optimizer_step(model, optimizer, F.mse_loss)

    if args.sweep_mu:
        sweep = []
        for mu in [mu_value(m) for m in args.sweep_mu.split(",")]:
            rows, _ = train(f"HALP mu={mu_label(mu)}", lambda: halp_step(args.bits, mu), batches, w_opt, args)
            reached = next((r["iteration"] for r in rows if r["distance"] < 1e-3), "")
            sweep.append({"mu": mu_label(mu), "final_distance": rows[-1]["distance"], "iterations_to_1e-3": reached})
        print_table(sweep)
        print("wrote", write_csv(os.path.join(args.out, "mu_sweep.csv"), sweep))
        return sweep

    methods = [("SGD", sgd), (f"LP-SGD {args.bits}-bit", lp_sgd), ("SVRG", lambda: halp_step(None)),
               (f"HALP {args.bits}-bit", lambda: halp_step(args.bits))]
    if args.int8:
        methods += [(f"HALP {args.bits}-bit int8", lambda: halp_step(args.bits, arithmetic="int8")),
                    (f"HALP {args.bits}-bit int8 bf16-anchor",
                     lambda: halp_step(args.bits, arithmetic="int8", anchor_precision="bf16"))]
    curves, table = [], []
    for name, make_step in methods:
        rows, seconds = train(name, make_step, batches, w_opt, args)
        curves += rows
        table.append({"method": name, "final_distance": rows[-1]["distance"],
                      "best_distance": min(r["distance"] for r in rows), "seconds": seconds})
    print_table(table)
    write_csv(os.path.join(args.out, "summary.csv"), table)
    write_csv(os.path.join(args.out, "curves.csv"), curves)
    plot_curves(os.path.join(args.out, "distance.png"), curves, "iteration",
                [("distance", "distance to the optimum", True)],
                f"least squares, {args.samples} samples, batch 1, lr={args.lr}, T={T}, mu={mu_label(args.mu)}")
    print(f"wrote {args.out}/distance.png, curves.csv and summary.csv")
    return table


if __name__ == "__main__":
    main()
