"""A printable summary of the CIPA network: parameters per part and, optionally, one timed forward pass."""

from __future__ import annotations

import time
from typing import Any

import torch

from cipa_bundle.networks.cipa import CIPA
from cipa_bundle.networks.scan.dispatch import available_backends

__all__ = ["model_summary"]


def model_summary(img_size: int = 512, dims: int = 96, batch: int = 1, forward: bool = False) -> dict[str, Any]:
    """Build ``CIPA(img_size, dims)`` and report its size (and, with ``forward``, one forward pass on noise).

    Returns:
        A dict with ``parameters`` per part and in total, the scan backends available, and when ``forward`` is set the
        output shape, the forward time in seconds and the device.
    """
    model = CIPA(img_size=img_size, dims=dims).eval()
    parts = {name: sum(p.numel() for p in module.parameters()) for name, module in model.named_children()}
    summary: dict[str, Any] = {
        "img_size": list(model.img_size),
        "parameters": {**parts, "total": sum(parts.values())},
        "scan_backends": available_backends(),
    }
    if forward:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = model.to(device)
        x = torch.randn(batch, 2, *model.img_size, device=device)
        with torch.no_grad():
            start = time.perf_counter()
            y = model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            summary.update(output_shape=list(y.shape), forward_seconds=round(time.perf_counter() - start, 3), device=str(device))
    return summary
