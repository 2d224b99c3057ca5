"""Compiled CPU kernels of the selective scan: forward, and a hand-written adjoint for the backward.

This module imports numba at import time; :mod:`cipa_bundle.networks.scan.numba_backend` imports it lazily, so the
package still imports where numba is missing.

Layout and parallelism
----------------------
The recurrence is sequential in time but independent across channels and state entries, so SIMD lanes run across
*channels*: a work item is one ``(batch, group, channel block)`` and the innermost loops run over the (up to
``block``) channels of that block, which share the same ``B``/``C`` values (channels of one group). That keeps the
vectorised loop long and simple for every ``d_state`` (1, 4 or 16 alike), so nothing needs specialising on ``N`` at
compile time. One more forward, :func:`scan_forward_state_lanes`, is specialised on ``N = 16`` (CIPA's encoder,
CRM and DCIM): there the lanes run over the states of one channel, which stay in registers, and it is 1.2-1.4x
faster; it writes the same checkpoints, so one backward serves both forwards.

The kernels are serial and release the GIL (``nogil``); each call takes a range of work items, and
:mod:`.numba_backend` runs disjoint ranges on a pool of threads. That costs nothing at run time (items are coarse),
and compared with ``parallel=True``/``prange`` it compiles about 2.5x faster, needs no OpenMP/TBB threading layer
(so no second OpenMP runtime next to torch's, no fork-safety or re-entrancy caveats), and follows
``torch.get_num_threads()`` directly.

Time is cut into chunks of ``chunk`` steps. The channel-lanes kernels copy each chunk of their ``block`` channel rows
into ``(time, channel)`` tiles, so that the channel loop runs over contiguous memory, and copy the results back into
``(channel, time)`` rows; whole 8 x 8 blocks move with vector shuffles (:func:`_transpose_8x8`), because LLVM turns a
transposing copy loop into one scalar load and store per element. The work per ``(time, channel)`` element
(softplus, products with ``u``, the gradients of ``u`` and ``delta``) runs over the tiles as flat arrays: one loop of
``chunk * block`` elements instead of one short loop per channel row, whose fixed cost (a view, the vector loop's
set-up) was a large part of that work (forward and backward 1.1-1.4x faster with the flat loops).

Three rules for memory access keep the copies cheap:

- Rows are indexed through views such as ``u[bi, c, t0:t0 + nt]``, or through the transposes, with loop indices
  that start at 0. numba wraps negative indices, and for an index like ``t0 + s`` LLVM cannot prove that it is
  non-negative, so every access carried a sign test and an add and the loops over time did not vectorise.
- The channel-lanes kernels touch ``block`` rows far apart in memory per chunk (one short segment each): too many
  streams for the hardware prefetcher, so each segment was a cache miss. They prefetch the next chunk's segments
  (:func:`_prefetch_tile`, ``llvm.prefetch``) while the current one is computed, and at a work item's last chunk
  the next item's first: about 1.2x more in the backward.
- The state-lanes forward reads and writes two contiguous rows per array, which the hardware prefetcher follows; its
  per-step work runs over spans of :data:`ROW_SPAN` steps.

Memory of the backward
----------------------
The forward stores the state at the start of every time chunk (``(b, n_chunks, N, d)``, i.e. ``1/chunk`` of all
states). The backward walks the chunks in reverse; for each it recomputes the chunk's states from its checkpoint into
a ``(chunk, N, block)`` buffer and then runs the adjoint recurrence backwards through it. Extra memory therefore stays
bounded by the checkpoints plus one small buffer per thread.

Precision
---------
``FASTMATH`` allows contraction to FMA and reassociation of sums (the channel reductions for ``dB``/``dC`` need it
to vectorise); it keeps NaN/inf semantics. The decays ``exp(dt A)`` are computed as ``2^(dt A log2 e)`` (as
mamba-ssm's CUDA kernel does) with :func:`fast_exp2`, the softplus with :func:`fast_exp`: in float32 both are
branch-free, vectorisable versions with a maximum error of about 1 ulp; float64 uses ``math.exp2`` and ``math.exp``.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

__all__ = [
    "FASTMATH",
    "cache_dir",
    "choose_cache_dir",
    "count_items",
    "fast_exp",
    "fast_exp2",
    "LOG2E",
    "softplus",
    "softplus_with_slope",
    "scan_forward",
    "scan_forward_state_lanes",
    "state_lanes_apply",
    "STATE_LANES",
    "STATE_LANES_PAIR",
    "ROW_SPAN",
    "scan_backward",
]

# No 'nnan'/'ninf' (a NaN in the input must come out as NaN) and no 'afn' (no library-approximated functions).
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}
# error_model="numpy" everywhere: IEEE division (x/0 = inf) instead of Python's ZeroDivisionError check, whose branch
# would stop LLVM from vectorising any loop with a division in it.
# The scalar helpers (exp, softplus) get only 'contract': reassociation would fold exp's two-constant (Cody-Waite)
# reduction into one and lose accuracy. LLVM inlines them into the kernels, and each instruction keeps its own flags.
_HELPER_OPTIONS = {"fastmath": {"contract"}, "error_model": "numpy"}


def choose_cache_dir(beside: Path, configured: str | None, fallbacks: Sequence[Path]) -> Path | None:
    """Where numba's ``cache=True`` should write: ``None`` means numba's default folder (``beside``) will do.

    ``configured`` (``NUMBA_CACHE_DIR``) wins when set. Otherwise, when ``beside`` (the ``__pycache__`` next to this
    file) is not writable, as in a system-wide or read-only install, the first writable folder of ``fallbacks``.
    Returns ``beside`` itself only if nothing at all is writable (callers then compile without caching).
    """
    if configured:
        return Path(configured)
    if _writable(beside):
        return None
    for folder in fallbacks:
        if _writable(folder):
            return folder
    return beside


def _writable(folder: Path) -> bool:
    """True if ``folder`` exists (or can be created) and a file can be written in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".probe-"):
            pass
    except OSError:
        return False
    return True


def _user_cache_dirs() -> list[Path]:
    """A per-user cache folder, then one in the temporary folder (per user, so users never share compiled code)."""
    user = os.environ.get("USER") or str(os.getuid() if hasattr(os, "getuid") else "user")
    folders = [Path(tempfile.gettempdir()) / f"cipa_bundle-numba-{user}"]
    try:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    except RuntimeError:  # no home folder known
        return folders
    return [base / "cipa_bundle" / "numba", *folders]


_BESIDE = Path(__file__).resolve().parent / "__pycache__"
cache_dir = choose_cache_dir(_BESIDE, numba.config.CACHE_DIR, _user_cache_dirs())
_CACHE = cache_dir != _BESIDE
if _CACHE and cache_dir is not None and not numba.config.CACHE_DIR:
    # numba reads this when each kernel below is decorated.
    numba.config.CACHE_DIR = str(cache_dir)


# --------------------------------------------------------------------------------------------------------------------
# A vectorisable exp.
#
# LLVM cannot vectorise a call to libm's expf, and the exp is the most frequent operation of the scan (one per state
# entry per time step). This one is branch-free: x = k*ln2 + r with |r| <= ln2/2, exp(r) by a degree-6 polynomial,
# and the scale 2^k written straight into the exponent bits. Rounding x*log2(e) to the integer k is done by adding
# _MAGIC = 2^23 + 126: the sum then holds k + 126 in its low mantissa bits, which are exactly the exponent field of
# 2^(k-1), so no float-to-int conversion is needed (and a NaN simply stays NaN). The polynomial approximates 2*exp(r)
# to make up for the -1. Its coefficients were fitted to the relative error on [-ln2/2, ln2/2] by iteratively
# reweighted least squares on 4000 Chebyshev nodes (fitting error 1.9e-9, far below float32 rounding).
# --------------------------------------------------------------------------------------------------------------------
_LOG2E = np.float32(1.4426950408889634)
_MAGIC = np.float32(2**23 + 126)
_LN2_HI = np.float32(0.693359375)  # 9 significant bits: k * _LN2_HI is exact for |k| < 2^15
_LN2_LO = np.float32(-2.12194440e-4)  # ln 2 - _LN2_HI
# Below -86.5 the result is 0 (the true exp(x) is below 2.7e-38, near the float32 denormals); from 88.73 on every
# result overflows to inf. The clamps keep k + 126 inside the normal exponent range [1, 254].
_EXP_LO = np.float32(-86.5)
_EXP_HI = np.float32(89.0)
_EXP_POLYNOMIAL = (
    np.float32(2.0),
    np.float32(2.0000000689),
    np.float32(0.99999984),
    np.float32(0.3333284),
    np.float32(0.08333645),
    np.float32(0.01674963),
    np.float32(0.00276737),
)


@intrinsic
def _exponent_bits_to_float(typingctx, shifted):
    """Reinterpret ``shifted`` (float32 whose low 8 mantissa bits hold e) as the float32 with exponent field e."""
    if shifted != types.float32:
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        bits = builder.shl(builder.bitcast(args[0], i32), ir.Constant(i32, 23))
        return builder.bitcast(bits, ir.FloatType())

    return types.float32(types.float32), codegen


@njit(inline="always", **_HELPER_OPTIONS)
def _polynomial_times_power_of_two(coefficients, r, shifted):  # pragma: no cover - compiled
    """``p(r) * 2^(e - 127)``: ``p`` of degree 6 by Horner (``coefficients[0]`` is the constant term), ``e`` the
    exponent field held in ``shifted``'s low mantissa bits (see above)."""
    p = coefficients[6] * r + coefficients[5]
    p = p * r + coefficients[4]
    p = p * r + coefficients[3]
    p = p * r + coefficients[2]
    p = p * r + coefficients[1]
    p = p * r + coefficients[0]
    return p * _exponent_bits_to_float(shifted)


def _compile_per_dtype(function, float32_version, float64_version) -> None:
    """Make ``function`` compile, inside numba code, to ``float32_version`` or ``float64_version`` by argument dtype.

    All three take one argument named ``x`` (numba's overloads require the names to match).
    """

    def typer(x):
        if x == types.float32:
            return float32_version
        if x == types.float64:
            return float64_version
        return None

    overload(function, jit_options=_HELPER_OPTIONS)(typer)


def _exp_f32(x):
    # 'x < lo' is False for NaN, so a NaN goes through unchanged and comes out as NaN.
    xc = _EXP_LO if x < _EXP_LO else x
    xc = _EXP_HI if xc > _EXP_HI else xc
    shifted = xc * _LOG2E + _MAGIC
    k = shifted - _MAGIC
    r = xc - k * _LN2_HI
    r = r - k * _LN2_LO
    result = _polynomial_times_power_of_two(_EXP_POLYNOMIAL, r, shifted)
    return np.float32(0.0) if x < _EXP_LO else result


def _exp_f64(x):
    return math.exp(x)


def fast_exp(x: float) -> float:
    """``exp(x)``; inside numba code it compiles to the vectorisable float32 version or to ``math.exp`` (float64)."""
    return math.exp(x)


_compile_per_dtype(fast_exp, _exp_f32, _exp_f64)


# --------------------------------------------------------------------------------------------------------------------
# exp2 for the decays of the recurrences.
#
# The recurrences compute exp(dt * A) as 2^(dt * A log2 e), with A log2 e formed once per channel: that is what
# mamba-ssm's CUDA kernel computes (exp2f of delta times A pre-multiplied by log2 e). The reduction is then exact
# (x = k + r needs no two-constant ln 2), which saves three constants and three operations per vector in the innermost
# loops, whose 16 AVX2 registers cannot hold all the constants (1.05-1.1x on the forward). The polynomial approximates
# 2 * 2^r on [-1/2, 1/2], fitted as above (fitting error 1.9e-9; with float32 rounding under 1 ulp).
# --------------------------------------------------------------------------------------------------------------------
LOG2E = 1.4426950408889634  #: log2(e): the kernels scale A by it once per channel
# Below -124.75 the result is 0 (2^-124.75 = 2.8e-38, as exp's cut-off at -86.5); above 128 it overflows to inf. The
# clamps keep k + 126 inside the normal exponent range [1, 254].
_EXP2_LO = np.float32(-124.75)
_EXP2_HI = np.float32(128.5)
_EXP2_POLYNOMIAL = (
    np.float32(2.0),
    np.float32(1.3862943649291992),
    np.float32(0.48045292496681213),
    np.float32(0.11100657284259796),
    np.float32(0.019236978143453598),
    np.float32(0.0026799861807376146),
    np.float32(0.00030691607389599085),
)


def _exp2_f32(x):
    # As _exp_f32, in base 2: a NaN goes through unchanged.
    xc = _EXP2_LO if x < _EXP2_LO else x
    xc = _EXP2_HI if xc > _EXP2_HI else xc
    shifted = xc + _MAGIC
    r = xc - (shifted - _MAGIC)
    result = _polynomial_times_power_of_two(_EXP2_POLYNOMIAL, r, shifted)
    return np.float32(0.0) if x < _EXP2_LO else result


def _exp2_f64(x):
    return math.exp2(x)


def fast_exp2(x: float) -> float:
    """``2 ** x``; inside numba code it compiles to a vectorisable float32 version or to ``math.exp2`` (float64)."""
    return math.exp2(x)


_compile_per_dtype(fast_exp2, _exp2_f32, _exp2_f64)


# softplus exactly as torch.nn.functional.softplus (beta 1, threshold 20): z above 20 is returned as is.
_SOFTPLUS_THRESHOLD = 20.0
_SQRT2_M1 = np.float32(0.41421356)
_LN2_F32 = np.float32(0.6931471805599453)


@njit(inline="always", **_HELPER_OPTIONS)
def _log1p_unit_f32(w):  # pragma: no cover - compiled
    # log1p(w) for w in [0, 1] as 2 atanh(s) (+ ln 2), with s formed from w itself (no 1 + w rounding, so tiny w stay
    # exact); |s| <= 0.172 and the series to s^9 is accurate far below float32 rounding.
    big = w > _SQRT2_M1
    # One unconditional division (a division inside a branch would stop LLVM from vectorising the loop).
    num = w - np.float32(1.0) if big else w
    den = w + np.float32(3.0) if big else w + np.float32(2.0)
    s = num / den
    s2 = s * s
    p = np.float32(1.0 / 9.0) * s2 + np.float32(1.0 / 7.0)
    p = p * s2 + np.float32(1.0 / 5.0)
    p = p * s2 + np.float32(1.0 / 3.0)
    atanh2 = np.float32(2.0) * (s + s * s2 * p)
    return _LN2_F32 + atanh2 if big else atanh2


def _softplus_f32(x):
    # The slope computed alongside is unused here, and LLVM removes it.
    return softplus_with_slope(x)[0]


def _softplus_f64(x):
    return x if x > _SOFTPLUS_THRESHOLD else math.log1p(math.exp(x))


def softplus(x: float) -> float:
    """torch's ``softplus(x)`` (threshold 20); compiled per dtype inside numba code."""
    return _softplus_f64(x)


_compile_per_dtype(softplus, _softplus_f32, _softplus_f64)


def _softplus_with_slope_f32(x):
    # max(x, 0) + log1p(exp(-|x|)) equals log1p(exp(x)) but cannot overflow. The same w = exp(-|x|) gives the slope:
    # sigmoid(x) is 1 / (1 + w) for x >= 0 and w / (1 + w) below.
    w = fast_exp(-abs(x))
    value = max(x, np.float32(0.0)) + _log1p_unit_f32(w)
    reciprocal = np.float32(1.0) / (np.float32(1.0) + w)
    sigmoid = reciprocal if x >= np.float32(0.0) else w * reciprocal
    above = x > np.float32(_SOFTPLUS_THRESHOLD)
    return (x if above else value), (np.float32(1.0) if above else sigmoid)


def _softplus_with_slope_f64(x):
    return softplus(x), (1.0 if x > _SOFTPLUS_THRESHOLD else 1.0 / (1.0 + math.exp(-x)))


def softplus_with_slope(x: float) -> tuple[float, float]:
    """``(softplus(x), d softplus / dx)`` as torch computes them: the slope is ``sigmoid(x)``, and exactly 1 above
    the threshold, where softplus returns ``x`` itself. The float32 version shares one exp between the two."""
    return _softplus_with_slope_f64(x)


_compile_per_dtype(softplus_with_slope, _softplus_with_slope_f32, _softplus_with_slope_f64)


def count_items(batch: int, channels: int, groups: int, block: int) -> int:
    """Number of ``(batch, group, channel block)`` work items of a kernel call."""
    per_group = channels // groups
    return batch * groups * -(-per_group // block)


# --------------------------------------------------------------------------------------------------------------------
# Pieces shared by both kernels (inlined into each)
# --------------------------------------------------------------------------------------------------------------------
@njit(inline="always")
def _tiling(u, A, B, chunk, block):  # pragma: no cover - compiled
    """``(N, groups, channels per group, channel blocks per group, L, time chunks)`` of a kernel call."""
    channels, length = u.shape[1], u.shape[2]
    groups = B.shape[1]
    per_group = channels // groups
    return A.shape[1], groups, per_group, (per_group + block - 1) // block, length, (length + chunk - 1) // chunk


@njit(inline="always")
def _item_channels(item, groups, nblocks, per_group, block):  # pragma: no cover - compiled
    """``(batch index, group, block index within the group, first channel, channel count)`` of a work item."""
    bi = item // (groups * nblocks)
    g = (item // nblocks) % groups
    p = item % nblocks
    c0 = g * per_group + p * block
    return bi, g, p, c0, min(block, (g + 1) * per_group - c0)


@njit(inline="always", fastmath=FASTMATH, error_model="numpy")
def _step_sizes(z, bias, use_softplus, count, dt):  # pragma: no cover - compiled
    """``dt[:count] = softplus(z[:count] + bias[:count])`` (without the softplus if not asked), on 1-D arrays."""
    if use_softplus:
        for i in range(count):
            dt[i] = softplus(z[i] + bias[i])
    else:
        for i in range(count):
            dt[i] = z[i] + bias[i]


@njit(inline="always", fastmath=FASTMATH, error_model="numpy")
def _step_sizes_and_slopes(z, bias, count, dt, slope):  # pragma: no cover - compiled
    """:func:`_step_sizes` with the softplus, also writing its slope: ``slope[:count] = softplus'(z + bias)``."""
    for i in range(count):
        dt[i], slope[i] = softplus_with_slope(z[i] + bias[i])


@intrinsic
def _prefetch(typingctx, row, index, for_write):
    """Ask the CPU to bring ``row[index]`` into the caches (``llvm.prefetch``); ``for_write`` is a literal bool."""
    if not isinstance(row, types.Array) or row.ndim != 1 or not isinstance(index, types.Integer):
        return None
    write = 1 if getattr(for_write, "literal_value", False) else 0

    def codegen(context, builder, signature, args):
        array_type = signature.args[0]
        array = context.make_array(array_type)(context, builder, args[0])
        pointer = cgutils.get_item_pointer(context, builder, array_type, array, [args[1]], wraparound=False)
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [ir.PointerType(), i32, i32, i32]), "llvm.prefetch.p0"
        )
        # (address, read 0 / write 1, locality 3 = keep in all cache levels, data cache)
        builder.call(prefetch, [pointer, ir.Constant(i32, write), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return types.none(row, index, for_write), codegen


# Shuffle masks of an 8 x 8 transpose in three rounds (the AVX unpack / shuffle / 128-bit-lane pattern): interleave
# the elements of row pairs, then the element pairs of pair rows, then the 4-element halves of quad rows.
_INTERLEAVE_LOW = (0, 8, 1, 9, 4, 12, 5, 13)
_INTERLEAVE_HIGH = (2, 10, 3, 11, 6, 14, 7, 15)
_PAIRS_LOW = (0, 1, 8, 9, 4, 5, 12, 13)
_PAIRS_HIGH = (2, 3, 10, 11, 6, 7, 14, 15)
_HALVES_LOW = (0, 1, 2, 3, 8, 9, 10, 11)
_HALVES_HIGH = (4, 5, 6, 7, 12, 13, 14, 15)


@intrinsic
def _transpose_8x8(typingctx, src, src_row, src_col, dst, dst_row, dst_col):
    """``dst[dst_row + j, dst_col + i] = src[src_row + i, src_col + j]`` for ``i, j < 8``, with vector shuffles.

    ``src`` and ``dst`` are C-contiguous 2-D float arrays of one dtype (other layouts do not compile); the caller
    keeps the block in bounds (no checks). LLVM's loop vectoriser cannot do this itself: a transposing copy loop
    becomes scalar loads and stores, one per element.
    """
    if not (
        isinstance(src, types.Array) and isinstance(dst, types.Array) and src.ndim == 2 and dst.ndim == 2
        and src.layout == "C" and dst.layout == "C" and src.dtype == dst.dtype and isinstance(src.dtype, types.Float)
        and all(isinstance(i, types.Integer) for i in (src_row, src_col, dst_row, dst_col))
    ):
        return None

    def codegen(context, builder, signature, args):
        src_type, src_row_type, src_col_type, dst_type, dst_row_type, dst_col_type = signature.args
        vector = ir.VectorType(context.get_value_type(src_type.dtype), 8)
        i32 = ir.IntType(32)

        def row_pointers(array_type, array_value, row, row_type, col, col_type):
            array = context.make_array(array_type)(context, builder, array_value)
            row = context.cast(builder, row, row_type, types.intp)
            col = context.cast(builder, col, col_type, types.intp)
            pointers = []
            for k in range(8):
                index = [builder.add(row, context.get_constant(types.intp, k)), col]
                pointer = cgutils.get_item_pointer(context, builder, array_type, array, index, wraparound=False)
                pointers.append(builder.bitcast(pointer, vector.as_pointer()))
            return pointers

        def shuffle(a, b, mask):
            return builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(i32, 8), list(mask)))

        sources = row_pointers(src_type, args[0], args[1], src_row_type, args[2], src_col_type)
        rows = [builder.load(pointer, align=src_type.dtype.bitwidth // 8) for pointer in sources]
        mixed = []
        for k in range(0, 8, 2):
            mixed += [shuffle(rows[k], rows[k + 1], _INTERLEAVE_LOW), shuffle(rows[k], rows[k + 1], _INTERLEAVE_HIGH)]
        quads = []
        for k in (0, 4):
            quads += [
                shuffle(mixed[k], mixed[k + 2], _PAIRS_LOW), shuffle(mixed[k], mixed[k + 2], _PAIRS_HIGH),
                shuffle(mixed[k + 1], mixed[k + 3], _PAIRS_LOW), shuffle(mixed[k + 1], mixed[k + 3], _PAIRS_HIGH),
            ]
        columns = [shuffle(quads[k], quads[k + 4], _HALVES_LOW) for k in range(4)]
        columns += [shuffle(quads[k], quads[k + 4], _HALVES_HIGH) for k in range(4)]
        targets = row_pointers(dst_type, args[3], args[4], dst_row_type, args[5], dst_col_type)
        for column, pointer in zip(columns, targets):
            builder.store(column, pointer, align=dst_type.dtype.bitwidth // 8)
        return context.get_dummy_value()

    return types.none(src, src_row, src_col, dst, dst_row, dst_col), codegen


@njit(inline="always")
def _transpose(src, src_row, src_col, rows, cols, dst, dst_row, dst_col):  # pragma: no cover - compiled
    """``dst[dst_row + j, dst_col + i] = src[src_row + i, src_col + j]`` for ``i < rows``, ``j < cols``.

    Whole 8 x 8 blocks go through :func:`_transpose_8x8`, the edges element by element.
    """
    full_rows = rows - rows % 8
    full_cols = cols - cols % 8
    for i in range(0, full_rows, 8):
        for j in range(0, full_cols, 8):
            _transpose_8x8(src, src_row + i, src_col + j, dst, dst_row + j, dst_col + i)
    for i in range(rows):
        source = src[src_row + i]
        for j in range(full_cols if i < full_rows else 0, cols):
            dst[dst_row + j, dst_col + i] = source[src_col + j]


@njit(inline="always")
def _fill_columns(tile, values, c0, nc):  # pragma: no cover - compiled
    """``tile[s, c] = values[c0 + c]`` in every row ``s`` for ``c < nc``; the columns from ``nc`` on are set to 0."""
    zero = tile.dtype.type(0)
    for s in range(tile.shape[0]):
        for c in range(nc):
            tile[s, c] = values[c0 + c]
        for c in range(nc, tile.shape[1]):
            tile[s, c] = zero


@njit(inline="always")
def _add_column_sums(tile, out, nc):  # pragma: no cover - compiled
    """``out[c] += sum_s tile[s, c]`` for ``c < nc``."""
    for s in range(tile.shape[0]):
        for c in range(nc):
            out[c] += tile[s, c]


@njit(inline="always")
def _prefetch_tile(array, first, count, lo, hi, for_write):  # pragma: no cover - compiled
    """Prefetch ``array[first:first + count, lo:hi]`` of a 2-D array whose rows are contiguous (every 64-byte line)."""
    per_line = max(1, 64 // array.itemsize)
    for r in range(count):
        row = array[first + r, lo:hi]
        for i in range(0, hi - lo, per_line):
            _prefetch(row, i, for_write)
        _prefetch(row, hi - lo - 1, for_write)


@njit(inline="always")
def _prefetch_forward_chunk(u, delta, y, bi, c0, nc, t0, t1):  # pragma: no cover - compiled
    """Prefetch the row segments ``[t0, t1)`` of channels ``c0:c0 + nc`` that the forward reads and writes."""
    _prefetch_tile(u[bi], c0, nc, t0, t1, False)
    _prefetch_tile(delta[bi], c0, nc, t0, t1, False)
    _prefetch_tile(y[bi], c0, nc, t0, t1, True)


@njit(inline="always")
def _prefetch_forward_ahead(
    u, delta, y, bi, c0, nc, k, chunk, item, item_stop, groups, nblocks, per_group, block
):  # pragma: no cover - compiled
    """During chunk ``k`` of work item ``item`` (channels ``c0:c0 + nc``), prefetch the forward's next chunk, or at
    the item's last chunk the first chunk of the next item in ``item_stop``'s range.

    The row segments of one chunk are far apart in memory (one per channel): too many streams for the hardware
    prefetcher to follow, and each new item starts new streams.
    """
    length = u.shape[2]
    t1 = (k + 1) * chunk
    if t1 < length:
        _prefetch_forward_chunk(u, delta, y, bi, c0, nc, t1, min(t1 + chunk, length))
    elif item + 1 < item_stop:
        next_bi, _, _, next_c0, next_nc = _item_channels(item + 1, groups, nblocks, per_group, block)
        _prefetch_forward_chunk(u, delta, y, next_bi, next_c0, next_nc, 0, min(chunk, length))


@njit(inline="always")
def _prefetch_backward_chunk(u, delta, gy, gu, gdelta, checkpoints, bi, c0, nc, k, chunk):  # pragma: no cover
    """Prefetch what the backward reads and writes for chunk ``k`` of channels ``c0:c0 + nc``."""
    t0 = k * chunk
    t1 = min(t0 + chunk, u.shape[2])
    _prefetch_tile(u[bi], c0, nc, t0, t1, False)
    _prefetch_tile(delta[bi], c0, nc, t0, t1, False)
    _prefetch_tile(gy[bi], c0, nc, t0, t1, False)
    _prefetch_tile(gu[bi], c0, nc, t0, t1, True)
    _prefetch_tile(gdelta[bi], c0, nc, t0, t1, True)
    _prefetch_tile(checkpoints[bi, k], 0, checkpoints.shape[2], c0, c0 + nc, False)


# --------------------------------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------------------------------
@njit(fastmath=FASTMATH, error_model="numpy", cache=_CACHE, nogil=True)
def scan_forward(
    u, delta, delta_bias, use_softplus, A, B, C, D, y, checkpoints, chunk, block, save, item_start, item_stop
):  # pragma: no cover - compiled
    """Selective scan forward for the work items ``item_start <= item < item_stop``.

    Shapes: ``u``, ``delta``, ``y`` (b, d, L); ``delta_bias``, ``D`` (d,); ``A`` (d, N); ``B``, ``C`` (b, G, N, L);
    ``checkpoints`` (b, ceil(L / chunk), N, d), written only when ``save`` (the state *before* each chunk).
    The step size is ``dt = softplus(delta + delta_bias)`` (or without the softplus). All arrays are C-contiguous and
    of one float dtype; ``y`` is written in place. Items are ``(batch, group, block of `block` channels)`` in
    row-major order (:func:`count_items` of them); disjoint item ranges may run concurrently.
    """
    nstate, groups, per_group, nblocks, length, nchunks = _tiling(u, A, B, chunk, block)
    dtype = u.dtype
    zero = dtype.type(0)
    a = np.empty((nstate, block), dtype)  # A log2(e)
    h = np.empty((nstate, block), dtype)
    # (time, channel) tiles; the work per (time, channel) runs over them as flat arrays.
    # Zeroed once: see scan_backward (the columns from nc on of a partial block).
    zb = np.zeros((chunk, block), dtype)  # delta
    ub = np.zeros((chunk, block), dtype)
    dtb = np.empty((chunk, block), dtype)
    dub = np.empty((chunk, block), dtype)  # dt * u
    yb = np.empty((chunk, block), dtype)
    bias_tile = np.empty((chunk, block), dtype)
    skip_tile = np.empty((chunk, block), dtype)
    z_flat, u_flat, dt_flat, du_flat, y_flat = zb.ravel(), ub.ravel(), dtb.ravel(), dub.ravel(), yb.ravel()
    bias_flat, skip_flat = bias_tile.ravel(), skip_tile.ravel()
    log2e = dtype.type(LOG2E)
    for item in range(item_start, item_stop):
        bi, g, _, c0, nc = _item_channels(item, groups, nblocks, per_group, block)
        _fill_columns(bias_tile, delta_bias, c0, nc)
        _fill_columns(skip_tile, D, c0, nc)
        for n in range(nstate):
            for c in range(nc):
                a[n, c] = A[c0 + c, n] * log2e
                h[n, c] = zero
        for k in range(nchunks):
            t0 = k * chunk
            nt = min(chunk, length - t0)
            _prefetch_forward_ahead(
                u, delta, y, bi, c0, nc, k, chunk, item, item_stop, groups, nblocks, per_group, block
            )
            if save:
                saved = checkpoints[bi, k]
                for n in range(nstate):
                    for c in range(nc):
                        saved[n, c0 + c] = h[n, c]
            _transpose(delta[bi], c0, t0, nc, nt, zb, 0, 0)
            _transpose(u[bi], c0, t0, nc, nt, ub, 0, 0)
            size = nt * block
            _step_sizes(z_flat, bias_flat, use_softplus, size, dt_flat)
            for i in range(size):
                du_flat[i] = dt_flat[i] * u_flat[i]
                y_flat[i] = skip_flat[i] * u_flat[i]
            B_chunk = B[bi, g, :, t0:t0 + nt]
            C_chunk = C[bi, g, :, t0:t0 + nt]
            for s in range(nt):
                for n in range(nstate):
                    b_tn = B_chunk[n, s]
                    c_tn = C_chunk[n, s]
                    for c in range(nc):
                        hv = fast_exp2(dtb[s, c] * a[n, c]) * h[n, c] + dub[s, c] * b_tn
                        h[n, c] = hv
                        yb[s, c] += hv * c_tn
            _transpose(yb, 0, 0, nt, nc, y[bi], c0, t0)
    return y


# --------------------------------------------------------------------------------------------------------------------
# Forward with lanes over the states (d_state = 16)
#
# For N = 16 a second forward lays SIMD lanes over the states of one channel instead of over channels: the state
# vector of a channel (two AVX2 registers) stays in registers along time, the rows of u/delta/y are read and written
# contiguously, and nothing is transposed. LLVM vectorises the state loop only when its trip count is a constant,
# so the kernel is specialised on N = 16 by inlining (it is 1.2-1.5x faster than `scan_forward` at the encoder's
# shapes, and slower at N = 4, half a register, where `scan_forward` stays in use). Two channels are advanced in
# each time step so that the two independent recurrences hide each other's latency. It writes the same
# checkpoints as `scan_forward`, so `scan_backward` serves both. The work per step (softplus, dt * u, the output rows)
# runs over spans of ROW_SPAN steps rather than per chunk: each row loop has a fixed cost (views, vector set-up), and
# per 32-step chunk that cost was about a tenth of the kernel. Six contiguous row streams need no software prefetch.
# --------------------------------------------------------------------------------------------------------------------
STATE_LANES = 16  #: the d_state that :func:`scan_forward_state_lanes` is specialised for
STATE_LANES_PAIR = 2  #: channels advanced together: a work item of :func:`scan_forward_state_lanes`
ROW_SPAN = 256  #: time steps per row pass of :func:`scan_forward_state_lanes` (whole chunks, at least one)


def state_lanes_apply(nstate: int, channels: int, groups: int) -> bool:
    """Whether :func:`scan_forward_state_lanes` handles a scan: N = 16 and channel pairs that stay within a group."""
    per_group = channels // groups
    return nstate == STATE_LANES and per_group % STATE_LANES_PAIR == 0


@njit(inline="always", fastmath=FASTMATH, error_model="numpy")
def _pair_steps(nstate, B_chunk, C_chunk, nt, a, h, dt_pair, du_pair, y_pair):  # pragma: no cover - compiled
    """Advance the states ``h`` (2, N) of two channels through ``nt`` steps; ``y_pair[j][s]`` gets ``<C_s, h_s>``.

    ``B_chunk``, ``C_chunk`` (nt, N) are the steps' rows of the group; ``a`` (2, N) is the channels' A log2(e);
    ``dt_pair`` and ``du_pair`` hold each channel's ``dt`` and ``dt * u`` (1-D, ``nt`` long). ``nstate`` is a literal
    at the call site, so the state loop unrolls into whole vectors.
    """
    for s in range(nt):
        for j in range(STATE_LANES_PAIR):
            dt_s = dt_pair[j][s]
            du_s = du_pair[j][s]
            acc = B_chunk.dtype.type(0)
            for n in range(nstate):
                hv = fast_exp2(dt_s * a[j, n]) * h[j, n] + du_s * B_chunk[s, n]
                h[j, n] = hv
                acc += hv * C_chunk[s, n]
            y_pair[j][s] = acc


@njit(fastmath=FASTMATH, error_model="numpy", cache=_CACHE, nogil=True)
def scan_forward_state_lanes(
    u, delta, delta_bias, use_softplus, A, Bt, Ct, D, y, checkpoints, chunk, save, item_start, item_stop
):  # pragma: no cover - compiled
    """:func:`scan_forward` for N = 16 with lanes over the states (see above); only where :func:`state_lanes_apply`.

    Shapes as in :func:`scan_forward`, except ``Bt``, ``Ct`` (b, G, L, N): ``B`` and ``C`` with time before state.
    Items are ``(batch, group, channel pair)`` in row-major order: ``count_items(b, d, G, STATE_LANES_PAIR)``.
    """
    _, groups, per_group, pairs, length, nchunks = _tiling(u, A, Bt, chunk, STATE_LANES_PAIR)
    dtype = u.dtype
    a = np.empty((STATE_LANES_PAIR, STATE_LANES), dtype)  # A log2(e)
    h = np.empty((STATE_LANES_PAIR, STATE_LANES), dtype)
    span = max(chunk, (ROW_SPAN // chunk) * chunk)
    row_bias = np.empty((STATE_LANES_PAIR, span), dtype)
    row_dt = np.empty((STATE_LANES_PAIR, span), dtype)
    row_du = np.empty((STATE_LANES_PAIR, span), dtype)
    row_y = np.empty((STATE_LANES_PAIR, span), dtype)
    log2e = dtype.type(LOG2E)
    for item in range(item_start, item_stop):
        bi, g, _, c0, _ = _item_channels(item, groups, pairs, per_group, STATE_LANES_PAIR)
        for j in range(STATE_LANES_PAIR):
            for n in range(STATE_LANES):
                a[j, n] = A[c0 + j, n] * log2e
                h[j, n] = 0
            row_bias[j, :] = delta_bias[c0 + j]
        for t0 in range(0, length, span):
            nt = min(span, length - t0)
            for j in range(STATE_LANES_PAIR):
                _step_sizes(delta[bi, c0 + j, t0:t0 + nt], row_bias[j], use_softplus, nt, row_dt[j])
                u_row = u[bi, c0 + j, t0:t0 + nt]
                dt_row = row_dt[j]
                du_row = row_du[j]
                for s in range(nt):
                    du_row[s] = dt_row[s] * u_row[s]
            for s0 in range(0, nt, chunk):
                steps = min(chunk, nt - s0)
                if save:
                    k = (t0 + s0) // chunk
                    for j in range(STATE_LANES_PAIR):
                        for n in range(STATE_LANES):
                            checkpoints[bi, k, n, c0 + j] = h[j, n]
                t = t0 + s0
                _pair_steps(
                    STATE_LANES, Bt[bi, g, t:t + steps], Ct[bi, g, t:t + steps], steps, a, h,
                    (row_dt[0, s0:s0 + steps], row_dt[1, s0:s0 + steps]),
                    (row_du[0, s0:s0 + steps], row_du[1, s0:s0 + steps]),
                    (row_y[0, s0:s0 + steps], row_y[1, s0:s0 + steps]),
                )
            for j in range(STATE_LANES_PAIR):
                d_skip = D[c0 + j]
                u_row = u[bi, c0 + j, t0:t0 + nt]
                y_row = y[bi, c0 + j, t0:t0 + nt]
                y_part = row_y[j]
                for s in range(nt):
                    y_row[s] = y_part[s] + d_skip * u_row[s]
    return y


# --------------------------------------------------------------------------------------------------------------------
# Backward (adjoint of the recurrence)
#
#   h_t = a_t * h_{t-1} + dt_t u_t B_t,   a_t = exp(dt_t A),   y_t = <C_t, h_t> + D u_t,   dt_t = softplus(z_t)
#
# With g_t = dL/dh_t (total, i.e. including what flows back from h_{t+1}):
#   g_t   = C_t gy_t + a_{t+1} g_{t+1}
#   dC_t  = sum_c gy_t h_t           dB_t = sum_c g_t dt_t u_t
#   du_t  = dt_t <g_t, B_t> + D gy_t dD   = sum_t gy_t u_t
#   ddt_t = <g_t, A a_t h_{t-1}> + u_t <g_t, B_t>
#   dA    = sum_t g_t a_t h_{t-1} dt_t
#   dz_t  = ddt_t softplus'(z_t)     d(delta_bias) = sum_t dz_t
# --------------------------------------------------------------------------------------------------------------------
@njit(fastmath=FASTMATH, error_model="numpy", cache=_CACHE, nogil=True)
def scan_backward(
    u, delta, delta_bias, use_softplus, A, B, C, D, gy, checkpoints, chunk, block,
    gu, gdelta, gA_part, gB_part, gC_part, gD_part, gbias_part, item_start, item_stop,
):  # pragma: no cover - compiled
    """Gradients of :func:`scan_forward` for the output gradient ``gy`` (b, d, L), for the same work items.

    Writes ``gu``, ``gdelta`` (b, d, L); ``gA_part`` (b, d, N), ``gD_part`` and ``gbias_part`` (b, d), to be summed
    over the batch; ``gB_part``, ``gC_part`` (b, G, n_blocks, N, L), to be summed over the channel blocks (axis 2).
    ``checkpoints`` is the array saved by :func:`scan_forward` with the same ``chunk``.
    """
    nstate, groups, per_group, nblocks, length, nchunks = _tiling(u, A, B, chunk, block)
    dtype = u.dtype
    zero = dtype.type(0)
    a = np.empty((nstate, block), dtype)
    a_log2e = np.empty((nstate, block), dtype)  # A log2(e), for the decays
    h = np.empty((nstate, block), dtype)
    carry = np.empty((nstate, block), dtype)  # a_{t+1} g_{t+1}
    ga = np.empty((nstate, block), dtype)
    hs = np.empty((chunk, nstate, block), dtype)  # h_{t-1} for each step of the chunk
    decay = np.empty((chunk, nstate, block), dtype)  # a_t
    # (time, channel) tiles; the work per (time, channel) runs over them as flat arrays.
    # In a partial block the columns from nc on are never written by the transposes and the adjoint loop, yet the flat
    # loops compute on them (their results are never written out or summed): zeroed once, they hold zeros or an
    # earlier item's values, never uninitialised memory (which could hold slow denormals).
    zb = np.zeros((chunk, block), dtype)  # delta, then its gradient
    ub = np.zeros((chunk, block), dtype)
    gyb = np.zeros((chunk, block), dtype)
    dtb = np.empty((chunk, block), dtype)
    dub = np.empty((chunk, block), dtype)  # dt * u
    slopeb = np.empty((chunk, block), dtype)  # softplus'(delta + delta_bias)
    gbb = np.zeros((chunk, block), dtype)  # <g_t, B_t>, then the gradient of u
    gab = np.zeros((chunk, block), dtype)  # <g_t, A a_t h_{t-1}>
    bias_tile = np.empty((chunk, block), dtype)
    skip_tile = np.empty((chunk, block), dtype)  # D
    gd_sums = np.empty((chunk, block), dtype)  # per-element sums over the chunks, reduced over time at the end
    gbias_sums = np.empty((chunk, block), dtype)
    z_flat, u_flat, gy_flat, dt_flat, du_flat = zb.ravel(), ub.ravel(), gyb.ravel(), dtb.ravel(), dub.ravel()
    slope_flat, gbb_flat, gab_flat = slopeb.ravel(), gbb.ravel(), gab.ravel()
    bias_flat, skip_flat = bias_tile.ravel(), skip_tile.ravel()
    gd_flat, gbias_flat = gd_sums.ravel(), gbias_sums.ravel()
    gd = np.empty(block, dtype)
    gbias = np.empty(block, dtype)
    log2e = dtype.type(LOG2E)
    for item in range(item_start, item_stop):
        bi, g, p, c0, nc = _item_channels(item, groups, nblocks, per_group, block)
        _fill_columns(bias_tile, delta_bias, c0, nc)
        _fill_columns(skip_tile, D, c0, nc)
        for i in range(chunk * block):
            gd_flat[i] = zero
            gbias_flat[i] = zero
        for n in range(nstate):
            for c in range(nc):
                a[n, c] = A[c0 + c, n]
                a_log2e[n, c] = A[c0 + c, n] * log2e
                carry[n, c] = zero
                ga[n, c] = zero
        for k in range(nchunks - 1, -1, -1):
            t0 = k * chunk
            nt = min(chunk, length - t0)
            # The previous chunk's row segments and checkpoint (see scan_forward), or the next item's last chunk.
            if k > 0:
                _prefetch_backward_chunk(u, delta, gy, gu, gdelta, checkpoints, bi, c0, nc, k - 1, chunk)
            elif item + 1 < item_stop:
                next_bi, _, _, next_c0, next_nc = _item_channels(item + 1, groups, nblocks, per_group, block)
                _prefetch_backward_chunk(
                    u, delta, gy, gu, gdelta, checkpoints, next_bi, next_c0, next_nc, nchunks - 1, chunk
                )
            _transpose(delta[bi], c0, t0, nc, nt, zb, 0, 0)
            _transpose(u[bi], c0, t0, nc, nt, ub, 0, 0)
            _transpose(gy[bi], c0, t0, nc, nt, gyb, 0, 0)
            size = nt * block
            if use_softplus:
                _step_sizes_and_slopes(z_flat, bias_flat, size, dt_flat, slope_flat)
            else:
                _step_sizes(z_flat, bias_flat, False, size, dt_flat)
            for i in range(size):
                du_flat[i] = dt_flat[i] * u_flat[i]
                gd_flat[i] += gy_flat[i] * u_flat[i]
            # Recompute the chunk's states from its checkpoint.
            saved = checkpoints[bi, k]
            for n in range(nstate):
                for c in range(nc):
                    h[n, c] = saved[n, c0 + c]
            B_chunk = B[bi, g, :, t0:t0 + nt]
            C_chunk = C[bi, g, :, t0:t0 + nt]
            for s in range(nt):
                for n in range(nstate):
                    b_tn = B_chunk[n, s]
                    for c in range(nc):
                        e = fast_exp2(dtb[s, c] * a_log2e[n, c])
                        hs[s, n, c] = h[n, c]
                        decay[s, n, c] = e
                        h[n, c] = e * h[n, c] + dub[s, c] * b_tn
            # Adjoint recurrence, backwards through the chunk.
            gB_chunk = gB_part[bi, g, p, :, t0:t0 + nt]
            gC_chunk = gC_part[bi, g, p, :, t0:t0 + nt]
            for s in range(nt - 1, -1, -1):
                for c in range(nc):
                    gbb[s, c] = zero
                    gab[s, c] = zero
                for n in range(nstate):
                    b_tn = B_chunk[n, s]
                    c_tn = C_chunk[n, s]
                    sum_b = zero
                    sum_c = zero
                    for c in range(nc):
                        e = decay[s, n, c]
                        ah = e * hs[s, n, c]  # a_t h_{t-1}
                        grad_h = carry[n, c] + gyb[s, c] * c_tn
                        sum_c += gyb[s, c] * (ah + dub[s, c] * b_tn)
                        sum_b += grad_h * dub[s, c]
                        gbb[s, c] += grad_h * b_tn
                        q = grad_h * ah
                        gab[s, c] += q * a[n, c]
                        ga[n, c] += q * dtb[s, c]
                        carry[n, c] = grad_h * e
                    gB_chunk[n, s] = sum_b
                    gC_chunk[n, s] = sum_c
            # Gradients of delta (into zb) and u (into gbb), then back to (channel, time) rows.
            for i in range(size):
                gz = gab_flat[i] + u_flat[i] * gbb_flat[i]
                if use_softplus:
                    gz *= slope_flat[i]
                z_flat[i] = gz
                gbias_flat[i] += gz
                gbb_flat[i] = dt_flat[i] * gbb_flat[i] + skip_flat[i] * gy_flat[i]
            _transpose(gbb, 0, 0, nt, nc, gu[bi], c0, t0)
            _transpose(zb, 0, 0, nt, nc, gdelta[bi], c0, t0)
        for c in range(nc):
            gd[c] = zero
            gbias[c] = zero
        _add_column_sums(gd_sums, gd, nc)
        _add_column_sums(gbias_sums, gbias, nc)
        for c in range(nc):
            gD_part[bi, c0 + c] = gd[c]
            gbias_part[bi, c0 + c] = gbias[c]
            for n in range(nstate):
                gA_part[bi, c0 + c, n] = ga[n, c]
    return gu
