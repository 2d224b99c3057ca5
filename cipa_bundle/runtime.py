"""Process-wide settings for the bundle's own entry points (the CLI and the bundle workflows); never applied on import.

* :func:`report_input_errors_in_one_line`: ``python -m monai.bundle run ...`` wraps an error of the bundle in
  MONAI's ``RuntimeError: Failed to evaluate ...`` and prints a 100-line traceback in which the message that matters
  is buried. The bundle workflows install this hook first, so bad input (a :class:`~cipa_bundle.errors.CipaInputError`
  anywhere in the chain) ends with the same one line that ``cipa-bundle`` prints. Programming errors keep their
  traceback.
* :func:`retain_freed_memory`, below.

On the CPU a CIPA forward pass allocates and frees the same large activations again and again (tens of MB each at
512 x 512). glibc hands allocations above its mmap threshold (at most 32 MB by default) straight back to the kernel
when they are freed, so every pass page-faults them in again and the kernel zeroes each 4 KiB page. On the 2-core
dev VM a fault costs about 1 us: a 50 MB tensor took 17-20 ms to allocate and fill instead of 3-5 ms, and the
512 x 512 forward went from 6.3-7.0 s to 4.6-5.1 s once the freed memory stayed mapped (docs/performance.md,
"Network"). On bare metal faults are cheaper and the gain smaller.
"""

from __future__ import annotations

import ctypes
import os
import sys
from types import TracebackType

from cipa_bundle.errors import input_error_in

__all__ = [
    "OPT_OUT_ENV_VAR",
    "one_line_error",
    "release_freed_memory",
    "report_input_errors_in_one_line",
    "retain_freed_memory",
    "retain_freed_memory_for_training",
]

#: Set to ``0`` to keep glibc's default allocator behaviour in the CLI and the training workflow.
OPT_OUT_ENV_VAR = "CIPA_RETAIN_FREED_MEMORY"

# mallopt parameters from glibc's <malloc.h>.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_C_INT_MAX = 2**31 - 1


def retain_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = (1 << 31) - 1) -> bool:
    """Ask glibc to serve allocations below ``mmap_threshold`` bytes from its heap and to keep up to
    ``trim_threshold`` bytes of freed memory mapped, so that re-allocated tensors do not page-fault again.

    The cost is memory that stays with the process after it is freed (peak RSS of a 512 x 512 forward: 1.3 GB ->
    1.5 GB); processes forked afterwards (DataLoader workers) inherit the setting.

    Returns:
        ``True`` if glibc accepted both settings. ``False`` where this is not Linux with glibc, where
        ``CIPA_RETAIN_FREED_MEMORY=0``, or where the user configured glibc's allocator (``MALLOC_MMAP_THRESHOLD_``,
        ``MALLOC_TRIM_THRESHOLD_``, or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``): nothing is changed then.

    Raises:
        ValueError: a threshold outside ``[0, 2**31 - 1]`` (``mallopt`` takes a C ``int``).
    """
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not 0 <= value <= _C_INT_MAX:
            raise ValueError(f"retain_freed_memory: {name}={value} is outside [0, {_C_INT_MAX}] (a C int for mallopt)")
    if os.environ.get(OPT_OUT_ENV_VAR, "1").strip() == "0" or _user_configured_malloc():
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the interpreter runs on
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: if glibc refuses it (older versions cap it at 32 MB), the trim threshold is left alone,
    # because setting it would also switch off glibc's dynamic mmap threshold and leave the 128 KiB default.
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


#: The training workflow's allocator settings: buffers of 32 MiB and more are mapped afresh and unmapped when freed,
#: and at most 256 MiB of free memory stays at the top of the heap.
TRAINING_MMAP_THRESHOLD = 32 << 20
TRAINING_TRIM_THRESHOLD = 256 << 20


def retain_freed_memory_for_training() -> bool:
    """:func:`retain_freed_memory` with :data:`TRAINING_MMAP_THRESHOLD` (32 MiB) and :data:`TRAINING_TRIM_THRESHOLD`
    (256 MiB).

    A training step of the paper's model allocates and frees hundreds of tensors of 100-400 MB in an order that the
    heap cannot coalesce, so retaining them costs far more memory than in a forward pass. Measured on the 2-core,
    24 GB machine (batch 4, activation checkpointing; docs/performance.md, "Training at the paper's size"): glibc's
    defaults 9.2 GiB peak RSS and 103 s per step; the CLI's setting (heap below 1 GiB, 2 GiB kept) 14.0 GiB and
    64 s; heap below 64 MiB 10.9-11.3 GiB and 66-82 s; heap below 32 MiB with 256 MiB kept 9.0 GiB and 82-91 s.
    The last keeps part of the speed and stays well inside the 12 GB target.
    """
    return retain_freed_memory(mmap_threshold=TRAINING_MMAP_THRESHOLD, trim_threshold=TRAINING_TRIM_THRESHOLD)


def release_freed_memory() -> bool:
    """Hand the heap's free memory back to the kernel (glibc's ``malloc_trim(0)``), so that the resident set counts
    live memory only; the memory pre-flight measures growth from there. Returns False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        malloc_trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    malloc_trim.restype = ctypes.c_int
    malloc_trim(0)
    return True


def _user_configured_malloc() -> bool:
    """Whether the environment already sets glibc's mmap or trim threshold (the user's choice wins)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return True
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")


def one_line_error(error: BaseException) -> str:
    """The message the user reads for an input error: one line, prefixed like the CLI's."""
    return f"cipa-bundle: error: {error}".replace("\n", " ")


def report_input_errors_in_one_line() -> None:
    """Print an uncaught input error (or one wrapped by MONAI's config parser) as one line, without the traceback.

    Installs a ``sys.excepthook`` that defers to the previous hook for everything else; ``CIPA_TRACEBACK=1`` keeps
    full tracebacks for input errors too.
    """
    previous = sys.excepthook
    if getattr(previous, "_cipa_one_line", False):
        return

    def hook(kind: type[BaseException], error: BaseException, traceback: TracebackType | None) -> None:
        cause = input_error_in(error)
        if cause is None or os.environ.get("CIPA_TRACEBACK", "0") == "1":
            previous(kind, error, traceback)
            return
        sys.stderr.flush()
        print(one_line_error(cause), file=sys.stderr, flush=True)

    hook._cipa_one_line = True  # type: ignore[attr-defined]
    sys.excepthook = hook
