"""Choose a selective-scan backend for each call, and check the call's shapes once for all of them.

Backends (all compute the same function, :func:`~cipa_bundle.networks.scan.reference.selective_scan_reference`):

``"cuda"``
    mamba-ssm's fused kernel; CUDA tensors, needs ``mamba_ssm`` (optional extra ``gpu``).
``"numba"``
    compiled CPU kernels with a hand-written backward; the CPU default.
``"torch"``
    chunked pure PyTorch; any device. The fallback without numba (CPU) or mamba-ssm (GPU).
``"reference"``
    the sequential loop, for tests.

The choice is, in order: the ``backend=`` argument, the ``CIPA_SCAN_BACKEND`` environment variable, then ``"auto"``
(cuda on a GPU when it is available, numba on the CPU when it imports, torch otherwise). A GPU run that falls back to
torch warns once per process, since it is much slower than the fused kernel.
"""

from __future__ import annotations

import os
import warnings

import torch

from cipa_bundle.errors import CipaInputError
from cipa_bundle.networks.scan.cuda_backend import cuda_unavailable_reason, selective_scan_cuda
from cipa_bundle.networks.scan.numba_backend import numba_unavailable_reason, selective_scan_numba
from cipa_bundle.networks.scan.reference import selective_scan_reference
from cipa_bundle.networks.scan.torch_backend import selective_scan_torch

__all__ = [
    "BACKENDS",
    "BACKEND_ENV_VAR",
    "ScanBackendError",
    "available_backends",
    "check_scan_inputs",
    "resolve_backend",
    "selective_scan",
]

BACKEND_ENV_VAR = "CIPA_SCAN_BACKEND"
BACKENDS = ("auto", "cuda", "numba", "torch", "reference")

_IMPLEMENTATIONS = {
    "cuda": selective_scan_cuda,
    "numba": selective_scan_numba,
    "torch": selective_scan_torch,
    "reference": selective_scan_reference,
}
_warned_gpu_fallback = False


class ScanBackendError(CipaInputError):
    """An unknown selective-scan backend name, or one that cannot run here (the message says why)."""


def _unavailable_reason(name: str, device: torch.device | None = None, dtype: torch.dtype | None = None) -> str | None:
    if name == "cuda":
        return cuda_unavailable_reason(device, dtype)
    if name == "numba":
        if device is not None and device.type != "cpu":
            return f"it runs on CPU tensors only, and these are on {device}"
        return numba_unavailable_reason()
    return None


def available_backends() -> list[str]:
    """The backends that can run in this process, fastest first (``"cuda"`` only where a GPU and mamba-ssm are)."""
    return [name for name in ("cuda", "numba", "torch", "reference") if _unavailable_reason(name) is None]


def resolve_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that will run a scan of ``dtype`` tensors on ``device``.

    Args:
        backend: a name from :data:`BACKENDS`, or ``None`` to read ``$CIPA_SCAN_BACKEND`` (default ``"auto"``).
        device, dtype: of the scan's input ``u``.

    Raises:
        ScanBackendError: the name is unknown, or names a backend that cannot run these tensors here.
    """
    global _warned_gpu_fallback
    if backend is not None:
        requested, source = backend, "backend argument"
    else:
        requested, source = os.environ.get(BACKEND_ENV_VAR, "auto"), f"${BACKEND_ENV_VAR}"
    name = requested.strip().lower() or "auto"
    if name not in BACKENDS:
        raise ScanBackendError(
            f"unknown selective-scan backend {requested!r} (from the {source}); expected one of {', '.join(BACKENDS)}"
        )
    if name != "auto":
        reason = _unavailable_reason(name, device, dtype)
        if reason is not None:
            raise ScanBackendError(f"selective-scan backend {name!r} (from the {source}) cannot run here: {reason}")
        return name
    if device.type == "cuda":
        reason = cuda_unavailable_reason(device, dtype)
        if reason is None:
            return "cuda"
        if not _warned_gpu_fallback:
            _warned_gpu_fallback = True
            warnings.warn(
                f"selective scan on {device} falls back to the much slower pure-PyTorch backend because the 'cuda' "
                f"backend cannot run: {reason}. Install mamba-ssm (pip install 'cipa-bundle[gpu]') for the fused "
                "kernel.",
                RuntimeWarning,
                stacklevel=3,
            )
        return "torch"
    if device.type == "cpu" and numba_unavailable_reason() is None:
        return "numba"
    return "torch"


def check_scan_inputs(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> None:
    """Raise ``ValueError`` unless the shapes, dtypes and devices form one valid selective scan.

    Expected: ``u``, ``delta`` (b, d, L); ``A`` (d, N); ``B``, ``C`` (b, G, N, L) with ``d % G == 0``;
    ``D``, ``delta_bias`` (d,) or ``None``; all floating point and on one device.
    """
    if u.dim() != 3:
        raise ValueError(f"selective scan: u must be (batch, channels, length), got shape {tuple(u.shape)}")
    batch, channels, length = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"selective scan: delta must have u's shape {tuple(u.shape)}, got {tuple(delta.shape)}")
    if A.dim() != 2 or A.shape[0] != channels:
        raise ValueError(f"selective scan: A must be (channels={channels}, d_state), got shape {tuple(A.shape)}")
    nstate = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() != 4 or t.shape[0] != batch or t.shape[2] != nstate or t.shape[3] != length:
            raise ValueError(
                f"selective scan: {name} must be (batch={batch}, groups, d_state={nstate}, length={length}), "
                f"got shape {tuple(t.shape)}"
            )
    if B.shape[1] != C.shape[1]:
        raise ValueError(
            f"selective scan: B and C must have the same number of groups, got {B.shape[1]} and {C.shape[1]}"
        )
    groups = B.shape[1]
    if groups == 0 or channels % groups:
        raise ValueError(f"selective scan: channels ({channels}) must be a multiple of the B/C groups ({groups})")
    if min(batch, channels, length, nstate) == 0:
        raise ValueError(
            f"selective scan: batch, channels, length and d_state must all be at least 1, got "
            f"{batch}, {channels}, {length} and {nstate}"
        )
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and tuple(t.shape) != (channels,):
            raise ValueError(f"selective scan: {name} must be (channels={channels},), got shape {tuple(t.shape)}")
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "delta_bias": delta_bias}
    for name, t in named.items():
        if t is None:
            continue
        if not t.is_floating_point():
            raise ValueError(f"selective scan: {name} must be a floating-point tensor, got {t.dtype}")
        if t.device != u.device:
            raise ValueError(f"selective scan: {name} is on {t.device} but u is on {u.device}")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Mamba's selective scan (mamba-ssm semantics) on the best backend available.

    With ``dt = softplus(delta + delta_bias)`` (softplus optional) and a zero initial state, for channel ``c`` in
    group ``g = c // (d / G)``: ``h_t = exp(dt_t A_c) h_{t-1} + dt_t B_{g,t} u_t``, ``y_t = <C_{g,t}, h_t> + D_c u_t``.

    Args:
        u: ``(b, d, L)`` input.
        delta: ``(b, d, L)`` step sizes before bias and softplus.
        A: ``(d, N)`` diagonal state matrix (negative in practice).
        B, C: ``(b, G, N, L)`` input and output projections, one per group of ``d / G`` channels.
        D: ``(d,)`` skip weight, or ``None``.
        delta_bias: ``(d,)``, or ``None``.
        delta_softplus: apply softplus to ``delta + delta_bias``.
        backend: ``"auto"``, ``"cuda"``, ``"numba"``, ``"torch"`` or ``"reference"``; ``None`` reads
            ``$CIPA_SCAN_BACKEND`` (default ``"auto"``).

    Returns:
        ``(b, d, L)``, float32 for fp16/bf16/fp32 input and float64 for float64 input; differentiable with respect to
        every tensor argument.

    Raises:
        ValueError: inconsistent shapes, a non-float tensor or mixed devices.
        ScanBackendError: an unknown backend name, or one that cannot run here.
    """
    check_scan_inputs(u, delta, A, B, C, D, delta_bias)
    name = resolve_backend(backend, u.device, u.dtype)
    return _IMPLEMENTATIONS[name](u, delta, A, B, C, D, delta_bias, delta_softplus)
