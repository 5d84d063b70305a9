"""Centered int8 arithmetic: a matrix product at the weights as the anchor's product plus int8 corrections.

For a bilinear ``f`` (``mm``, ``addmm``) with operands ``a``, ``b`` at the
weights and ``a_A``, ``b_A`` at the anchor::

    f(a, b) = f(a_A, b_A) + f(a - a_A, b_A) + f(a, b - b_A)

The first term is the anchor pass's own product, which the step computes
anyway. The two corrections multiply a *difference* that is zero right after a
recenter and small after it, so they run as int8 products (int32 accumulation)
with little error: a float operand is quantized to the nearest integer on a
scale per row (left operand) or per column (right operand), the dimensions that
are not summed over, so the scales come out of the sum as an outer product.

Where a difference is a weight's own, ``W - A = d * Z``, it is not quantized at
all: the integer offset ``Z`` (int8 up to 8 bits, viewed as the product needs
it) and the scalar scale ``d`` enter the int8 product as they are. Where an
operand is the same in both passes (the input batch at the first layer), its
difference is zero and that term is left out. An anchor operand that depends on
the anchors alone (``t(A)``) is quantized once per recenter
(:mod:`halp_fx.passes.anchor_constants_pass`).
"""
import functools
import os

import torch

# Second operands within 7 bits: oneDNN's s8 x s8 products saturate an intermediate sum on x86 CPUs without
# AVX512-VNNI or AMX unless the second operand stays within [-64, 63] ("reduce range").
FULL_RANGE, REDUCED_RANGE = 127, 63


def quantize(x, dim, levels):
    """``(q, scale)``: ``x ~ q * scale`` with ``q`` int8 in ``[-levels, levels]`` and one scale per slice along ``dim``
    (``dim=1``: a scale per row; ``dim=0``: per column), the slice's largest magnitude over ``levels``.
    An all-zero slice gets scale 1 and zeros, never a division by zero.

    The scale is the largest of ``|x| / levels``: the largest ``|x|`` over ``levels`` to the bit (a correctly
    rounded division by a positive number keeps the order), divided inside the reduction. Divided after it, the
    division is a cheap function of the reduction's result, which Inductor recomputes in every kernel that reads
    the scale: per element, in the offset update that scales the int8 products (a fifth of it, one thread)."""
    per_level = (x.abs() / levels).amax(dim=dim, keepdim=True)
    scale = torch.where(per_level > 0, per_level, torch.ones_like(per_level))
    return torch.round(x / scale).clamp(-levels, levels).to(torch.int8), scale


def quantize_rows(x):
    """A left operand's ``(q, scale)``: one scale per row, the full int8 range."""
    return quantize(x, 1, FULL_RANGE)


def quantize_columns(x, *, levels):
    """A right operand's ``(q, scale)``: one scale per column, ``levels`` from :func:`second_operand_levels`."""
    return quantize(x, 0, levels)


def int8_mm(a, b):
    """``a @ b`` of int8 matrices, accumulated exactly in int32."""
    if hasattr(torch, "_int_mm") and a.device.type == "cuda":
        return torch._int_mm(a.contiguous(), b.contiguous())
    if hasattr(torch, "_int_mm") and _cpu_int_mm_available():
        # oneDNN takes a transposed right operand (t(Z), an anchor quantized per column) as it is: 0.51 ms against
        # 0.98 ms with a copy at 128x784x1024, one thread with VNNI. A transposed left operand is faster copied.
        return torch._int_mm(a.contiguous(), b)
    return a.to(torch.int32) @ b.to(torch.int32)


def int8_term(qa, sa, qb, sb, *, wide_second=False, via_bf16=False):
    """``(qa * sa) @ (qb * sb)`` through one int8 product: ``sa`` a scale per row or a scalar, ``sb`` per column or
    a scalar. ``wide_second``: ``qb`` may use all 8 bits where the CPU's int8 kernel is exact only within 7
    (:func:`second_operand_levels`); the product is then summed by the exact int32 reference. ``via_bf16``: the
    integers are multiplied by a bf16 kernel with float32 sums (:func:`bf16_kernel_pays`), the same result."""
    if via_bf16:
        # Widened here, in the graph, Inductor writes the float32 operands in the kernels that quantize them,
        # instead of the product converting its int8 operands in passes of their own.
        product = torch.ops.halp_fx.integer_mm_via_bf16(qa.to(torch.float32), qb.to(torch.float32))
    elif wide_second:
        product = qa.to(torch.int32) @ qb.to(torch.int32)
    else:
        product = int8_mm(qa, qb)
    return product.to(torch.float32) * sa * sb


# -- int8 values through a bf16 kernel ----------------------------------------------------------------------------
# Where the summed dimension is the batch (a weight's gradient, N_out x batch x N_in), oneDNN's int8 kernel is
# only about 2x faster than float32 on an AMX Xeon, a bf16 one 4-5x (benchmarks/product_shapes.py). An int8
# value is exact in bf16, each product of two is exact in float32, and so is every partial sum while
# K * 128 * 128 <= 2**24: such a product of integers through a bf16 kernel with float32 sums is exact, bit for
# bit the int32 result. torch's CPU bf16 mm rounds its result to bf16; a float32 mm whose oneDNN precision is
# set to bf16 (torch.backends.mkldnn.matmul.fp32_precision, torch >= 2.9) multiplies in bf16 and sums in float32.
BF16_KERNEL_MAX_K = 2 ** 24 // (128 * 128)


def _mkldnn_matmul_precision():
    """``torch.backends.mkldnn.matmul``, whose ``fp32_precision`` picks oneDNN's internal precision, or ``None``."""
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    return matmul if matmul is not None and hasattr(matmul, "fp32_precision") else None


def _define_integer_mm_via_bf16():
    if _mkldnn_matmul_precision() is None or not hasattr(torch.library, "custom_op"):
        return False

    @torch.library.custom_op("halp_fx::integer_mm_via_bf16", mutates_args=())
    def integer_mm_via_bf16(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``a @ b`` of integer-valued matrices as float32, through oneDNN's bf16 kernel (exact, see above).

        The precision switch is process-wide while the product runs: a float32 product that another Python
        thread runs at that moment runs in bf16 too. ``HALP_FX_BF16_KERNEL=off`` keeps such a process on the
        int8 kernel (a per-thread check cannot tell: Inductor and tqdm keep idle threads alive)."""
        matmul = _mkldnn_matmul_precision()
        before = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
        try:
            return a.to(torch.float32) @ b.to(torch.float32)
        finally:
            matmul.fp32_precision = before

    @integer_mm_via_bf16.register_fake
    def _(a, b):
        return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)
    return True


INTEGER_MM_VIA_BF16 = _define_integer_mm_via_bf16()


def bf16_kernel_pays(m, k, n, device, forced=False):
    """Whether the int8 product ``m x k x n`` runs faster, and as exactly, through a bf16 kernel: on a CPU with
    AMX-BF16 (measured there; not on AVX512-BF16 alone), for large outputs summed over a short dimension
    (``4k <= min(m, n)``, ``m n >= 2**18``), ``k`` within the exact bound. ``forced``: on any CPU, for checks.
    ``HALP_FX_BF16_KERNEL=off``: never (see ``integer_mm_via_bf16``)."""
    if device.type != "cpu" or not INTEGER_MM_VIA_BF16 or k > BF16_KERNEL_MAX_K:
        return False
    if os.environ.get("HALP_FX_BF16_KERNEL", "").lower() == "off":
        return False
    if 4 * k > min(m, n) or m * n < 2 ** 18:
        return False
    return forced or "amx_bf16" in usable_cpu_flags()


def offset_value(offset, scale):
    """``W - A = d * Z`` of a weight, exactly, in float32 (an addmm's bias difference)."""
    return scale * offset.to(torch.float32)


@functools.lru_cache(maxsize=None)
def _cpu_int_mm_available():
    try:
        torch._int_mm(torch.zeros(17, 8, dtype=torch.int8), torch.zeros(8, 8, dtype=torch.int8))
        return True
    except (RuntimeError, NotImplementedError):  # torch 2.1: CUDA only
        return False


def int8_product(a, b, second_levels):
    """``a @ b`` (float32) through int8: ``a`` quantized per row, ``b`` per column."""
    qa, sa = quantize(a, 1, FULL_RANGE)
    qb, sb = quantize(b, 0, second_levels)
    return int8_term(qa, sa, qb, sb)


@functools.lru_cache(maxsize=None)
def cpu_flags():
    """Every flag of the CPU's ``flags`` line in ``/proc/cpuinfo`` (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return frozenset(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return frozenset()


# The low-precision features each oneDNN ISA cap (ONEDNN_MAX_CPU_ISA, or its older name DNNL_MAX_CPU_ISA) leaves
# oneDNN free to use; a cap not listed (DEFAULT, ALL, a newer one) leaves every feature.
_VNNI, _BF16, _AMX = {"avx_vnni", "avx512_vnni"}, {"avx512_bf16"}, {"amx_int8", "amx_bf16"}
_ISA_CAPS = {"sse41": set(), "avx": set(), "avx2": set(), "avx2_vnni": {"avx_vnni"}, "avx2_vnni_2": {"avx_vnni"},
             "avx512_core": set(), "avx512_core_vnni": _VNNI, "avx512_core_bf16": _VNNI | _BF16,
             "avx512_core_fp16": _VNNI | _BF16, "avx10_1_512": _VNNI | _BF16}
LOW_PRECISION_FLAGS = _VNNI | _BF16 | _AMX


def usable_cpu_flags():
    """The CPU's flags less the low-precision features oneDNN has been told not to use (``ONEDNN_MAX_CPU_ISA=AVX2``
    makes a VNNI or AMX CPU compute as an AVX2 one, inexact int8 products included)."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "").strip().lower()
    flags = cpu_flags()
    if cap in _ISA_CAPS:
        flags = flags - (LOW_PRECISION_FLAGS - _ISA_CAPS[cap])
    return flags


def cpu_int8_flags():
    """The x86 features that make oneDNN's int8 products fast and exact at 8 bits (those oneDNN may use)."""
    return usable_cpu_flags() & {"avx512_vnni", "amx_int8", "avx_vnni"}


def products_pay(device):
    """``(True, "")`` where int8 products beat float32 ones on ``device``, else ``(False, why)``.

    Measured on CPUs: on a 2-core AVX2 EPYC with torch 2.13, ``torch._int_mm`` at 128x1024x1024 took 261 ms against
    7.9 ms for float32 ``mm`` (exact, but through a reference kernel); on a 2-core EPYC with AVX512-VNNI, one thread,
    0.67 ms against 2.8 ms. Assumed, not measured here: CUDA's ``_int_mm`` (cuBLASLt int8) beats float32 products.
    """
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and cpu_int8_flags() and _cpu_int_mm_available():
        return True, ""
    if device.type == "cpu" and not _cpu_int_mm_available():
        return False, "this torch has no CPU int8 matrix product"
    return False, ("this CPU has no AVX512-VNNI/AMX, where int8 products are slower than float32 "
                   "(torch._int_mm 33x slower at 128x1024x1024 on AVX2)")


def second_operand_levels(device):
    """127 where int8 products are exact at 8 bits, 63 (7 bits) on x86 CPUs without VNNI or AMX."""
    if device.type == "cpu" and not cpu_int8_flags():
        return REDUCED_RANGE
    return FULL_RANGE


def forced():
    """``HALP_FX_INT8_PRODUCTS=always`` runs the low-precision products (int8 corrections, the bf16 anchor pass)
    where they do not pay: exactness checks on any CPU."""
    return os.environ.get("HALP_FX_INT8_PRODUCTS", "") == "always"
