"""The int8 HALP step with its weight-gradient corrections through the bf16 kernel, and without.

    python benchmarks/weight_gradient_kernel.py --model mlp1024 --threads 1

``halp_fx.centered_int8.bf16_kernel_pays`` sends an int8 correction shaped like a weight's gradient through a
bf16 kernel with float32 sums (the same integers, bit for bit) on CPUs with AMX-BF16. This builds each compiled
method twice, with that choice as it is and with it turned off (once where no correction takes the bf16 kernel,
as on a CPU without AMX-BF16: both builds are then the same step), and times them interleaved (``--rounds``
rounds of ``--steps`` inner steps each, every variant once per round), so that a slow period of the machine
falls on all alike: the median and the fastest round, ms per inner step, with ``--baselines`` (compiled float32
SGD and SVRG) timed in the same rounds, and the medians' ratios to them, with each method's page faults per
step. ``--keep-freed-memory``: glibc's malloc keeps freed memory for reuse in this run
(:func:`halp_fx.freed_memory.keep_freed_memory`), for every method alike.
"""
import argparse
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks import models  # noqa: E402
from benchmarks.methods import METHODS, prepare_step_timing  # noqa: E402
from benchmarks.run import cpu_flags  # noqa: E402
from halp_fx import centered_int8, introspection  # noqa: E402
from halp_fx.freed_memory import keep_freed_memory  # noqa: E402


def build(name, model, batch_size, count, route):
    """A started method whose int8 pass may (``route``) or may not use the bf16 kernel."""
    chosen = centered_int8.bf16_kernel_pays
    if not route:
        centered_int8.bf16_kernel_pays = lambda *args, **kwargs: False
    try:
        method = METHODS[name](models.build(model, "cpu"), models.batches(model, batch_size, count, "cpu"),
                               compile=True)
        method.start()
    finally:
        centered_int8.bf16_kernel_pays = chosen
    if getattr(method, "arithmetic", "fp32") != "int8":
        return method, None
    final = list(introspection.graphs(method.halp_step.programs).values())[-1]
    return method, sum(1 for node in final.graph.nodes
                       if node.target is centered_int8.int8_term and node.kwargs.get("via_bf16"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp1024", choices=sorted(models.MODELS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="+", default=["compiled_halp8_int8", "compiled_halp8_int8_bf16"])
    p.add_argument("--baselines", nargs="*", default=["compiled_sgd", "compiled_svrg"])
    p.add_argument("--keep-freed-memory", action="store_true",
                   help="glibc's malloc keeps freed memory for reuse (mallopt), for every method alike")
    args = p.parse_args(argv)
    prepare_step_timing(args.threads)
    memory = "glibc malloc's defaults"
    if args.keep_freed_memory:
        applied, why = keep_freed_memory()
        if not applied:
            p.error(f"--keep-freed-memory: {why}")
        memory = "freed memory kept for reuse (mallopt M_MMAP_MAX 0, M_TRIM_THRESHOLD -1)"
    count = args.steps * args.rounds + 4   # T = count: no recenter among the timed steps
    variants = {}
    for name in args.baselines + args.methods:
        for route in (True,) if name in args.baselines else (True, False):
            if not route and variants[(name, True)][1] == 0:
                break   # no correction went through the bf16 kernel: turning it off would build the same step
            method, kernels = build(name, args.model, args.batch_size, count, route)
            for i in range(1, 4):
                method.step(i)
            variants[(name, route)] = method, kernels
    times = {key: [] for key in variants}
    faults = {key: [] for key in variants}
    for r in range(args.rounds):
        first = 4 + r * args.steps
        for key, (method, _) in variants.items():
            faulted = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for i in range(first, first + args.steps):
                method.step(i)
            times[key].append((time.perf_counter() - start) / args.steps * 1e3)
            faults[key].append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faulted) / args.steps)
    print(f"{args.model}, batch {args.batch_size}, {args.threads} thread(s), torch {torch.__version__}, CPU flags "
          f"{' '.join(cpu_flags())}; {memory}; ms per inner step over {args.rounds} interleaved rounds of "
          f"{args.steps} steps\n")
    medians = {key: statistics.median(t) for key, t in times.items()}
    ratios = args.baselines
    print("| method | weight-gradient corrections | terms via bf16 | median ms | fastest round ms | "
          + " | ".join(f"/ {name}" for name in ratios) + " | page faults per step |")
    print("| --- | --- | ---: | ---: | ---: |" + " ---: |" * len(ratios) + " ---: |")
    for (name, route), (_, kernels) in variants.items():
        label = ("-" if kernels is None else "int8 kernel (the bf16 kernel does not pay here)" if kernels == 0
                 else "as chosen (bf16 kernel where it pays)" if route else "int8 kernel")
        print(f"| {name} | {label} | {'-' if kernels is None else kernels} | {medians[(name, route)]:.2f} | "
              f"{min(times[(name, route)]):.2f} | "
              + " | ".join(f"{medians[(name, route)] / medians[(b, True)]:.2f}" for b in ratios)
              + f" | {statistics.median(faults[(name, route)]):.0f} |")
    return times


if __name__ == "__main__":
    main()
