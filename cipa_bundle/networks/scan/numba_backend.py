"""The ``"numba"`` backend: the compiled CPU scan of :mod:`.numba_kernels` behind a ``torch.autograd.Function``.

numba is imported lazily (on the first call of :func:`numba_unavailable_reason` or :func:`selective_scan_numba`), so
importing the package neither needs numba nor pays for its import.

Everything per element is compiled, the bias and softplus of ``delta`` included: on CPU each extra full-size torch
pass (and each fresh (b, d, L) tensor, whose pages must be faulted in) costs about as much as the scan's own loop.
"""

from __future__ import annotations

import functools
import math
import os
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import Any, Callable

import torch

from cipa_bundle.networks.scan.reference import scan_compute_dtype

__all__ = ["numba_unavailable_reason", "selective_scan_numba", "tile_sizes"]

_VECTOR = 8  # float32 lanes of AVX2; channel blocks are multiples of it
_pool: ThreadPoolExecutor | None = None
_pool_key: tuple[int, int] = (0, 0)  # (process id, workers) the pool was made for


@functools.cache
def _kernels() -> ModuleType | str:
    """The kernel module, or the reason it cannot be imported (a string)."""
    try:
        from cipa_bundle.networks.scan import numba_kernels
    except Exception as err:  # noqa: BLE001 - any failure (missing numba, broken llvmlite) means "unavailable"
        return f"numba could not be imported ({type(err).__name__}: {err})"
    return numba_kernels


def numba_unavailable_reason() -> str | None:
    """``None`` when the numba backend works here, else a sentence saying why not."""
    kernels = _kernels()
    return kernels if isinstance(kernels, str) else None


def tile_sizes(batch: int, groups: int, per_group: int, length: int, threads: int) -> tuple[int, int]:
    """The ``(chunk, block)`` tiling of a scan: time steps per chunk, channels per work item.

    Blocks hold 32 channels (fewer, in multiples of 8, where that is needed for about four work items per thread,
    so that the threads stay busy at batch 1; never more than the channels of a group). Chunks of 32 steps keep the
    backward buffers of one item (2 x chunk x N x block values, 128 KiB at N = 16) inside the L2 cache, and the
    checkpoints at 1/32 of all states. (Measured on the 2-core AMD EPYC dev machine: blocks of 64 were 10-20% slower
    in the backward, blocks of 16 up to 2x slower, because each (step, state) row then holds too few vectors.)
    """
    items_wanted = 4 * max(threads, 1)
    blocks_per_group = max(1, math.ceil(items_wanted / max(batch * groups, 1)))
    block = math.ceil(per_group / blocks_per_group)
    block = min(32, max(_VECTOR, _VECTOR * math.ceil(block / _VECTOR)))
    block = min(block, per_group)
    chunk = min(32, max(length, 1))
    return chunk, block


def _run_items(kernel: Callable[..., Any], items: int, threads: int, *args: Any) -> None:
    """Call ``kernel(*args, start, stop)`` over ``range(items)`` split into ranges run on ``threads`` threads.

    The kernels release the GIL, so the ranges really run in parallel. A pool made before a ``fork`` is never reused
    in the child (its threads do not exist there).
    """
    global _pool, _pool_key
    if threads <= 1 or items <= 1:
        kernel(*args, 0, items)
        return
    key = (os.getpid(), threads)
    if _pool is None or _pool_key != key:
        if _pool is not None and _pool_key[0] == key[0]:
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="cipa-scan")
        _pool_key = key
    # A few ranges per thread let a thread that finishes early take more work.
    parts = min(items, 4 * threads)
    bounds = [items * i // parts for i in range(parts + 1)]
    futures = [_pool.submit(kernel, *args, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
    for future in futures:
        future.result()


class _NumbaScan(torch.autograd.Function):
    """``y = scan(u, delta, delta_bias, A, B, C, D)`` on CPU; all inputs already contiguous in the compute dtype."""

    @staticmethod
    def forward(ctx, u, delta, delta_bias, A, B, C, D, use_softplus, save):  # type: ignore[override]
        kernels = _kernels()
        assert not isinstance(kernels, str), kernels
        batch, channels, length = u.shape
        groups, nstate = B.shape[1], A.shape[1]
        threads = torch.get_num_threads()
        chunk, block = tile_sizes(batch, groups, channels // groups, length, threads)
        y = torch.empty_like(u)
        checkpoints = u.new_empty((batch, math.ceil(length / chunk), nstate, channels) if save else (0, 0, 0, 0))
        if kernels.state_lanes_apply(nstate, channels, groups):
            # B and C time-major (small: G * N * L values) for the kernel that keeps each channel's states in registers.
            B_t, C_t = (M.transpose(2, 3).contiguous() for M in (B, C))
            _run_items(
                kernels.scan_forward_state_lanes,
                kernels.count_items(batch, channels, groups, kernels.STATE_LANES_PAIR), threads,
                u.numpy(), delta.numpy(), delta_bias.numpy(), use_softplus, A.numpy(), B_t.numpy(), C_t.numpy(),
                D.numpy(), y.numpy(), checkpoints.numpy(), chunk, save,
            )
        else:
            _run_items(
                kernels.scan_forward, kernels.count_items(batch, channels, groups, block), threads,
                u.numpy(), delta.numpy(), delta_bias.numpy(), use_softplus, A.numpy(), B.numpy(), C.numpy(),
                D.numpy(), y.numpy(), checkpoints.numpy(), chunk, block, save,
            )
        if save:
            ctx.save_for_backward(u, delta, delta_bias, A, B, C, D, checkpoints)
            ctx.config = (chunk, block, use_softplus)
        return y

    @staticmethod
    def backward(ctx, gy):  # type: ignore[override]
        kernels = _kernels()
        u, delta, delta_bias, A, B, C, D, checkpoints = ctx.saved_tensors
        chunk, block, use_softplus = ctx.config
        batch, channels, length = u.shape
        groups, nstate = B.shape[1], A.shape[1]
        nblocks = math.ceil((channels // groups) / block)
        gy = gy.detach().to(u.dtype).contiguous()
        gu = torch.empty_like(u)
        gdelta = torch.empty_like(u)
        gA = u.new_empty((batch, channels, nstate))
        gB = u.new_empty((batch, groups, nblocks, nstate, length))
        gC = torch.empty_like(gB)
        gD = u.new_empty((batch, channels))
        gbias = u.new_empty((batch, channels))
        _run_items(
            kernels.scan_backward, kernels.count_items(batch, channels, groups, block), torch.get_num_threads(),
            u.numpy(), delta.numpy(), delta_bias.numpy(), use_softplus, A.numpy(), B.numpy(), C.numpy(), D.numpy(),
            gy.numpy(), checkpoints.numpy(), chunk, block,
            gu.numpy(), gdelta.numpy(), gA.numpy(), gB.numpy(), gC.numpy(), gD.numpy(), gbias.numpy(),
        )
        # A group's channel blocks are usually 1-3, so these sums are small next to the scan itself.
        gB = gB[:, :, 0] if nblocks == 1 else gB.sum(2)
        gC = gC[:, :, 0] if nblocks == 1 else gC.sum(2)
        return gu, gdelta, gbias.sum(0), gA.sum(0), gB, gC, gD.sum(0), None, None


def selective_scan_numba(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan with the compiled CPU kernels (same contract as ``selective_scan_reference``).

    Shapes are assumed valid (the dispatcher checks them) and tensors on the CPU. Inputs may be non-contiguous or of
    another float dtype; they are copied to contiguous tensors in the compute dtype (fp32, or fp64 for fp64 input)
    only where needed. Bias and softplus of ``delta`` run inside the kernels, so no extra (b, d, L) tensor is made.

    Returns:
        ``(b, d, L)`` in the compute dtype.
    """
    reason = numba_unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"the 'numba' selective-scan backend is unavailable: {reason}")
    dtype = scan_compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(dtype).contiguous() for t in (u, delta, A, B, C))
    # A missing D or bias is a zero one: the kernels still compute its (unused) gradient, which costs next to nothing.
    D = u.new_zeros(u.shape[1]) if D is None else D.to(dtype).contiguous()
    delta_bias = u.new_zeros(u.shape[1]) if delta_bias is None else delta_bias.to(dtype).contiguous()
    tensors = (u, delta, delta_bias, A, B, C, D)
    # Checkpoints only when a backward can follow. (Inside forward, ctx.needs_input_grad would say True for
    # parameters even under torch.no_grad(), and inference would pay for them.)
    save = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return _NumbaScan.apply(*tensors, bool(delta_softplus), save)
