"""ResNet-18 on CIFAR-10 with HALP, SVRG or SGD: the paper's large experiment.

The defaults are the paper's HALP run (and torchhalp's): batch 128, lr 0.1,
T=196 steps between recenters, mu=20, 8 bits, weight decay 5e-4. It reads the
standard python pickles (``data_batch_1`` .. ``data_batch_5``, ``test_batch``)
from ``--data``; ``--synthetic`` trains on random images instead, to check that
everything runs. A run of 150 epochs wants a GPU; ``--checkpoint`` lets it
stop and resume.

    python examples/cifar10_resnet18.py --data ~/data/cifar-10-batches-py
    python examples/cifar10_resnet18.py --synthetic --epochs 1 --width 8
"""
import argparse
import os
import pickle
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import halp_fx
from common import optimizer_step, plot_curves, show_halp_fx_log, write_csv

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=str, default="data/cifar-10-batches-py",
                        help="directory of the CIFAR-10 python pickles (default: data/cifar-10-batches-py)")
    parser.add_argument("--synthetic", action="store_true", help="random images instead of CIFAR-10")
    parser.add_argument("--synthetic-size", type=int, default=1024, help="random training images (default: 1024)")
    parser.add_argument("--method", choices=("halp", "svrg", "sgd"), default="halp", help="optimizer (default: halp)")
    parser.add_argument("--bits", type=int, default=8, help="HALP offset bits (default: 8)")
    parser.add_argument("--epochs", type=int, default=150, help="epochs (default: 150)")
    parser.add_argument("--batch-size", type=int, default=128, help="batch size (default: 128)")
    parser.add_argument("--lr", type=float, default=0.1, help="learning rate (default: 0.1)")
    parser.add_argument("--T", type=int, default=196, help="steps between recenters (default: 196)")
    parser.add_argument("--mu", type=float, default=20.0, help="HALP's mu (default: 20)")
    parser.add_argument("--momentum", type=float, default=0.0, help="momentum (default: 0)")
    parser.add_argument("--weight-decay", type=float, default=5e-4, help="weight decay (default: 5e-4)")
    parser.add_argument("--width", type=int, default=64, help="channels of the first stage (default: 64)")
    parser.add_argument("--no-compile", action="store_true", help="run the HALP/SVRG graphs eagerly")
    parser.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpoint", type=str, default=None,
                        help="file to save after every epoch and to resume from if it exists")
    parser.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    parser.add_argument("--out", type=str, default="results/cifar10_resnet18", help="output directory")
    return parser.parse_args(argv)


class BasicBlock(nn.Module):
    def __init__(self, inputs, outputs, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet18(nn.Module):
    """The CIFAR variant: a 3x3 stem without max-pooling, then four stages of two basic blocks."""

    def __init__(self, width=64, classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, inputs = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            outputs = width * 2 ** i
            stages += [BasicBlock(inputs, outputs, stride), BasicBlock(outputs, outputs, 1)]
            inputs = outputs
        self.layers = nn.Sequential(*stages)
        self.linear = nn.Linear(inputs, classes)

    def forward(self, x):
        out = self.layers(F.relu(self.bn1(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def load_cifar(directory):
    def read(name):
        with open(os.path.join(directory, name), "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        return batch[b"data"].reshape(-1, 3, 32, 32), np.asarray(batch[b"labels"])
    train = [read(f"data_batch_{i}") for i in range(1, 6)]
    test = read("test_batch")
    train = np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])
    return [(torch.from_numpy(x), torch.from_numpy(y).long()) for x, y in (train, test)]


def synthetic_cifar(size, seed):
    generator = torch.Generator().manual_seed(seed)

    def split(n):
        return (torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator),
                torch.randint(0, 10, (n,), generator=generator))
    return split(size), split(max(size // 4, 1))


class Batches:
    """(normalized images, labels) batches of uint8 images, the last partial batch dropped so every batch has
    one shape (each new shape is one more graph to compile). ``augment`` adds the usual random crop and flip."""

    def __init__(self, images, labels, batch_size, device, shuffle=False, augment=False, seed=0):
        self.images, self.labels, self.batch_size, self.device = images, labels, batch_size, device
        self.shuffle, self.augment = shuffle, augment
        self.generator = torch.Generator().manual_seed(seed)
        self.mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    def __len__(self):
        return len(self.labels) // self.batch_size

    def __iter__(self):
        n = len(self) * self.batch_size
        order = torch.randperm(len(self.labels), generator=self.generator)[:n] if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            index = order[i:i + self.batch_size]
            x = self.images[index].to(self.device).float().div_(255)
            if self.augment:
                x = self.crop_and_flip(x)
            yield (x - self.mean) / self.std, self.labels[index].to(self.device)

    def crop_and_flip(self, x):
        padded = F.pad(x, (4, 4, 4, 4))
        shifts = torch.randint(0, 9, (len(x), 2), generator=self.generator).tolist()
        flips = torch.rand(len(x), generator=self.generator) < 0.5
        x = torch.stack([padded[i, :, dy:dy + 32, dx:dx + 32] for i, (dy, dx) in enumerate(shifts)])
        return torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(3), x)


@torch.no_grad()
def test_accuracy(model, batches):
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train()
    return 100 * correct / total


def main(argv=None):
    args = parse_args(argv)
    show_halp_fx_log()
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    if args.synthetic:
        (x_train, y_train), (x_test, y_test) = synthetic_cifar(args.synthetic_size, args.seed)
    else:
        if not os.path.exists(os.path.join(args.data, "data_batch_1")):
            raise SystemExit(f"no CIFAR-10 python pickles in {args.data}: download and unpack "
                             "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz and pass --data, "
                             "or run with --synthetic")
        (x_train, y_train), (x_test, y_test) = load_cifar(args.data)
    train_batches = Batches(x_train, y_train, args.batch_size, args.device, shuffle=True, augment=True,
                            seed=args.seed)
    # The full gradient's batches: the training set in a fixed order, augmented like the steps' batches.
    full_gradient_batches = Batches(x_train, y_train, args.batch_size, args.device, augment=True, seed=args.seed + 1)
    test_batches = Batches(x_test, y_test, min(500, len(y_test)), args.device)
    print(f"{'synthetic' if args.synthetic else 'CIFAR-10'}: {len(y_train)} training images, "
          f"{len(train_batches)} steps per epoch, {len(y_test)} test images, device {args.device}")

    model = ResNet18(args.width).to(args.device)
    if args.method == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.weight_decay)
        step = optimizer_step(model, optimizer, F.cross_entropy)
        state = {"model": model, "optimizer": optimizer}
    else:
        step = halp_fx.transform(model, args.bits if args.method == "halp" else None, loss_fn=F.cross_entropy,
                                 data_loader=full_gradient_batches, lr=args.lr, T=args.T, mu=args.mu,
                                 momentum=args.momentum, weight_decay=args.weight_decay,
                                 compile=not args.no_compile)
        state = {"step": step}

    rows, first_epoch = [], 1
    if args.checkpoint and os.path.exists(args.checkpoint):
        saved = halp_fx.load_checkpoint(args.checkpoint, map_location=args.device)
        for name, owner in state.items():
            owner.load_state_dict(saved[name])
        rows, first_epoch = saved["rows"], saved["rows"][-1]["epoch"] + 1
        print(f"resumed from {args.checkpoint} after epoch {first_epoch - 1}")

    name = {"halp": f"HALP {args.bits}-bit", "svrg": "SVRG", "sgd": "SGD"}[args.method]
    seconds = rows[-1]["seconds"] if rows else 0.0
    for epoch in range(first_epoch, args.epochs + 1):
        start, losses = time.perf_counter(), []
        progress = tqdm(train_batches, desc=f"epoch {epoch}", leave=False)
        for x, y in progress:
            losses.append(float(step(x, y)))
            progress.set_postfix(loss=f"{losses[-1]:.3f}")
        seconds += time.perf_counter() - start
        accuracy = test_accuracy(step.sync_model(), test_batches)
        rows.append({"method": name, "epoch": epoch, "train_loss": sum(losses) / len(losses),
                     "test_accuracy": accuracy, "seconds": seconds})
        print(f"epoch {epoch}: train loss {rows[-1]['train_loss']:.4f}, test accuracy {accuracy:.2f}%, "
              f"{seconds:.0f} s")
        write_csv(os.path.join(args.out, "curves.csv"), rows)
        if args.checkpoint:
            halp_fx.save_checkpoint({**{k: v.state_dict() for k, v in state.items()}, "rows": rows},
                                    args.checkpoint)
    plot_curves(os.path.join(args.out, "curves.png"), rows, "epoch",
                [("train_loss", "training loss", True), ("test_accuracy", "test accuracy (%)", False)],
                f"ResNet-18 on {'random images' if args.synthetic else 'CIFAR-10'}, {name}, lr={args.lr}, "
                f"T={args.T}, mu={args.mu:g}")
    print(f"wrote {args.out}/curves.png and curves.csv")
    return rows


if __name__ == "__main__":
    main()
