"""Data-parallel step time and bytes communicated per step, at 1 and 2 processes (one thread each).

    python benchmarks/data_parallel.py [--steps 60] [--batch-size 128] [--compile]

Methods: ``transform`` (8-bit HALP, its step all-reduces one bucket of corrected directions) and ``ddp_optim``
(``halp_fx.optim.HALP`` over ``DistributedDataParallel``, whose two backward passes per step each all-reduce the
gradients). Bytes per step are those of the all-reduced tensors (float32), counted from the model, not sniffed
from the wire. Examples per second count every rank's batch.
"""
import argparse
import json
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))


def batches(count, batch_size, rank):
    g = torch.Generator().manual_seed(rank)
    return [(torch.randn(batch_size, 784, generator=g), torch.randint(0, 10, (batch_size,), generator=g))
            for _ in range(count)]


def run(rank, world, method, steps, batch_size, compile, port, out):
    import halp_fx
    from halp_fx.optim import HALP
    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"tcp://127.0.0.1:{port}")
    data = batches(8, batch_size, rank)
    model = mlp()
    parameters = sum(p.numel() for p in model.parameters())
    if method == "transform":
        step = halp_fx.transform(model, 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.01, mu=1.0,
                                 compile=compile, T=10 ** 9)

        def one(x, y):
            step(x, y)
        bytes_per_step = 4 * (parameters + 1) if world > 1 else 0
    else:
        from torch.nn.parallel import DistributedDataParallel
        net = DistributedDataParallel(model) if world > 1 else model
        opt = HALP(net.parameters(), lr=0.01, T=10 ** 9, data_loader=data, mu=1.0, model=net, compile=compile)

        def one(x, y):
            def closure(x=x, y=y):
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        bytes_per_step = 2 * 4 * parameters if world > 1 else 0
    for x, y in data[:3]:   # compile, recenter, warm up
        one(x, y)
    if world > 1:
        dist.barrier()
    start = time.perf_counter()
    for i in range(steps):
        one(*data[i % len(data)])
    seconds = (time.perf_counter() - start) / steps
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"method": method, "processes": world, "step_ms": 1e3 * seconds,
                       "examples_per_s": world * batch_size / seconds, "bytes_per_step": bytes_per_step,
                       "parameters": parameters}, f)
    if world > 1:
        dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=128, help="examples per rank per step")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rows = []
    for method in ("transform", "ddp_optim"):
        for world in (1, 2):
            out = f"/tmp/halp_fx_dp_{os.getpid()}.json"
            mp.start_processes(run, args=(world, method, args.steps, args.batch_size, args.compile, free_port(), out),
                               nprocs=world, start_method="spawn")
            with open(out) as f:
                rows.append(json.load(f))
    base = {r["method"]: r["examples_per_s"] for r in rows if r["processes"] == 1}
    print("| method | processes | step ms | examples/s | speed-up | bytes all-reduced per step |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['method']} | {r['processes']} | {r['step_ms']:.1f} | {r['examples_per_s']:.0f} | "
              f"{r['examples_per_s'] / base[r['method']]:.2f}x | {r['bytes_per_step'] / 1e6:.2f} MB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
