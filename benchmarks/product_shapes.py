"""One matrix product in float32, bf16 and int8, at the shapes of a HALP step, on this machine.

    python benchmarks/product_shapes.py --threads 1

For each ``M x K x N``: milliseconds per call (the mean of ``--calls`` after two warm-up calls) of a float32
``mm``, a bf16 ``mm`` (operands cast beforehand, a bf16 result) and ``torch._int_mm`` (int8 operands, an exact
int32 result, checked against the int32 reference: oneDNN's is inexact on CPUs without VNNI or AMX), and the
speed-up of each over float32. The default shapes are mlp1024's at batch 128: its forward
and grad-input products (``128 x K x N``) and its weight-gradient products, whose summed dimension is the batch
(``N_out x 128 x N_in``).
"""
import argparse
import time

import torch

from halp_fx.centered_int8 import cpu_flags

MLP1024_SHAPES = ["128x784x1024", "128x1024x1024", "128x1024x10", "1024x128x784", "1024x128x1024", "10x128x1024"]


def per_call_ms(product, calls):
    product(), product()
    start = time.perf_counter()
    for _ in range(calls):
        product()
    return (time.perf_counter() - start) / calls * 1e3


def time_shape(m, k, n, calls):
    a8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
    b8 = torch.randint(-127, 128, (k, n), dtype=torch.int8)
    af, bf = a8.float(), b8.float()
    ab, bb = af.bfloat16(), bf.bfloat16()
    exact = torch.equal(torch._int_mm(a8, b8), a8.int() @ b8.int())
    return {"int8 exact": exact, "float32": per_call_ms(lambda: af @ bf, calls), "bf16": per_call_ms(lambda: ab @ bb, calls),
            "int8": per_call_ms(lambda: torch._int_mm(a8, b8), calls)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=MLP1024_SHAPES, help="M x K x N, e.g. 1024x128x1024")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    flags = " ".join(sorted(cpu_flags() & {"avx2", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"}))
    print(f"torch {torch.__version__}, CPU flags {flags or 'none of avx2/avx512_vnni/avx512_bf16/amx'}, "
          f"{args.threads} thread(s), ms per call (mean of {args.calls})\n")
    print("| M x K x N | float32 | bf16 | int8 (`_int_mm`) | bf16 speed-up | int8 speed-up | int8 exact |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for shape in args.shapes:
        m, k, n = (int(d) for d in shape.split("x"))
        ms = time_shape(m, k, n, args.calls)
        print(f"| {m}×{k}×{n} | {ms['float32']:.3f} | {ms['bf16']:.3f} | {ms['int8']:.3f} | "
              f"{ms['float32'] / ms['bf16']:.1f}× | {ms['float32'] / ms['int8']:.1f}× | {'yes' if ms['int8 exact'] else 'no'} |")


if __name__ == "__main__":
    main()
