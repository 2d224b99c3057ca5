"""Choose a selective-scan backend (temporary: reference only; the fast backends land next)."""

from __future__ import annotations

import os

import torch

from cipa_bundle.networks.scan.reference import selective_scan_reference

__all__ = ["selective_scan", "available_backends"]


def available_backends() -> list[str]:
    return ["reference"]


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
    del backend, os
    return selective_scan_reference(u, delta, A, B, C, D, delta_bias, delta_softplus)
