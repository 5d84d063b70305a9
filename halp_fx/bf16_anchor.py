"""The bf16 anchor pass (``transform(..., arithmetic="int8", anchor_precision="bf16")``): the anchor's matrix
products in bf16, where the products at W are built on them.

With centered products the pass at W reads the anchor's values: ``f(W) = f(A) +
(int8 difference)`` for every centered product ``f``. An error ``e`` in an anchor
value (bf16 operands: relative ``2**-8`` at most, about ``2**-9`` typically) enters
both passes alike, so it cancels in ``g(W) - g(A)``; what remains is of order
``e * |W - A|``, the order of the int8 corrections' own error, and zero at a
recenter, where the step is ``G`` exactly. So only anchor products whose twin at
W is centered run in bf16; the full gradient ``G``, which enters the direction
unscaled, stays float32, as does all elementwise work.

A product takes bf16 operands (an anchor weight cast once per recenter, see
:mod:`halp_fx.passes.anchor_constants_pass`) and gives a float32 result; an
``addmm``'s bias is added in float32.
"""
import torch

from .centered_int8 import usable_cpu_flags


def to_bf16(x):
    return x.to(torch.bfloat16)


def mm(a, b):
    """``a @ b`` of bf16 operands, as float32."""
    return torch.mm(a, b).to(torch.float32)


def addmm(bias, a, b):
    """``bias + a @ b``: the product of bf16 operands, the bias added in float32."""
    return bias + torch.mm(a, b).to(torch.float32)


def products_pay(device):
    """``(True, "")`` where bf16 products beat float32 ones on ``device``, else ``(False, why)``.

    Measured on a 2-core EPYC with AVX512-BF16, one thread, torch 2.13: a bf16 ``mm`` at 128x1024x1024 took 1.28 ms
    against 2.80 ms in float32. Without AVX512-BF16 or AMX-BF16 oneDNN emulates bf16, slower than float32.
    Assumed, not measured here: CUDA's bf16 products (cuBLAS) beat float32 ones.
    """
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and usable_cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return True, ""
    return False, "this CPU has no AVX512-BF16/AMX-BF16, where bf16 products are emulated (slower than float32)"
