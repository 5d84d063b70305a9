"""A character-level LSTM language model on Python's own help text: SGD, 8-bit SGD, SVRG and HALP 8-bit.

The text is ``pydoc_data.topics`` from the standard library (465k characters of
the Python reference), cut into fixed windows. The LSTM is stateless: every
window starts from a zero hidden state, so a training step is a pure function
of its batch, which is what HALP's full gradient and recentering need (a hidden
state carried across batches would tie each step to the previous one).

halp_fx traces the LSTM unrolled over the window, so the graph has thousands
of nodes; that is why the defaults keep the windows short.

    python examples/char_lstm.py
"""
import argparse
import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydoc_data.topics import topics
from tqdm import tqdm

import halp_fx
from common import (LowPrecisionSGD, mu_label, mu_value, optimizer_step, plot_curves, print_table, show_halp_fx_log,
                    write_csv)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=32, help="characters a window predicts (default: 32)")
    parser.add_argument("--batch-size", type=int, default=32, help="windows per batch (default: 32)")
    parser.add_argument("--train-batches", type=int, default=50,
                        help="batches in the training text (default: 50, i.e. 52,800 characters)")
    parser.add_argument("--val-batches", type=int, default=20, help="batches of held-out text (default: 20)")
    parser.add_argument("--hidden", type=int, default=128, help="LSTM hidden size (default: 128)")
    parser.add_argument("--epochs", type=int, default=6, help="passes over the training text (default: 6)")
    parser.add_argument("--lr", type=float, default=4.0, help="step size of every method (default: 4)")
    parser.add_argument("--T", type=int, default=None, help="steps between recenters (default: one epoch)")
    parser.add_argument("--mu", type=mu_value, default="auto",
                        help="mu of HALP, a number or 'auto' (default: auto; 2.4%% above the best swept mu, 1, on the "
                             "mean of five seeds at 8 bits and 3.0%% on ten at 4 bits: inside this training's noise)")
    parser.add_argument("--bits", type=int, default=8, help="bits of LP-SGD weights and HALP offsets (default: 8)")
    parser.add_argument("--lp-range-factor", type=float, default=4.0,
                        help="LP-SGD's fixed grid of each tensor covers this many times its largest initial "
                             "magnitude (default: 4)")
    parser.add_argument("--sweep-mu", type=str, default=None,
                        help="comma-separated mu values ('auto' among them): run only HALP, once per mu, and write mu_sweep.csv")
    parser.add_argument("--int8", action="store_true",
                        help="also run HALP with arithmetic='int8', with a float32 and with a bf16 anchor "
                             "(HALP_FX_INT8_PRODUCTS=always forces the low-precision products on a CPU where they "
                             "do not pay)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and the batch order (default: 0)")
    parser.add_argument("--out", type=str, default="results/char_lstm", help="output directory")
    return parser.parse_args(argv)


class CharLSTM(nn.Module):
    def __init__(self, vocab_size, hidden, embedding=32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embedding)
        self.lstm = nn.LSTM(embedding, hidden, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, x):
        h, _ = self.lstm(self.embed(x))  # no state in, none kept: each window starts from zeros
        return self.head(h)


def next_char_loss(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def windows(codes, count, args):
    """``count`` batches ``(input, target)`` of shape (batch, seq_len): the target is the input shifted by one."""
    size = args.seq_len + 1
    rows = codes[:count * args.batch_size * size].view(count * args.batch_size, size)
    return [(rows[i:i + args.batch_size, :-1], rows[i:i + args.batch_size, 1:])
            for i in range(0, len(rows), args.batch_size)]


@torch.no_grad()
def perplexity(model, batches):
    model.eval()
    loss = sum(float(next_char_loss(model(x), y)) for x, y in batches) / len(batches)
    model.train()
    return math.exp(loss)


def train(name, make_step, vocab_size, train_batches, val_batches, args):
    """Train a fresh CharLSTM with ``make_step(model)``; return (curve rows, summary row)."""
    torch.manual_seed(args.seed)
    step = make_step(CharLSTM(vocab_size, args.hidden))
    order = torch.Generator().manual_seed(args.seed)
    rows, seconds, first_step = [], 0.0, None
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        for i in tqdm(torch.randperm(len(train_batches), generator=order).tolist(), desc=f"{name} epoch {epoch}",
                      leave=False):
            step(*train_batches[i])
            if first_step is None:
                first_step = time.perf_counter() - start
        seconds += time.perf_counter() - start
        rows.append({"method": name, "epoch": epoch, "train_perplexity": perplexity(step.sync_model(), train_batches),
                     "val_perplexity": perplexity(step.sync_model(), val_batches), "seconds": seconds})
    summary = {"method": name, "val_perplexity": rows[-1]["val_perplexity"],
               "train_perplexity": rows[-1]["train_perplexity"], "seconds": seconds, "first_step_seconds": first_step}
    return rows, summary


def load_batches(args):
    """(training batches, held-out batches, vocabulary) from Python's own ``pydoc_data.topics`` text."""
    text = "".join(topics[key] for key in sorted(topics))
    vocabulary = sorted(set(text))
    codes = torch.tensor([vocabulary.index(c) for c in text], dtype=torch.int64)
    held_out = (args.seq_len + 1) * args.batch_size * args.val_batches
    train_batches = windows(codes[:-held_out], args.train_batches, args)
    val_batches = windows(codes[-held_out:], args.val_batches, args)
    print(f"pydoc topics: {len(text)} characters, vocabulary {len(vocabulary)}; {len(train_batches)} training and "
          f"{len(val_batches)} held-out batches of {args.batch_size} x {args.seq_len}")
    return train_batches, val_batches, vocabulary


def main(argv=None):
    args = parse_args(argv)
    show_halp_fx_log()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    train_batches, val_batches, vocabulary = load_batches(args)

    def halp(bits, mu=args.mu, arithmetic="fp32", anchor_precision="fp32"):
        return lambda model: halp_fx.transform(model, bits, loss_fn=next_char_loss, data_loader=train_batches,
                                               lr=args.lr, T=args.T, mu=mu, compile=False, arithmetic=arithmetic,
                                               anchor_precision=anchor_precision)

    def sgd(model):
        return optimizer_step(model, torch.optim.SGD(model.parameters(), lr=args.lr), next_char_loss)

    def lp_sgd(model):
        optimizer = LowPrecisionSGD(model.parameters(), args.lr, bits=args.bits, range_factor=args.lp_range_factor)
        return optimizer_step(model, optimizer, next_char_loss)

    if args.sweep_mu:
        sweep = []
        for mu in [mu_value(m) for m in args.sweep_mu.split(",")]:
            _, summary = train(f"HALP mu={mu_label(mu)}", halp(args.bits, mu), len(vocabulary), train_batches, val_batches,
                               args)
            sweep.append({"mu": mu_label(mu), "val_perplexity": summary["val_perplexity"],
                          "train_perplexity": summary["train_perplexity"]})
        print_table(sweep)
        print("wrote", write_csv(os.path.join(args.out, "mu_sweep.csv"), sweep))
        return sweep

    methods = [("SGD", sgd), (f"LP-SGD {args.bits}-bit", lp_sgd), ("SVRG", halp(None)),
               (f"HALP {args.bits}-bit", halp(args.bits))]
    if args.int8:
        methods += [(f"HALP {args.bits}-bit int8", halp(args.bits, arithmetic="int8")),
                    (f"HALP {args.bits}-bit int8 bf16-anchor", halp(args.bits, arithmetic="int8",
                                                                  anchor_precision="bf16"))]
    curves, table = [], []
    for name, make_step in methods:
        rows, summary = train(name, make_step, len(vocabulary), train_batches, val_batches, args)
        curves += rows
        table.append(summary)
    print_table(table)
    write_csv(os.path.join(args.out, "summary.csv"), table)
    write_csv(os.path.join(args.out, "curves.csv"), curves)
    plot_curves(os.path.join(args.out, "curves.png"), curves, "epoch",
                [("train_perplexity", "training perplexity", True), ("val_perplexity", "held-out perplexity", True)],
                f"char LSTM ({args.hidden} units), windows of {args.seq_len}, lr={args.lr}, mu={mu_label(args.mu)}")
    print(f"wrote {args.out}/curves.png, curves.csv and summary.csv")
    return table


if __name__ == "__main__":
    main()
