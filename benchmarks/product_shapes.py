"""One matrix product in float32, bf16 and int8, at the shapes of a HALP step, on this machine.

    python benchmarks/product_shapes.py --threads 1

For each ``M x K x N``: milliseconds per call (the median of ``--calls`` calls each, the kernels interleaved call
by call so that a slow period of the machine falls on all alike, after two warm-up calls) of a float32
``mm``, a bf16 ``mm`` (operands cast beforehand, a bf16 result) and ``torch._int_mm`` (int8 operands, an exact
int32 result, checked against the int32 reference: oneDNN's is inexact on CPUs without VNNI or AMX), the same
int8 values through a bf16 kernel with float32 sums (``halp_fx.centered_int8``'s ``integer_mm_via_bf16``, where
this torch has it; exact; given the values widened to float32, as the compiled step gives them), and the speed-up
of each over float32. The default shapes are mlp1024's at batch 128: its forward and grad-input products
(``128 x K x N``) and its weight-gradient products, whose summed dimension is the batch (``N_out x 128 x N_in``).
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import torch  # noqa: E402

from benchmarks.run import cpu_flags  # noqa: E402
from halp_fx.centered_int8 import INTEGER_MM_VIA_BF16  # noqa: E402

MLP1024_SHAPES = ["128x784x1024", "128x1024x1024", "128x1024x10", "1024x128x784", "1024x128x1024", "10x128x1024"]


def median_ms(products, calls):
    """``{name: median ms per call}``, the products called in turn, ``calls`` times each."""
    for product in products.values():
        product(), product()
    spent = {name: [] for name in products}
    for _ in range(calls):
        for name, product in products.items():
            start = time.perf_counter()
            product()
            spent[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) * 1e3 for name, times in spent.items()}


def time_shape(m, k, n, calls):
    a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    af, bf = a8.float(), b8.float()
    ab, bb = af.bfloat16(), bf.bfloat16()
    exact = torch.equal(torch._int_mm(a8, b8), a8.int() @ b8.int())
    products = {"float32": lambda: af @ bf, "bf16": lambda: ab @ bb, "int8": lambda: torch._int_mm(a8, b8)}
    if INTEGER_MM_VIA_BF16:
        via = torch.ops.halp_fx.integer_mm_via_bf16
        assert torch.equal(via(af, bf).to(torch.int32), a8.int() @ b8.int())
        products["via bf16"] = lambda: via(af, bf)
    return {"int8 exact": exact, **median_ms(products, calls)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=MLP1024_SHAPES, help="M x K x N, e.g. 1024x128x1024")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, CPU flags {' '.join(cpu_flags()) or 'none read'}, "
          f"{args.threads} thread(s), median ms per call of {args.calls}, interleaved\n")
    print("| M x K x N | float32 | bf16 | int8 (`_int_mm`) | int8 via bf16 kernel | bf16 speed-up | int8 speed-up "
          "| via bf16 speed-up | int8 exact |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for shape in args.shapes:
        m, k, n = (int(d) for d in shape.split("x"))
        ms = time_shape(m, k, n, args.calls)
        via = ms.get("via bf16")
        print(f"| {m}×{k}×{n} | {ms['float32']:.3f} | {ms['bf16']:.3f} | {ms['int8']:.3f} | "
              + (f"{via:.3f}" if via else "-") + f" | {ms['float32'] / ms['bf16']:.1f}× | "
              f"{ms['float32'] / ms['int8']:.1f}× | " + (f"{ms['float32'] / via:.1f}×" if via else "-")
              + f" | {'yes' if ms['int8 exact'] else 'no'} |")


if __name__ == "__main__":
    main()
