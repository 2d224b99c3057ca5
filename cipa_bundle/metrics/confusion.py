"""The CIPA paper's dataset-level confusion matrix (CVPR 2025, arXiv 2503.17261; the official ``pred.py``).

One confusion matrix is summed over every pixel of every slice of the test set (TP, FP, FN, TN), then
``IoU = TP / (TP + FP + FN)``, ``F1 = Dice = 2TP / (2TP + FP + FN)`` and
``Acc = (TP / (TP + FN) + TN / (TN + FP)) / 2`` (*balanced* accuracy, not pixel accuracy).
A ratio whose denominator is 0 is 1.0 (nothing to find, or nothing to reject, counts as perfect), as the paper
does for Dice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cipa_bundle.metrics.foreground import DEFAULT_THRESHOLD, foreground

__all__ = ["ConfusionCounts", "confusion_counts"]


@dataclass(frozen=True)
class ConfusionCounts:
    """Pixel (or voxel) counts of a binary confusion matrix; add two to pool them over a dataset."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @staticmethod
    def _ratio(num: int, den: int) -> float:
        # 0/0 means "nothing to find / nothing to reject": the paper scores that as perfect (Dice = 1.0).
        return 1.0 if den == 0 else num / den

    @property
    def iou(self) -> float:
        """``TP / (TP + FP + FN)``."""
        return self._ratio(self.tp, self.tp + self.fp + self.fn)

    @property
    def dice(self) -> float:
        """F1 = Dice = ``2TP / (2TP + FP + FN)``."""
        return self._ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    @property
    def sensitivity(self) -> float:
        """``TP / (TP + FN)``."""
        return self._ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float:
        """``TN / (TN + FP)``."""
        return self._ratio(self.tn, self.tn + self.fp)

    @property
    def balanced_accuracy(self) -> float:
        """The paper's "Acc": mean of sensitivity and specificity."""
        return 0.5 * (self.sensitivity + self.specificity)

    def paper_scores(self) -> dict[str, float]:
        """``{"iou", "dice", "acc"}`` as the paper reports them (fractions in [0, 1], not percent)."""
        return {"iou": self.iou, "dice": self.dice, "acc": self.balanced_accuracy}


def confusion_counts(pred: Any, gt: Any, threshold: float = DEFAULT_THRESHOLD) -> ConfusionCounts:
    """Confusion counts of two same-shape masks of any dimension (binarised as ``>= threshold``)."""
    p, g = foreground(pred, threshold), foreground(gt, threshold)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    return ConfusionCounts(tp, fp, fn, int(p.size) - tp - fp - fn)
