"""Keeping the memory a compiled step frees, so that the next step does not fault it in again.

A compiled step allocates its temporaries anew at every call and frees them at its end. glibc's ``malloc`` gives
a freed block above its mmap threshold (32 MiB at most) back to the kernel, and trims the heap's free top; the
next step's allocation of the same size then page-faults every 4 KiB page in again, each zeroed by the kernel.
A large model's low-precision step has more such temporaries than its float32 SGD step (the differences and
their int8 copies): on the transformer layer of ``benchmarks/``, 98,000-133,000 page faults per step against
SGD's 10,000 (``docs/low_precision.md``, "Freed memory kept"). :func:`keep_freed_memory` makes ``malloc`` keep what is freed for reuse.
"""
import ctypes
import platform

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Make glibc's ``malloc`` keep freed memory for the next allocation: no large block is mapped on its own
    (``M_MMAP_MAX`` 0), and the heap is never trimmed (``M_TRIM_THRESHOLD`` -1). Process-wide and lasting: the
    process's resident memory stays at its peak from then on, as a training loop's would at its next step anyway.
    The same as starting Python with ``GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=...``.

    Returns ``(True, "")`` where applied, else ``(False, why)`` (not glibc, e.g. macOS, Windows or musl). An
    allocator preloaded in glibc's place (jemalloc, tcmalloc) ignores the call; those keep freed memory anyway."""
    libc_name = platform.libc_ver()[0]
    if libc_name != "glibc":
        return False, f"the C library is {libc_name or 'not glibc'}, not glibc: mallopt does not apply"
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False, "this process's C library has no mallopt"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    if not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, -1)):
        return False, "mallopt refused M_MMAP_MAX or M_TRIM_THRESHOLD"
    return True, ""
