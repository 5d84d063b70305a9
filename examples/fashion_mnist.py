"""LeNet-5 on Fashion-MNIST: SGD, 8-bit SGD, SVRG and HALP at 8 and 4 bits.

Reads the four IDX files (gzipped or not) from ``--data``, by default where
Debian's ``dataset-fashion-mnist`` package puts them. The defaults train on a
fixed random subset of the training set so the whole comparison runs in a few
minutes on a CPU. ``--full`` is the long run: all 60,000 training and 10,000
test images, batch 128 (a short last batch dropped), compiled steps, HALP at
8 and 4 bits with ``mu="auto"``; add ``--sweep-mu 0.25,0.5,1,2,4,8,16,32`` for
the sweep it is compared with.

    sudo apt-get install dataset-fashion-mnist
    python examples/fashion_mnist.py
    python examples/fashion_mnist.py --full
"""
import argparse
import gzip
import os
import sys

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import compare_classifiers, mu_label, mu_value, show_halp_fx_log

# What --full sets, unless given: the whole training set, batch 128, both HALP widths with mu="auto", compiled.
FULL = {"train_size": 60000, "batch_size": 128, "epochs": 4, "mu": "auto", "mu4": "auto", "compile": True,
        "out": "results/fashion_mnist_full"}
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=str, default="/usr/share/datasets/fashion-mnist",
                        help="directory of the IDX files (default: /usr/share/datasets/fashion-mnist)")
    parser.add_argument("--full", action="store_true",
                        help="the long run: all 60000 training images, batch 128, 4 epochs, mu=auto at 8 and 4 bits, --compile, "
                             "into results/fashion_mnist_full (each can still be set)")
    parser.add_argument("--train-size", type=int, default=10000,
                        help="training images, a multiple of the batch size (default: 10000 of 60000)")
    parser.add_argument("--test-size", type=int, default=10000, help="test images (default: all 10000)")
    parser.add_argument("--epochs", type=int, default=15, help="passes over the training subset (default: 15)")
    parser.add_argument("--batch-size", type=int, default=100, help="batch size (default: 100)")
    parser.add_argument("--lr", type=float, default=0.1, help="step size of every method (default: 0.1)")
    parser.add_argument("--T", type=int, default=None, help="steps between recenters (default: one epoch)")
    parser.add_argument("--mu", type=mu_value, default="auto",
                        help="mu of HALP 8-bit, a number or 'auto' (default: auto; see --sweep-mu)")
    parser.add_argument("--mu4", type=mu_value, default=8.0,
                        help="mu of HALP 4-bit, a number or 'auto' (default: 8, the best of a 0.25..32 sweep on the "
                             "subset and, over seeds 0-2, 0.6 points above auto; --full sets auto, above the best "
                             "swept mu there)")
    parser.add_argument("--lp-range-factor", type=float, default=4.0,
                        help="LP-SGD's fixed grid of each tensor covers this many times its largest initial "
                             "magnitude (default: 4)")
    parser.add_argument("--sweep-mu", type=str, default=None,
                        help="comma-separated mu values ('auto' among them): run only HALP 8- and 4-bit, once per mu, write mu_sweep.csv")
    parser.add_argument("--sweep-bits", type=lambda t: [int(b) for b in t.split(",")], default=None,
                        help="comma-separated widths --sweep-mu runs (default: 8,4)")
    parser.add_argument("--int8", action="store_true",
                        help="also run HALP 8-bit with arithmetic='int8', with a float32 and with a bf16 anchor "
                             "(HALP_FX_INT8_PRODUCTS=always forces the low-precision products on a CPU where they "
                             "do not pay)")
    parser.add_argument("--compile", action="store_true", help="compile the HALP/SVRG graphs with Inductor")
    parser.add_argument("--methods", type=lambda t: t.split(","), default=None,
                        help="comma-separated method names to run, as the table prints them (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the subset, weights and batch order")
    parser.add_argument("--out", type=str, default="results/fashion_mnist", help="output directory")
    args = parser.parse_args(argv)
    if args.full:  # the long run's values become the defaults, so argparse still lets any option override them
        parser.set_defaults(**FULL)
        args = parser.parse_args(argv)
    return args


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc3(F.relu(self.fc2(x)))


def find(directory, name):
    for candidate in (name, name + ".gz"):
        if os.path.exists(os.path.join(directory, candidate)):
            return os.path.join(directory, candidate)
    return None


def read_idx(path):
    """An IDX file as a numpy array: 2 zero bytes, a type byte (8 = uint8), the rank, big-endian sizes, data."""
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
        data = f.read()
    if data[:3] != b"\x00\x00\x08":
        raise ValueError(f"{path} is not an IDX file of unsigned bytes")
    rank = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(rank))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank).reshape(shape)


def load_split(directory, split):
    images, labels = (read_idx(find(directory, name)) for name in FILES[split])
    return torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 255, torch.tensor(labels, dtype=torch.int64)


@torch.no_grad()
def evaluate(model, x, y, batch_size=1000):
    """(mean cross-entropy, accuracy in %) over (x, y)."""
    model.eval()
    logits = torch.cat([model(x[i:i + batch_size]) for i in range(0, len(y), batch_size)])
    model.train()
    return float(F.cross_entropy(logits, y)), 100 * float((logits.argmax(1) == y).float().mean())


def main(argv=None):
    args = parse_args(argv)
    show_halp_fx_log()
    missing = [name for names in FILES.values() for name in names if find(args.data, name) is None]
    if missing:
        sys.exit(f"Fashion-MNIST not found in {args.data} (no {missing[0]}[.gz]): run `apt-get install "
                 "dataset-fashion-mnist` or pass --data DIR with the IDX files from "
                 "https://github.com/zalandoresearch/fashion-mnist")
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    x, y = load_split(args.data, "train")
    subset = torch.randperm(len(y), generator=torch.Generator().manual_seed(args.seed))[:args.train_size]
    train_data = x[subset], y[subset]
    test_data = tuple(t[:args.test_size] for t in load_split(args.data, "test"))
    return compare_classifiers(
        "fashion-mnist", args, LeNet5, train_data, test_data, evaluate,
        f"LeNet-5 on Fashion-MNIST ({len(train_data[1])} train), batch {args.batch_size}, lr={args.lr}, "
        f"mu={mu_label(args.mu)} / {mu_label(args.mu4)}")


if __name__ == "__main__":
    main()
