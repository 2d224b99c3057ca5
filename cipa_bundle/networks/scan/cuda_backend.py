"""The ``"cuda"`` backend: mamba-ssm's fused selective-scan kernel, when the tensors are on a GPU and it imports.

mamba-ssm is optional (``pip install cipa-bundle[gpu]``) and imported only on first use, never when this package is
imported: on machines without its compiled extension ``import mamba_ssm`` fails (``No module named
'selective_scan_cuda'``) or takes seconds (it pulls in transformers and triton), and neither may affect us.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

__all__ = ["cuda_unavailable_reason", "selective_scan_cuda"]


@functools.cache
def _mamba_scan() -> Callable[..., torch.Tensor] | str:
    """mamba-ssm's ``selective_scan_fn``, or the reason it cannot be imported (a string)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as err:  # noqa: BLE001 - ImportError, but also RuntimeError/OSError from a broken CUDA build
        return f"mamba_ssm could not be imported ({type(err).__name__}: {err})"
    return selective_scan_fn


def cuda_unavailable_reason(device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
    """``None`` when the cuda backend can run tensors of ``device``/``dtype`` here, else a sentence saying why not.

    With ``device``/``dtype`` left out, only the installation is checked (CUDA present, mamba-ssm importable).
    """
    if device is not None and device.type != "cuda":
        return f"it needs CUDA tensors, and these are on {device}"
    if dtype == torch.float64:
        return "mamba-ssm's kernel has no float64 version"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    scan = _mamba_scan()
    return scan if isinstance(scan, str) else None


def selective_scan_cuda(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
) -> torch.Tensor:
    """The selective scan with mamba-ssm's CUDA kernel (same contract as ``selective_scan_reference``).

    Inputs are cast to float32 first, as the official CIPA code does (``custom_fwd(cast_inputs=float32)``), so the
    output is ``(b, d, L)`` float32 for fp16/bf16/fp32 input. float64 is refused (the kernel has no such version).
    """
    reason = cuda_unavailable_reason(u.device, u.dtype)
    if reason is not None:
        raise RuntimeError(f"the 'cuda' selective-scan backend is unavailable: {reason}")
    scan = _mamba_scan()
    assert not isinstance(scan, str)
    f32 = torch.float32
    if delta_bias is not None and not delta_softplus:
        # mamba-ssm 2.3.2's backward returns NaN gradients for a bias without softplus when L leaves a partial
        # chunk (seen on an H200 at L = 257, 300, 2049; not at 256, 512, 2048): its padded tail steps use dt = bias,
        # which may be negative there. Adding the bias ourselves is the same function and keeps the tail at dt = 0.
        delta = delta.to(f32) + delta_bias.to(f32)[:, None]
        delta_bias = None
    return scan(
        u.to(f32),
        delta.to(f32),
        A.to(f32),
        B.to(f32),
        C.to(f32),
        D=None if D is None else D.to(f32),
        z=None,
        delta_bias=None if delta_bias is None else delta_bias.to(f32),
        delta_softplus=delta_softplus,
        return_last_state=False,
    )
