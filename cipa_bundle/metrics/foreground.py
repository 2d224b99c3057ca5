"""What counts as foreground in every metric of :mod:`cipa_bundle.metrics`.

Masks are binarised as ``value >= 0.5`` everywhere (the paper's sigmoid threshold, and 0/1 or 0/255-scaled labels
alike), so both probability maps and label maps are accepted.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["DEFAULT_THRESHOLD", "foreground"]

#: Foreground is ``value >= DEFAULT_THRESHOLD``: the paper thresholds sigmoid outputs at 0.5.
DEFAULT_THRESHOLD = 0.5


def foreground(mask: Any, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean array of ``mask >= threshold`` (bool input passes through)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    return arr if arr.dtype == bool else arr >= threshold
