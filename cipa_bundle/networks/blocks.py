"""Selective-scan (Mamba) blocks shared by every part of CIPA.

* :class:`SS2D` — VMamba's 2-D selective-scan block: a depthwise conv, then four scans over the feature map
  (row-major, column-major and both reversed) whose outputs are summed. Used by the encoder, both DCIM scans and the
  decoder (with ``d_state=4`` there).
* :class:`SS1D` — a one-direction selective scan over a token sequence, without a conv. Used by CRM to scan the
  channel axis.

Both share :class:`SelectiveScanCore`, which owns the per-direction state-space parameters and runs
:func:`cipa_bundle.networks.scan.selective_scan` on them.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from cipa_bundle.networks.scan import selective_scan
from cipa_bundle.networks.scan.reference import scan_compute_dtype

__all__ = ["SelectiveScanCore", "SS2D", "SS1D", "cross_scan", "cross_merge", "auto_dt_rank", "drop_path_schedule"]


def auto_dt_rank(d_model: int) -> int:
    """VMamba's ``dt_rank="auto"``: ``ceil(d_model / 16)``."""
    return math.ceil(d_model / 16)


def drop_path_schedule(rate: float, count: int) -> list[float]:
    """Stochastic-depth rates rising linearly from 0 to ``rate`` over ``count`` blocks (as ``torch.linspace``)."""
    return [rate * i / (count - 1) if count > 1 else 0.0 for i in range(count)]


class SelectiveScanCore(nn.Module):
    """The state-space parameters of ``num_directions`` independent scans and the scan that uses them.

    Each direction ``k`` projects its sequence to a low-rank step size and to input-dependent ``B`` and ``C``
    (``x_proj_weight[k]``), expands the step size to every channel (``dt_proj_weight[k]``, ``dt_proj_bias[k]``) and
    scans with the diagonal state matrix ``A = -exp(A_log)`` and skip ``D``.

    Args:
        d_inner: channels per direction.
        d_state: state size N per channel.
        dt_rank: rank of the step-size projection.
        num_directions: number of independent scans K (4 for SS2D, 1 for SS1D).
        dt_min: smallest initial step size (Mamba's initialisation).
        dt_max: largest initial step size.
        dt_floor: lower clamp of the initial step size.
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        dt_rank: int = 6,
        num_directions: int = 4,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_inner, self.d_state, self.dt_rank, self.num_directions = d_inner, d_state, dt_rank, num_directions
        k = num_directions
        self.x_proj_weight = nn.Parameter(torch.empty(k, dt_rank + 2 * d_state, d_inner))
        self.dt_proj_weight = nn.Parameter(torch.empty(k, d_inner, dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(k, d_inner))
        self.A_log = nn.Parameter(torch.empty(k * d_inner, d_state))
        self.D = nn.Parameter(torch.empty(k * d_inner))
        self._dt_range = (dt_min, dt_max, dt_floor)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation: S4D-real ``A``, unit ``D``, step sizes log-uniform in ``[dt_min, dt_max]``."""
        bound = self.d_inner**-0.5
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        nn.init.uniform_(self.dt_proj_weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt_min, dt_max, dt_floor = self._dt_range
        dt = torch.exp(torch.rand_like(self.dt_proj_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        # inverse of softplus, so that softplus(bias) == dt at initialisation
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.A_log.copy_(torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """Scan ``K`` sequences per sample.

        Args:
            xs: ``(B, K, d_inner, L)`` sequences, one per direction.

        Returns:
            ``(B, K, d_inner, L)`` scan outputs in fp32 (fp64 for fp64 input).
        """
        batch, k, d_inner, length = xs.shape
        # Broadcast matmuls read xs as (d, L) blocks in place and write (B, K, ., L) directly; the equivalent einsums
        # permuted xs and dt through full-size copies (a fifth of an SS2D block's CPU time at 128 x 128).
        projected = torch.matmul(self.x_proj_weight, xs)  # (B, K, dt_rank + 2N, L)
        dt_low_rank, b_proj, c_proj = torch.split(projected, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dt = torch.matmul(self.dt_proj_weight, dt_low_rank)  # (B, K, d_inner, L)
        y = selective_scan(
            xs.reshape(batch, k * d_inner, length),
            dt.reshape(batch, k * d_inner, length),
            -torch.exp(self.A_log.to(scan_compute_dtype(xs.dtype))),
            b_proj,
            c_proj,
            D=self.D,
            delta_bias=self.dt_proj_bias.reshape(-1),
            delta_softplus=True,
        )
        return y.view(batch, k, d_inner, length)


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """Unroll a feature map into VMamba's four scan orders.

    Args:
        x: ``(B, C, H, W)``.

    Returns:
        ``(B, 4, C, H*W)``: row-major, column-major, reversed row-major, reversed column-major.
    """
    batch, channels, height, width = x.shape
    # Written into one buffer: torch.stack + torch.cat would copy every direction a second time.
    xs = x.new_empty((batch, 4, channels, height * width))
    xs[:, 0] = x.flatten(2)
    xs[:, 1].view(batch, channels, width, height).copy_(x.transpose(2, 3))
    xs[:, 2:4] = xs[:, 0:2].flip(-1)
    return xs


def cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sum the four scan outputs back in row-major order (inverse of :func:`cross_scan`, then a sum).

    Args:
        ys: ``(B, 4, C, H*W)``.
        height: H.
        width: W.

    Returns:
        ``(B, C, H*W)`` in row-major order.
    """
    batch, _, channels, length = ys.shape
    unflipped = ys[:, 0:2] + ys[:, 2:4].flip(-1)
    # The add reads the column-major half through a transposed view: no separate copy to row-major order.
    row_major = unflipped[:, 0].view(batch, channels, height, width)
    return (row_major + unflipped[:, 1].view(batch, channels, width, height).transpose(2, 3)).view(batch, channels, length)


class SS2D(nn.Module):
    """VMamba's 2-D selective-scan block (``forward_corev2``), channels-last.

    ``in_proj`` splits into a scan branch and a gate; the scan branch goes through a depthwise 3×3 conv and SiLU,
    four directional scans (:func:`cross_scan`), a sum (:func:`cross_merge`) and a LayerNorm; the gate is SiLU'd and
    multiplies it; ``out_proj`` maps back to ``d_model``.

    Args:
        d_model: input and output channels C.
        d_state: state size N (16 in the encoder and DCIM, 4 in the decoder).
        expand: ``d_inner = expand * d_model``.
        dt_rank: step-size rank; ``None`` means ``ceil(d_model / 16)``.
        d_conv: depthwise conv kernel size.
    """

    def __init__(
        self, d_model: int, d_state: int = 16, expand: float = 2.0, dt_rank: int | None = None, d_conv: int = 3
    ) -> None:
        super().__init__()
        d_inner = int(expand * d_model)
        self.d_inner = d_inner
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv = nn.Conv2d(d_inner, d_inner, d_conv, padding=(d_conv - 1) // 2, groups=d_inner, bias=True)
        self.core = SelectiveScanCore(d_inner, d_state, dt_rank or auto_dt_rank(d_model), num_directions=4)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        batch, height, width, _ = x.shape
        x, gate = self.in_proj(x).chunk(2, dim=-1)
        x = F.silu(self.conv(x.permute(0, 3, 1, 2)))
        ys = self.core(cross_scan(x))
        y = cross_merge(ys, height, width).transpose(1, 2).reshape(batch, height, width, self.d_inner)
        y = self.out_norm(y).to(x.dtype)
        return self.out_proj(y * F.silu(gate))


class SS1D(nn.Module):
    """A one-direction selective scan over a sequence of tokens, without a conv (CRM's channel scan).

    Unlike :class:`SS2D`, SiLU is applied to *both* halves of ``in_proj`` before the scan (as in the official CRM).

    Args:
        d_model: token width.
        d_state: state size N.
        expand: ``d_inner = expand * d_model``.
        dt_rank: step-size rank; ``None`` means ``ceil(d_model / 16)``.
    """

    def __init__(self, d_model: int, d_state: int = 16, expand: float = 2.0, dt_rank: int | None = None) -> None:
        super().__init__()
        d_inner = int(expand * d_model)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.core = SelectiveScanCore(d_inner, d_state, dt_rank or auto_dt_rank(d_model), num_directions=1)
        self.out_norm = nn.LayerNorm(d_inner)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, C)`` -> ``(B, L, C)``."""
        x, gate = F.silu(self.in_proj(x)).chunk(2, dim=-1)
        y = self.core(x.transpose(1, 2).unsqueeze(1)).squeeze(1).transpose(1, 2)
        y = self.out_norm(y).to(x.dtype)
        return self.out_proj(y * gate)
