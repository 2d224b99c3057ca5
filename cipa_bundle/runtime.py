"""Process-wide settings for the bundle's own entry points (the CLI and the training workflow); never applied on import.

On the CPU a CIPA forward pass allocates and frees the same large activations again and again (tens of MB each at
512 x 512). glibc hands allocations above its mmap threshold (at most 32 MB by default) straight back to the kernel
when they are freed, so every pass page-faults them in again and the kernel zeroes each 4 KiB page. On the 2-core
dev VM a fault costs about 1 us: a 50 MB tensor took 17-20 ms to allocate and fill instead of 3-5 ms, and the
512 x 512 forward went from 6.8-7.0 s to 4.9-5.2 s once the freed memory stayed mapped (docs/performance.md,
"Network"). On bare metal faults are cheaper and the gain smaller.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

__all__ = ["OPT_OUT_ENV_VAR", "retain_freed_memory"]

#: Set to ``0`` to keep glibc's default allocator behaviour in the CLI and the training workflow.
OPT_OUT_ENV_VAR = "CIPA_RETAIN_FREED_MEMORY"

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The user's own glibc settings win over ours.
_GLIBC_ENV_VARS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")


def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Ask glibc to serve allocations below ``mmap_threshold`` bytes from its heap and to keep up to
    ``trim_threshold`` bytes of freed memory mapped, so that re-allocated tensors do not page-fault again.

    The cost is memory that stays with the process after it is freed (peak RSS of a 512 x 512 forward: 1.30 GB ->
    1.42 GB). Both values are ``int`` for ``mallopt``.

    Returns:
        ``True`` if glibc accepted both settings; ``False`` (and nothing changed) where this is not Linux with glibc,
        where ``CIPA_RETAIN_FREED_MEMORY=0``, or where the user set glibc's own ``MALLOC_*`` / ``GLIBC_TUNABLES``
        variables.
    """
    if os.environ.get(OPT_OUT_ENV_VAR, "1").strip() == "0" or any(v in os.environ for v in _GLIBC_ENV_VARS):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: if glibc refuses it (older versions cap it at 32 MB), the trim threshold is left alone,
    # because setting it would also switch off glibc's dynamic mmap threshold and leave the 128 KiB default.
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))
