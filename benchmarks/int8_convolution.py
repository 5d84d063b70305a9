"""Whether an int8 convolution can pay on this CPU: each convolution of the benchmark CNN and of LeNet-5 at batch
128, its float32 forward against the int8 routes a centered correction could take.

A centered convolution at W would be the anchor's convolution plus two int8 corrections (the input's difference
against the anchor's weight, the input against the weight's offset ``d * Z``), so one int8 convolution must cost
well under half the float32 one before a correction pays. Timed per route, one thread, the median of ``--repeats``:

* ``fp32``, ``bf16``: ``F.conv2d`` on float32 and on bf16 operands (what a bf16 anchor pass would run);
* ``im2col``: the ``F.unfold`` that a convolution as ``_int_mm`` needs, alone;
* ``im2col_int8``: ``F.unfold``, per-row quantization and ``_int_mm`` against an int8 weight;
* ``onednn_int8``: oneDNN's quantized convolution (``torch.ops.quantized.conv2d``, the x86 engine) on a weight
  packed once, the input quantized per call (the weight's offset changes every step, so a correction would also
  pack it every step: ``onednn_int8_packed_per_call``).

``python benchmarks/int8_convolution.py --csv docs/results/benchmarks/int8_convolution.csv``
"""
import argparse
import csv
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from halp_fx import centered_int8  # noqa: E402

# (model, layer, in channels, height = width, out channels, kernel, padding): the input each layer sees at batch 128
LAYERS = [("cnn", "conv1", 1, 8, 16, 3, 1), ("cnn", "conv2", 16, 4, 32, 3, 1),
          ("lenet5", "conv1", 1, 28, 6, 5, 2), ("lenet5", "conv2", 6, 14, 16, 5, 0)]


def median_ms(fn, repeats):
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def routes(batch, channels, size, out_channels, kernel, padding):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=g)
    w = torch.randn(out_channels, channels, kernel, kernel, generator=g)
    depth = channels * kernel * kernel
    int8_weight = torch.randint(-127, 128, (depth, out_channels), dtype=torch.int8, generator=g)

    def columns():
        return F.unfold(x, kernel, padding=padding).transpose(1, 2).reshape(-1, depth)

    def im2col_int8():
        q, _ = centered_int8.quantize_rows(columns())
        return centered_int8.int8_mm(q, int8_weight)

    xb, wb = x.bfloat16(), w.bfloat16()
    found = {"fp32": lambda: F.conv2d(x, w, padding=padding), "bf16": lambda: F.conv2d(xb, wb, padding=padding),
             "im2col": columns, "im2col_int8": im2col_int8}
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the quantized tensor API is deprecated; measured all the same

            def pack():
                scales = w.abs().amax((1, 2, 3)) / 127
                qw = torch.quantize_per_channel(w, scales, torch.zeros(out_channels, dtype=torch.long), 0, torch.qint8)
                return torch.ops.quantized.conv2d_prepack(qw, None, [1, 1], [padding] * 2, [1, 1], 1)

            packed = pack()

            def onednn(weight=None):
                qx = torch.quantize_per_tensor(x, float(x.abs().max()) / 127, 128, torch.quint8)
                return torch.ops.quantized.conv2d(qx, packed if weight is None else weight, 1.0, 0).dequantize()

            found["onednn_int8"] = onednn
            found["onednn_int8_packed_per_call"] = lambda: onednn(pack())
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--csv", help="write the rows here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for model, layer, channels, size, out_channels, kernel, padding in LAYERS:
        times = {name: median_ms(fn, args.repeats)
                 for name, fn in routes(args.batch, channels, size, out_channels, kernel, padding).items()}
        row = {"model": model, "layer": layer, "input": f"{args.batch}x{channels}x{size}x{size}",
               "weight": f"{out_channels}x{channels}x{kernel}x{kernel}"}
        row.update({f"{name}_ms": f"{t:.3f}" for name, t in times.items()})
        row.update({f"{name}_over_fp32": f"{t / times['fp32']:.2f}" for name, t in times.items() if name != "fp32"})
        rows.append(row)
        print(", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    if args.csv:
        os.makedirs(os.path.dirname(os.path.abspath(args.csv)), exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print("wrote", args.csv)
    return rows


if __name__ == "__main__":
    main()
