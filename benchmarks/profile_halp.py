"""Where a compiled HALP step spends its time; the numbers behind docs/performance.md's findings.

    python benchmarks/profile_halp.py --model mlp --batch-size 32 --threads 1 [--dump DIR]

Prints, for ``transform(bits=None)`` and ``transform(bits=8)``:

* the first call split into capture (make_fx), the HALP passes and Inductor;
* an inner step split into the compiled graph and the Python runtime around it,
  with the part of the runtime spent computing the stochastic-rounding keys;
* a recenter split into the compiled gradient calls and the rest;
* the offset update alone, compiled, per element: SVRG's float update, HALP's
  nearest and stochastic rounding, and the noise alone.

``--dump DIR`` writes each stage's graph and Inductor's output code (``step.dump``).
"""
import argparse
import collections
import functools
import os
import statistics
import sys
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

import halp_fx  # noqa: E402
import halp_fx.programs as programs  # noqa: E402
from benchmarks import models  # noqa: E402
from benchmarks.methods import LR, MU, loss_fn  # noqa: E402
from halp_fx import bit_centering  # noqa: E402
from halp_fx.roles import Role  # noqa: E402


def median_time(fn, calls):
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class PhaseClock:
    """Wraps the functions a first call goes through and adds up the time spent in each."""

    def __init__(self):
        self.spent = collections.Counter()
        import torch._inductor.compile_fx as inductor
        self._wrap(inductor, "compile_fx", "Inductor")
        self._wrap(programs, "capture_gradient", "capture")
        self._wrap(programs.passes, "run_passes", "passes")

    def _wrap(self, module, name, label):
        original = getattr(module, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.spent[label] += time.perf_counter() - start
        setattr(module, name, timed)


def profile_transform(bits, batches, args, clock):
    clock.spent.clear()
    step = halp_fx.transform(models.build(args.model, "cpu"), bits=bits, loss_fn=loss_fn, data_loader=batches,
                             lr=LR, mu=MU, T=10 ** 9)
    start = time.perf_counter()
    step(*batches[0])
    first = time.perf_counter() - start
    phases = ", ".join(f"{k} {v:.2f} s" for k, v in clock.spent.items())
    print(f"bits={bits}: first call {first:.2f} s ({phases}, rest {first - sum(clock.spent.values()):.2f} s)")

    entry = step.programs.first
    n = len(batches)
    for i in range(20):
        step(*batches[i % n])
    # The program and inputs as the runtime assembles them, built once here so the graph is timed alone.
    keys = bit_centering.rounding_keys(step.rounding_counter, len(step.anchor)) if bits is not None else None
    programs_and_inputs = [step._program_for(b, keys) for b in batches]
    programs_and_inputs = [(program.fn, program.inputs(sources)) for program, sources in programs_and_inputs]
    whole = median_time(lambda i: step(*batches[i % n]), args.calls)
    graph = median_time(lambda i: programs_and_inputs[i % n][0](*programs_and_inputs[i % n][1]), args.calls)
    keys = 0.0
    if bits is not None:
        keys = median_time(lambda i: bit_centering.rounding_keys(step.rounding_counter + i, len(step.anchor)),
                           args.calls)
    print(f"  inner step {whole * 1e6:.0f} us = compiled graph {graph * 1e6:.0f} us + runtime "
          f"{(whole - graph) * 1e6:.0f} us (rounding_keys alone: {keys * 1e6:.0f} us)")

    gradient = entry.full_gradient
    at_weights = {**step.state.tensors, Role.PARAM: step.weights()}
    gradient_inputs = [gradient.inputs({**at_weights, Role.BATCH: b}) for b in batches]
    recenter = median_time(lambda i: step.recenter(), 15)
    calls = median_time(lambda i: [gradient.fn(*x) for x in gradient_inputs], 15)
    print(f"  recenter {recenter * 1e3:.2f} ms = {n} compiled gradient calls {calls * 1e3:.2f} ms + rest "
          f"{(recenter - calls) * 1e3:.2f} ms")
    if args.dump:
        written = step.dump(os.path.join(args.dump, f"bits_{bits}"))
        print(f"  wrote {len(written)} files under {os.path.join(args.dump, f'bits_{bits}')}")


def profile_offset_update(size):
    """The offset update of one size x size tensor, compiled alone."""
    from torch._inductor.compile_fx import compile_fx
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.utils.benchmark import Timer
    g, ga, G = torch.randn(size, size), torch.randn(size, size), torch.randn(size, size)
    offset8, offset32 = torch.zeros(size, size, dtype=torch.int8), torch.zeros(size, size)
    scale, lr, key = torch.tensor(0.01), torch.tensor(LR), torch.tensor(12345, dtype=torch.int64)

    def svrg(z, g, ga, G, lr):
        return (bit_centering.offset_step(z, None, bit_centering.svrg_corrected(g, ga, G), lr, None, "nearest"),)

    def halp_nearest(z, scale, g, ga, G, lr):
        return (bit_centering.offset_step(z, scale, bit_centering.svrg_corrected(g, ga, G), lr, 8, "nearest"),)

    def halp_stochastic(z, scale, g, ga, G, lr, key):
        direction = bit_centering.svrg_corrected(g, ga, G)
        return (bit_centering.offset_step(z, scale, direction, lr, 8, "stochastic", key),)

    def noise_only(z, key):
        return (bit_centering.uniform_noise(z, key),)

    def int8_round_trip(z, g):
        return ((z.to(torch.float32) + g).to(torch.int8),)

    cases = [(svrg, [offset32, g, ga, G, lr]), (halp_nearest, [offset8, scale, g, ga, G, lr]),
             (halp_stochastic, [offset8, scale, g, ga, G, lr, key]), (noise_only, [offset8, key]),
             (int8_round_trip, [offset8, g])]
    print(f"offset update of one {size}x{size} tensor, compiled alone:")
    for fn, inputs in cases:
        compiled = compile_fx(make_fx(fn)(*inputs), inputs)
        t = Timer("f(*x)", globals={"f": compiled, "x": inputs}).blocked_autorange(min_run_time=0.5).median
        print(f"  {fn.__name__:16s} {t * 1e6:8.1f} us  {t / size ** 2 * 1e9:5.2f} ns/element")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp", choices=sorted(models.MODELS))
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--calls", type=int, default=300, help="timed calls per median")
    p.add_argument("--threads", type=int)
    p.add_argument("--update-size", type=int, default=256, help="side of the tensor in the offset-update timing")
    p.add_argument("--dump", help="write graphs and Inductor output code here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=halp_fx.SaturationWarning)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.model} batch {args.batch_size}")
    clock = PhaseClock()
    batches = models.batches(args.model, args.batch_size, args.batches, "cpu")
    for bits in (None, 8):
        profile_transform(bits, batches, args, clock)
    profile_offset_update(args.update_size)


if __name__ == "__main__":
    main()
