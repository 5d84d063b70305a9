"""Where a compiled low-precision HALP step spends its time, by kind of kernel.

    python benchmarks/profile_low_precision.py --model mlp1024 --batch-size 128 --threads 1

For compiled SGD, SVRG and HALP 8-bit with ``arithmetic="int8"`` (float32 and bf16 anchor), torch.profiler over
``--steps`` inner steps, the self CPU time per step of: int8 products (``_int_mm``), bf16 products, float32
products, and everything else (Inductor's fused elementwise kernels: quantization, the offset update with its
rounding, the loss). ``--by-shape`` adds each product's time per step by its operands' shapes.
"""
import argparse
import collections
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from benchmarks import models  # noqa: E402
from benchmarks.methods import METHODS, prepare_step_timing  # noqa: E402
from benchmarks.run import cpu_flags  # noqa: E402

PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::_int_mm")
# int8 values through a bf16 kernel (halp_fx.centered_int8.integer_mm_via_bf16): counted whole, with the float32
# mm and the conversions inside it.
VIA_BF16 = "halp_fx::integer_mm_via_bf16"


def kind(event):
    """What a product event is: by its input dtypes for aten's; ``None`` for other events."""
    if event.name == VIA_BF16:
        return "int8 values via bf16 kernel"
    if event.name not in PRODUCTS:
        return None
    if event.name == "aten::_int_mm":
        return "int8 products"
    types = " ".join(str(t) for t in (getattr(event, "input_dtypes", None) or []))
    return "bf16 products" if "BFloat16" in types else "float32 products"


def _inside_via_bf16(event):
    parent = event.cpu_parent
    while parent is not None:
        if parent.name == VIA_BF16:
            return True
        parent = parent.cpu_parent
    return False


def profile_method(name, model, batch_size, steps, by_shape=False, rest_by_kernel=0):
    # T = len(batches): no recenter falls among the steps warmed (1 .. steps) or profiled (steps+1 .. 2*steps).
    batches = models.batches(model, batch_size, 3 * steps, "cpu")
    method = METHODS[name](models.build(model, "cpu"), batches, compile=True)
    method.start()
    for i in range(1, steps + 1):
        method.step(i)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for i in range(steps + 1, 2 * steps + 1):
            assert not method.step(i), "a recenter in the profiled steps"
    times, calls = collections.Counter(), collections.Counter()
    shape_times, shape_calls = collections.Counter(), collections.Counter()
    rest_times, rest_calls = collections.Counter(), collections.Counter()
    total = 0.0
    for event in prof.events():
        total += event.self_cpu_time_total
        found = kind(event)
        if not found and not _inside_via_bf16(event):
            rest_times[event.name] += event.self_cpu_time_total
            rest_calls[event.name] += 1
        if not found or (found != "int8 values via bf16 kernel" and _inside_via_bf16(event)):
            continue
        spent = event.cpu_time_total if found == "int8 values via bf16 kernel" else event.self_cpu_time_total
        times[found] += spent
        calls[found] += 1
        shapes = event.input_shapes[1:3] if event.name == "aten::addmm" else event.input_shapes[:2]
        key = (found, " x ".join(str(tuple(shape)) for shape in shapes))
        shape_times[key] += spent
        shape_calls[key] += 1
    times["everything else"] = total - sum(times.values())
    found = {k: (v / steps / 1e3, calls[k] // steps) for k, v in times.items()}
    rows = []
    if by_shape:
        rows = sorted(((key[0], key[1], t / steps / 1e3, shape_calls[key] // steps) for key, t in shape_times.items()),
                      key=lambda row: -row[2])
    rows += [("everything else:", name, t / steps / 1e3, rest_calls[name] // steps)
             for name, t in rest_times.most_common(rest_by_kernel)]
    return found, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mlp1024", choices=sorted(models.MODELS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--by-shape", action="store_true", help="each product's time by its operands' shapes")
    p.add_argument("--rest-by-kernel", type=int, default=0, metavar="N",
                   help="the N costliest events that are not products, Inductor's fused kernels named one by one")
    p.add_argument("--methods", nargs="+", default=["compiled_sgd", "compiled_svrg", "compiled_halp8_int8",
                                                     "compiled_halp8_int8_bf16"])
    args = p.parse_args(argv)
    prepare_step_timing(args.threads)
    # --rest-by-kernel: each fused C++ kernel an event of its own, for this run only
    with torch._inductor.config.patch({"cpp.enable_kernel_profile": True} if args.rest_by_kernel else {}):
        print(f"{args.model}, batch {args.batch_size}, {args.threads} thread(s), torch {torch.__version__}, "
              f"CPU flags {' '.join(cpu_flags())}; "
              f"ms per inner step (calls per step)")
        for name in args.methods:
            found, shapes = profile_method(name, args.model, args.batch_size, args.steps, args.by_shape,
                                           args.rest_by_kernel)
            print(f"  {name}: " + ", ".join(f"{k} {ms:.2f} ms" + (f" ({n})" if n else "")
                                            for k, (ms, n) in sorted(found.items())))
            for product, operands, ms, n in shapes:
                print(f"    {product} {operands}: {ms:.2f} ms ({n})")


if __name__ == "__main__":
    main()
