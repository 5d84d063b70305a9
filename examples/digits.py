"""A small CNN on scikit-learn's 8x8 digits: SGD, 8-bit SGD, SVRG and HALP at 8 and 4 bits.

Every method sees the same batches in the same order from the same initial
weights. HALP keeps each weight as a float32 anchor plus an 8- or 4-bit offset
on a grid that shrinks at every recenter; the 8-bit SGD baseline keeps each
weight on one fixed 8-bit grid. The script prints a table of test accuracy,
training loss and wall time, saves the learning curves, and dumps the graphs
halp_fx rewrote for HALP 8-bit.

    python examples/digits.py                               # about a minute on 2 CPU cores
    python examples/digits.py --sweep-mu 0.5,1,2,4,8,16,32  # the sweep that chose --mu and --mu4
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from common import compare_classifiers, mu_label, mu_value, show_halp_fx_log


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30, help="passes over the training set (default: 30)")
    parser.add_argument("--batch-size", type=int, default=50, help="batch size (default: 50; 1350 = 27 x 50)")
    parser.add_argument("--train-size", type=int, default=1350,
                        help="training examples, a multiple of the batch size (default: 1350; the rest is test)")
    parser.add_argument("--lr", type=float, default=0.1, help="step size of every method (default: 0.1)")
    parser.add_argument("--T", type=int, default=None, help="steps between recenters (default: one epoch)")
    parser.add_argument("--mu", type=mu_value, default="auto",
                        help="mu of HALP 8-bit, a number or 'auto' (default: auto; see --sweep-mu)")
    parser.add_argument("--mu4", type=mu_value, default="auto",
                        help="mu of HALP 4-bit, a number or 'auto' (default: auto; over seeds 0-4 within 0.3 points "
                             "of the best swept mu, 8)")
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
    parser.add_argument("--compile", action="store_true",
                        help="compile the HALP/SVRG graphs with Inductor (slower overall for a model this small)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, the model is tiny)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order (default: 0)")
    parser.add_argument("--out", type=str, default="results/digits", help="output directory")
    return parser.parse_args(argv)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        # No conv bias before BatchNorm: BatchNorm cancels it, so its gradient is zero.
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def load_data(train_size):
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, train_size=train_size, stratify=labels,
                                                        random_state=0)

    def tensors(x, y):
        return torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16, torch.tensor(y)
    return tensors(x_train, y_train), tensors(x_test, y_test)


@torch.no_grad()
def evaluate(model, x, y):
    """(mean cross-entropy, accuracy in %) in eval mode, i.e. with BatchNorm's running statistics."""
    model.eval()
    logits = model(x)
    model.train()
    return float(F.cross_entropy(logits, y)), 100 * float((logits.argmax(1) == y).float().mean())


def main(argv=None):
    args = parse_args(argv)
    show_halp_fx_log()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    train_data, test_data = load_data(args.train_size)

    def dump_halp8(name, step):
        if name == "HALP 8-bit":
            graphs = step.dump(os.path.join(args.out, "halp8_graphs"))
            print(step.explain().split("\n\n")[0])
            print(f"the rewritten HALP 8-bit graphs are in {os.path.dirname(graphs[0])}/")

    return compare_classifiers(
        "digits", args, SmallCNN, train_data, test_data, evaluate,
        f"digits CNN, batch {args.batch_size}, lr={args.lr}, mu={mu_label(args.mu)} (8-bit), {mu_label(args.mu4)} (4-bit)",
        after=dump_halp8)


if __name__ == "__main__":
    main()
