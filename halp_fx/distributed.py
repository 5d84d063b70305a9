"""Data-parallel HALP over ``torch.distributed``: replicas that stay bit-identical with one all-reduce per step.

Each rank runs the step on its own batch. The step's corrected directions
``u = g(W) - g(A) + G`` of all tensors, its loss and its new floating-point
buffers travel in one flat bucket, summed over the ranks by one functional
all-reduce (which Inductor compiles) and divided by the number of ranks. Every
rank then holds the same averaged direction and, since the stochastic rounding
noise comes from a counter rather than a generator, rounds it to the same
offsets: the replicas stay identical without ever sending weights. A NaN on
one rank makes the averaged values NaN on every rank, so all skip (or raise)
together. BatchNorm's running statistics are averaged over the ranks each step.

The recenter sums each rank's example-weighted gradients and example count,
and one all-reduce gives every rank the mean over the whole data set.

A graph names its group by a string (a graph's code cannot hold a process
group object): :func:`group_name` registers the group under that name. The
registry, and a step, hold the group weakly: after
``torch.distributed.destroy_process_group()`` nothing of halp_fx keeps it
alive, so its threads stop then and not during the interpreter's exit (where
gloo aborts the process, "terminate called without an active exception").
"""
import weakref

import torch

GROUPS = weakref.WeakValueDictionary()


def resolve_process_group(process_group):
    """The group a step averages over, or ``None`` for a single-process step.

    ``None``: the default group when ``torch.distributed`` is initialized with
    more than one process; ``False``: none; a ``ProcessGroup``: that group.
    """
    if process_group is False:
        return None
    available = torch.distributed.is_available()
    if process_group is None:
        if not (available and torch.distributed.is_initialized()):
            return None
        process_group = torch.distributed.group.WORLD
    elif not (available and isinstance(process_group, torch.distributed.ProcessGroup)):
        raise TypeError("process_group must be None (the default group when torch.distributed is initialized), "
                        f"False (no data parallelism) or a torch.distributed.ProcessGroup; got {type(process_group).__name__}")
    return process_group if torch.distributed.get_world_size(process_group) > 1 else None


def group_name(group):
    """A string that names ``group`` in a graph (its ranks, which identify it among the groups of one job)."""
    ranks = torch.distributed.get_process_group_ranks(group)
    name = "ranks_" + "_".join(map(str, ranks))
    GROUPS[name] = group
    return name


def group_named(name):
    """The live group registered under ``name``; an error saying what happened once it has been destroyed."""
    group = GROUPS.get(name)
    if group is None:
        raise RuntimeError(f"the process group {name} this step averages over has been destroyed "
                           "(torch.distributed.destroy_process_group()): a data-parallel step runs only while its "
                           "group lives; build a new step after init_process_group")
    return group


def average_over_ranks(*tensors, group, world_size):
    """The mean of each tensor over the ranks of ``group`` (a name from :func:`group_name`): one all-reduce of
    one flat float32 bucket."""
    import torch.distributed._functional_collectives as collectives
    flat = torch.cat([t.reshape(-1).to(torch.float32) for t in tensors])
    summed = collectives.all_reduce(flat, "sum", group_named(group))
    if hasattr(collectives, "wait_tensor"):
        summed = collectives.wait_tensor(summed)
    return [part.to(t.dtype) for part, t in zip(_unflatten(summed / world_size, tensors), tensors)]


def sum_over_ranks(group):
    """For the recenter: ``(tensors, count) -> (tensors, count)`` summed over ``group`` in one all-reduce."""
    def reduce(tensors, count):
        flat = torch.cat([t.reshape(-1) for t in tensors] + [torch.tensor([float(count)], device=tensors[0].device)])
        torch.distributed.all_reduce(flat, group=group)
        return _unflatten(flat, tensors), int(round(float(flat[-1])))
    return reduce


def _unflatten(flat, like):
    """Views of the front of ``flat`` shaped as each tensor of ``like``, in order."""
    out, start = [], 0
    for t in like:
        out.append(flat[start:start + t.numel()].view(t.shape))
        start += t.numel()
    return out


def check_same_length(data_loader, group):
    """Ranks whose loaders differ in length fall out of step (one waits in a collective the others never
    reach): refuse it on every rank, naming the lengths."""
    length = len(data_loader)
    lengths = torch.tensor([length, -length], dtype=torch.int64)
    torch.distributed.all_reduce(lengths, op=torch.distributed.ReduceOp.MAX, group=group)
    longest, shortest = int(lengths[0]), -int(lengths[1])
    if longest != shortest:
        raise ValueError(f"data_loader has {length} batches on rank {torch.distributed.get_rank(group)}, but the "
                         f"ranks' loaders range from {shortest} to {longest} batches: every rank must have the same "
                         "number (a DistributedSampler gives each rank an equal share; pass drop_last=True to the "
                         "DataLoader if the batch counts differ)")
