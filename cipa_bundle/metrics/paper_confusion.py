"""The paper's confusion-matrix scores as a MONAI metric, for ignite training and validation.

:class:`PaperConfusionMetric` accumulates the per-sample counts of :mod:`cipa_bundle.metrics.confusion` and pools
them over the whole validation set (and over ranks), as the paper does; ``cipa_bundle.workflows.PaperConfusion`` is
its ignite handler for the bundle configs.
"""

from __future__ import annotations

import torch
from monai.metrics import CumulativeIterationMetric

from cipa_bundle.metrics.confusion import ConfusionCounts
from cipa_bundle.metrics.foreground import DEFAULT_THRESHOLD

__all__ = ["PaperConfusionMetric"]


class PaperConfusionMetric(CumulativeIterationMetric):
    """Dataset-level IoU / Dice / balanced accuracy for MONAI and ignite validation, as the paper computes them.

    Each call records the per-sample ``[TP, FP, FN, TN]`` pixel counts (int64, so sums over a large dataset stay
    exact and gather across ranks); :meth:`aggregate` sums them over everything seen since :meth:`reset` and returns
    one score. Use it as a key metric to select the best checkpoint on dataset-level IoU; in a bundle config through
    its handler, which wraps it in an ``IgniteMetricHandler`` reading ``pred`` and ``label`` from the engine output::

        {"_target_": "cipa_bundle.workflows.PaperConfusion", "metric": "iou"}

    Args:
        metric: ``"iou"``, ``"dice"`` (= F1) or ``"acc"`` (balanced accuracy): what :meth:`aggregate` returns.
        threshold: foreground is ``value >= threshold``. Pass sigmoid probabilities or binary masks, not logits.

    ``y_pred`` and ``y`` are batch-first ``(B, 1, H, W[, D])`` tensors or lists of ``(1, H, W[, D])`` tensors.
    """

    def __init__(self, metric: str = "iou", threshold: float = DEFAULT_THRESHOLD) -> None:
        super().__init__()
        if metric not in ("iou", "dice", "acc"):
            raise ValueError(f"metric must be 'iou', 'dice' or 'acc', got {metric!r}")
        self.metric = metric
        self.threshold = float(threshold)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        if y is None:
            raise ValueError("PaperConfusionMetric needs ground truth y")
        if y_pred.shape != y.shape:
            raise ValueError(f"y_pred shape {tuple(y_pred.shape)} differs from y shape {tuple(y.shape)}")
        if y_pred.ndim < 3 or y_pred.shape[1] != 1:
            raise ValueError(f"expected (B, 1, spatial...) single-channel masks, got {tuple(y_pred.shape)}")
        p = (y_pred >= self.threshold).flatten(1)
        g = (y >= self.threshold).flatten(1)
        tp = (p & g).sum(1)
        fp = p.sum(1) - tp
        fn = g.sum(1) - tp
        tn = p.shape[1] - tp - fp - fn
        return torch.stack([tp, fp, fn, tn], dim=1).to(torch.int64)

    def counts(self) -> ConfusionCounts:
        """The pooled confusion counts of everything recorded since the last reset (all ranks)."""
        buffer = self.get_buffer()
        if buffer is None or (isinstance(buffer, torch.Tensor) and buffer.numel() == 0):
            return ConfusionCounts()
        total = torch.as_tensor(buffer).reshape(-1, 4).sum(0).tolist()
        return ConfusionCounts(*(int(v) for v in total))

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """The selected score over the pooled counts, as a 0-d float tensor."""
        return torch.tensor(self.counts().paper_scores()[self.metric], dtype=torch.float64)

