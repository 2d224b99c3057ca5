"""Plain sequential selective scan: the readable definition every faster backend is tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["selective_scan_reference", "scan_compute_dtype"]


def scan_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The scan runs in fp32 (as the official ``custom_fwd(cast_inputs=float32)`` does), or in fp64 for fp64 input."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def selective_scan_reference(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """Mamba's selective scan, one time step at a time.

    With ``dt = softplus(delta + delta_bias)`` (softplus optional) and a zero initial state, for every channel ``c``
    in group ``g = c // (d / G)``::

        h_t = exp(dt_t * A_c) * h_{t-1} + dt_t * B_{g,t} * u_t        (h_t has N entries)
        y_t = <C_{g,t}, h_t> + D_c * u_t

    Args:
        u: ``(b, d, L)`` input sequence.
        delta: ``(b, d, L)`` step sizes before bias and softplus.
        A: ``(d, N)`` state matrix (diagonal, negative in practice).
        B: ``(b, G, N, L)`` input projection, shared by the ``d / G`` channels of each group.
        C: ``(b, G, N, L)`` output projection, grouped like ``B``.
        D: ``(d,)`` skip weight, or ``None``.
        delta_bias: ``(d,)`` added to ``delta`` before the softplus, or ``None``.
        delta_softplus: apply ``softplus`` to the biased ``delta``.

    Returns:
        ``(b, d, L)`` output in fp32 (fp64 when ``u`` is fp64).
    """
    dtype = scan_compute_dtype(u.dtype)
    u, delta, A, B, C = (t.to(dtype) for t in (u, delta, A, B, C))
    batch, channels, _ = u.shape
    groups = B.shape[1]
    if channels % groups:
        raise ValueError(f"channels ({channels}) must be divisible by the number of B/C groups ({groups})")
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    B = B.repeat_interleave(channels // groups, dim=1)  # (b, d, N, L)
    C = C.repeat_interleave(channels // groups, dim=1)
    state = u.new_zeros(batch, channels, A.shape[1])
    outputs = []
    # unbind rather than indexing [..., t]: the backward of L index ops would build L full-size zero gradients (O(L^2)).
    for dt_t, u_t, B_t, C_t in zip(delta.unbind(-1), u.unbind(-1), B.unbind(-1), C.unbind(-1)):
        decay = torch.exp(dt_t[..., None] * A)
        state = decay * state + (dt_t * u_t)[..., None] * B_t
        outputs.append((state * C_t).sum(-1))
    y = torch.stack(outputs, dim=-1) if outputs else u.new_zeros(batch, channels, 0)
    if D is not None:
        y = y + u * D.to(dtype)[:, None]
    return y
