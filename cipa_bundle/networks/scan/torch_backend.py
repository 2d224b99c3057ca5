"""The ``"torch"`` backend: a chunked selective scan in plain PyTorch (CPU or GPU, differentiated by autograd).

It is the fallback where numba is missing on CPU, or mamba-ssm on a GPU. The sequence of length L is cut into K
chunks of T steps (T about sqrt(L)), and the scan runs in two sequential passes of vectorised work:

1. *Within chunks*, all K chunks at once: T steps of ``h = a * h + x`` starting from zero, together with the running
   product ``P`` of the decays ``a`` since the chunk start.
2. *Across chunks*: K steps of ``H_k = P_{k-1,end} * H_{k-1} + h_{k-1,end}``, the true state entering each chunk.

The state at any step is then ``h_local + P * H_in``. Everything is a product or a sum of positive decays and ordinary
values (no logarithms, no division), so float32 keeps the accuracy of the sequential loop; a decay product that
underflows to 0 stands for a contribution that is below float32 resolution anyway. Python-level steps: T + K instead
of L.

Memory is a few tensors of (b, d, L, N) (decays, inputs, per-step states and products), like other parallel scans.
When gradients are needed, the scan runs under activation checkpointing by default (``recompute=True``): autograd
keeps only the inputs and recomputes the scan during the backward, so the (b, d, L, N) intermediates of one scan at
a time are alive instead of those of every scan in the network. Measured on an H200 with the paper's model, the
fallback otherwise needed 53 GiB for one training step at batch 1 and ran out of memory at batch 4.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from cipa_bundle.networks.scan.reference import scan_compute_dtype

__all__ = ["selective_scan_torch", "default_chunk"]


def default_chunk(length: int) -> int:
    """Steps per chunk: the power of two nearest ``sqrt(length)`` (this balances the two Python loops), at least 1."""
    if length <= 1:
        return 1
    return 2 ** round(math.log2(math.sqrt(length)))


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    chunk: int | None = None,
    recompute: bool = True,
) -> torch.Tensor:
    """The selective scan in chunked PyTorch (same contract as ``selective_scan_reference``).

    Args:
        u, delta: ``(b, d, L)``.
        A: ``(d, N)``.
        B, C: ``(b, G, N, L)``; channel ``c`` uses group ``c // (d / G)``.
        D, delta_bias: ``(d,)`` or ``None``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        chunk: steps per chunk (default :func:`default_chunk`).
        recompute: when a backward can follow, save only the inputs and recompute the scan in the backward
            (see the module docstring); the result and gradients are the same either way.

    Returns:
        ``(b, d, L)`` in fp32 (fp64 for fp64 input), on the input's device.
    """
    tensors = (u, delta, A, B, C, D, delta_bias)
    if recompute and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return torch.utils.checkpoint.checkpoint(
            _chunked_scan, *tensors, delta_softplus, chunk, use_reentrant=False, preserve_rng_state=False
        )
    return _chunked_scan(*tensors, delta_softplus, chunk)


def _chunked_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    chunk: int | None,
) -> torch.Tensor:
    """The body of :func:`selective_scan_torch` (same arguments)."""
    dtype = scan_compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    batch, channels, length = u.shape
    groups, nstate = B.shape[1], A.shape[1]
    per_group = channels // groups
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    dt = F.softplus(delta) if delta_softplus else delta
    steps = chunk or default_chunk(length)
    nchunks = -(-length // steps)
    pad = nchunks * steps - length
    dtu = dt * u
    if pad:
        # Padding steps have dt = 0: decay exp(0) = 1 and no input, so the state passes through unchanged.
        dt, dtu = F.pad(dt, (0, pad)), F.pad(dtu, (0, pad))
        B, C = F.pad(B, (0, pad)), F.pad(C, (0, pad))
    padded = nchunks * steps

    # (b, d, K, T, N) decays and inputs; B is shared by the channels of a group, so broadcast instead of copying it.
    decay = torch.exp(dt.view(batch, channels, padded, 1) * A.view(channels, 1, nstate))
    decay = decay.view(batch, channels, nchunks, steps, nstate)
    B_t = B.transpose(2, 3).reshape(batch, groups, 1, nchunks, steps, nstate)
    x = (dtu.view(batch, groups, per_group, nchunks, steps, 1) * B_t).view(batch, channels, nchunks, steps, nstate)
    # Per-step views come from unbind, never from indexing in the loop: the backward of T index ops would build T
    # full-size zero gradients, while unbind's backward stacks the T pieces once.
    decay_steps, x_steps = decay.unbind(3), x.unbind(3)
    C_steps = C.transpose(2, 3).reshape(batch, groups, 1, nchunks, steps, nstate).unbind(4)  # (b, G, 1, K, N) each

    def read_out(states: torch.Tensor, j: int) -> torch.Tensor:  # <C_t, h_t> for step j of every chunk: (b, d, K)
        grouped = states.view(batch, groups, per_group, nchunks, nstate)
        return (grouped * C_steps[j]).sum(-1).view(batch, channels, nchunks)

    # Pass 1: every chunk from a zero state, and the decay products since the chunk start.
    h = x.new_zeros(batch, channels, nchunks, nstate)
    prod = x.new_ones(batch, channels, nchunks, nstate)
    y_steps, products = [], []
    for j in range(steps):
        h = decay_steps[j] * h + x_steps[j]
        prod = prod * decay_steps[j]
        y_steps.append(read_out(h, j))
        products.append(prod)

    # Pass 2: the true state entering each chunk.
    state = x.new_zeros(batch, channels, nstate)
    entering = []
    for chunk_prod, chunk_end in zip(prod.unbind(2), h.unbind(2)):
        entering.append(state)
        state = chunk_prod * state + chunk_end
    h_in = torch.stack(entering, dim=2)  # (b, d, K, N)

    # State at step j of chunk k = local state + (decay product since the chunk start) * state entering the chunk.
    y = torch.stack([y_steps[j] + read_out(products[j] * h_in, j) for j in range(steps)], dim=-1)
    y = y.view(batch, channels, padded)
    y = y[:, :, :length]
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    return y
