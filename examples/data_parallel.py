"""Data-parallel 8-bit HALP on scikit-learn's digits, one process per rank:

    torchrun --nproc_per_node=2 examples/data_parallel.py

Each rank trains on its own shard of every batch (a DistributedSampler). The
step averages the corrected directions over the ranks in one all-reduce, so
the replicas stay bit-identical without exchanging weights; the script checks
that at the end of every epoch and prints the test accuracy.
"""
import argparse
import datetime
import hashlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import halp_fx
from common import show_halp_fx_log


def state_digest(step):
    """A fingerprint of everything the step holds, to compare the replicas."""
    digest = hashlib.sha256()
    for key, value in step.state_dict().items():
        digest.update(key.encode())
        digest.update(value.numpy().tobytes() if isinstance(value, torch.Tensor) else repr(value).encode())
    return digest.hexdigest()[:16]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="examples per rank per step (default: 32)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--mu", type=float, default=1.0)
    parser.add_argument("--compile", action="store_true", help="compile the step with Inductor")
    parser.add_argument("--timeout-s", type=float, default=300,
                        help="collectives fail after this long instead of hanging (default: 300)")
    args = parser.parse_args(argv)

    show_halp_fx_log()
    torch.set_num_threads(1)
    # A timeout turns a rank that never reaches a collective (one that crashed, or skipped transform) into an error.
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.timeout_s))
    rank, world = dist.get_rank(), dist.get_world_size()

    images, labels = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(images / 16.0, labels, test_size=0.25, random_state=0)
    train = TensorDataset(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train))
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=0, drop_last=True)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    torch.manual_seed(0)   # the same initial weights on every rank
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    step = halp_fx.transform(model, bits=8, loss_fn=F.cross_entropy, data_loader=loader, lr=args.lr, mu=args.mu,
                             compile=args.compile)   # process_group=None: the default group, as initialized above
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        losses = [float(step(x, y)) for x, y in loader]
        digests = [None] * world
        dist.all_gather_object(digests, state_digest(step))
        if rank == 0:
            agree = "identical on all ranks" if len(set(digests)) == 1 else f"DIFFERENT: {digests}"
            print(f"epoch {epoch + 1}: mean loss {sum(losses) / len(losses):.4f}, state {agree}")
    model = step.sync_model().eval()
    with torch.no_grad():
        correct = (model(torch.tensor(x_test, dtype=torch.float32)).argmax(1) == torch.tensor(y_test)).float().mean()
    if rank == 0:
        print(f"{world} ranks, 8-bit HALP: test accuracy {100 * float(correct):.2f}%")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
