"""Quick start: 8-bit HALP on scikit-learn's digits with a two-layer MLP.

    python examples/quickstart.py

Prints the rewritten training step (``step.explain()``) and the test accuracy.
"""
import argparse
import logging
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import halp_fx


def digits(batch_size):
    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(images / 16.0, labels, test_size=0.25, random_state=0)
    x_train, x_test = torch.tensor(x_train, dtype=torch.float32), torch.tensor(x_test, dtype=torch.float32)
    y_train, y_test = torch.tensor(y_train), torch.tensor(y_test)
    usable = len(x_train) // batch_size * batch_size  # equal batches: one graph, one compile
    batches = [(x_train[i:i + batch_size], y_train[i:i + batch_size]) for i in range(0, usable, batch_size)]
    return batches, (x_test, y_test)


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, default=8, help="offset bits (default 8)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--mu", type=float, default=0.5, help="grid scale: d = ||G|| / (mu * (2^(b-1) - 1))")
    parser.add_argument("--no-compile", action="store_true", help="run the same graphs without Inductor")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1, the model is tiny)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # halp_fx logs when it starts and ends an Inductor compile, which can take a minute.
    logging.basicConfig(format="%(message)s")
    logging.getLogger("halp_fx").setLevel(logging.INFO)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, (x_test, y_test) = digits(args.batch_size)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    step = halp_fx.transform(model, bits=args.bits, loss_fn=F.cross_entropy, data_loader=train,
                             lr=args.lr, mu=args.mu, compile=not args.no_compile)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        losses = [float(step(x, y)) for x, y in train]
        if epoch == 0:
            print(step.explain(), end="\n\n")
        print(f"epoch {epoch + 1:2d}  loss {sum(losses) / len(losses):.4f}  "
              f"test accuracy {accuracy(step.sync_model(), x_test, y_test):.3f}")
        model.train()
    print(f"\n{args.bits}-bit HALP: test accuracy {accuracy(step.sync_model(), x_test, y_test):.3f} "
          f"in {time.perf_counter() - start:.1f} s (first epoch includes capture and compile)")
    print({str(z.dtype) for z in step.offset.values()}, "offsets;", "scales:",
          {name: f"{float(d):.2e}" for name, d in step.scale.items()})


if __name__ == "__main__":
    main()
