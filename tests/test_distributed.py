"""Data-parallel HALP on torch.distributed (gloo, 2 processes on CPU, spawned by the test on a free port).

Each test starts the processes, which write what they saw to files; the test compares them. A process
that hangs fails the test after a time limit instead of blocking CI.
"""
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import halp_fx
from benchmarks.data_parallel import free_port
from halp_fx.optim import HALP

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

WORLD = 2
TIME_LIMIT_S = 240


def run_ranks(worker, tmp_path, *args):
    """Run ``worker(rank, out_dir, *args)`` in 2 processes; return what each saved as ``rank<r>.pt``."""
    port = free_port()
    context = mp.start_processes(_entry, args=(worker, port, str(tmp_path), args), nprocs=WORLD, join=False,
                                 start_method="spawn")
    import time
    deadline = time.monotonic() + TIME_LIMIT_S
    while not context.join(timeout=max(1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD} processes did not finish within {TIME_LIMIT_S} s (a collective hung?)")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _entry(rank, worker, port, out_dir, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, init_method=f"tcp://127.0.0.1:{port}")
    try:
        result = worker(rank, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        if dist.is_initialized():   # a worker may have destroyed it itself
            dist.destroy_process_group()


def global_batches(steps=6, batch=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(steps * batch * WORLD, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    return [(x[i:i + batch * WORLD], y[i:i + batch * WORLD]) for i in range(0, len(x), batch * WORLD)]


def shard(batches, rank):
    """Rank r's part of each global batch, as a DistributedSampler would give it."""
    return [(x[rank::WORLD], y[rank::WORLD]) for x, y in batches]


def mlp(batch_norm=True):
    """With batch norm, whose statistics are averaged over the ranks each step; without, for comparing with one
    process (batch norm over each rank's half batch is not batch norm over the whole batch)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16) if batch_norm else nn.Identity(), nn.ReLU(),
                         nn.Linear(16, 3))


def state_of(step):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in step.state_dict().items()}


# -- workers (module level: the spawned processes import them) ----------------------------------------------

def train_transform(rank, compile, rounding, steps, batch_norm=True):
    data = shard(global_batches(), rank)
    step = halp_fx.transform(mlp(batch_norm), 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, mu=1.0,
                             rounding=rounding, compile=compile, on_nonfinite="skip")
    losses = []
    for i in range(steps):
        losses.append(float(step(*data[i % len(data)])))
    result = {"state": state_of(step), "losses": losses, "graph": step.graphs["all_reduce"].code}
    # a NaN batch on rank 1 only: every rank skips, nothing changes anywhere
    before = state_of(step)
    x, y = data[0]
    step(x * float("nan") if rank == 1 else x, y)
    result["nan_state"], result["nan_before"] = state_of(step), before
    # a checkpoint saved by rank 0 resumes bit-exactly on every rank
    path = os.path.join(os.environ["HALP_FX_TEST_DIR"], "checkpoint.pt")
    if rank == 0:
        halp_fx.save_checkpoint(step.state_dict(), path)
    dist.barrier()
    resumed = halp_fx.transform(mlp(batch_norm), 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, mu=1.0,
                                rounding=rounding, compile=compile, on_nonfinite="skip")
    resumed.load_state_dict(halp_fx.load_checkpoint(path))
    for i in range(3):
        step(*data[i]), resumed(*data[i])
    result["continued"], result["resumed"] = state_of(step), state_of(resumed)
    return result


def unequal_loaders(rank):
    data = shard(global_batches(), rank)[: 6 - rank]
    step = halp_fx.transform(mlp(), 8, loss_fn=F.cross_entropy, data_loader=data, compile=False)
    try:
        step(*data[0])
    except ValueError as error:
        return str(error)
    return "no error"


def outlive_the_group(rank, compile):
    """Destroy the group under a live step: nothing may keep the group alive (gloo aborts a process whose
    group is torn down only at interpreter exit), and the step then says why it cannot run."""
    import gc
    import weakref
    data = shard(global_batches(), rank)
    step = halp_fx.transform(mlp(), 8, loss_fn=F.cross_entropy, data_loader=data, compile=compile)
    step(*data[0])
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()
    try:
        step(*data[1])
        message = "no error"
    except RuntimeError as error:
        message = str(error)
    return {"group_alive": group() is not None, "message": message}


def train_optim(rank, compile):
    from torch.nn.parallel import DistributedDataParallel
    data = shard(global_batches(), rank)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    torch.manual_seed(0)
    for p in model.parameters():
        nn.init.normal_(p, std=0.3)
    ddp = DistributedDataParallel(model)
    opt = HALP(ddp.parameters(), lr=0.1, T=len(data), data_loader=data, mu=1.0, model=ddp, compile=compile)
    for i in range(20):
        x, y = data[i % len(data)]

        def closure(x=x, y=y):
            loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return {"params": [p.detach().clone() for p in model.parameters()],
            "state": [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)}
                      for p in model.parameters()]}


# -- tests ---------------------------------------------------------------------------------------------------

def assert_same_states(a, b):
    assert a.keys() == b.keys()
    for key in a:
        same = torch.equal(a[key], b[key]) if isinstance(a[key], torch.Tensor) else a[key] == b[key]
        assert same, key


@pytest.fixture
def test_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HALP_FX_TEST_DIR", str(tmp_path))
    return tmp_path


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_transform_replicas_stay_bit_identical_and_skip_a_nan_batch_together(test_dir, compile):
    results = run_ranks(train_transform, test_dir, compile, "stochastic", 20)
    assert_same_states(results[0]["state"], results[1]["state"])   # anchors, offsets, scales, buffers, counter
    assert results[0]["losses"] == results[1]["losses"]            # the loss is averaged over the ranks
    assert results[0]["state"]["rounding_counter"] & 0xFFFFFFFF == 20
    assert "average_over_ranks" in results[0]["graph"]
    for r in results:
        assert r["nan_state"]["nonfinite_steps"] == r["nan_before"]["nonfinite_steps"] + 1
        r["nan_state"]["nonfinite_steps"] -= 1
        assert_same_states(r["nan_before"], r["nan_state"])
        assert_same_states(r["continued"], r["resumed"])


def test_two_processes_match_one_process_on_the_same_global_batches(test_dir):
    results = run_ranks(train_transform, test_dir, False, "nearest", 12, False)
    data = global_batches()
    model = mlp(batch_norm=False)
    single = halp_fx.transform(model, 8, loss_fn=F.cross_entropy, data_loader=data, lr=0.1, mu=1.0,
                               rounding="nearest", compile=False, process_group=False)
    losses = [float(single(*data[i % len(data)])) for i in range(12)]
    assert losses == pytest.approx(results[0]["losses"], rel=1e-4)
    state = results[0]["state"]
    flips = sum(int((single.offset[n] != state[f"{n}.offset"]).sum()) for n in single.offset)
    total = sum(z.numel() for z in single.offset.values())
    assert flips <= 0.01 * total   # float summation order differs: rare flips of the nearest rounding


def test_loaders_of_different_lengths_are_refused_on_every_rank(test_dir):
    messages = run_ranks(unequal_loaders, test_dir)
    for message in messages:
        assert "ranks' loaders range from 5 to 6 batches" in message


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_step_does_not_keep_a_destroyed_group_alive_and_then_says_so(test_dir, compile):
    for result in run_ranks(outlive_the_group, test_dir, compile):
        assert not result["group_alive"]
        assert "has been destroyed (torch.distributed.destroy_process_group())" in result["message"]


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_optimizers_on_a_ddp_model_stay_identical(test_dir, compile):
    results = run_ranks(train_optim, test_dir, compile)
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
    for a, b in zip(results[0]["state"], results[1]["state"]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_process_group_of_the_wrong_type_is_refused():
    with pytest.raises(TypeError, match="process_group must be None"):
        halp_fx.transform(mlp(), 8, process_group="gloo")


def test_the_data_parallel_example_runs_under_torchrun_and_its_replicas_agree():
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", os.path.join(root, "examples", "data_parallel.py"),
                          "--epochs", "2", "--timeout-s", "60"], capture_output=True, text=True, timeout=TIME_LIMIT_S)
    assert run.returncode == 0, run.stderr[:3000]   # the ranks' own output comes before the launcher's traceback
    assert run.stdout.count("state identical on all ranks") == 2
    assert "2 ranks, 8-bit HALP: test accuracy" in run.stdout
