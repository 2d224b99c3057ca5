"""Segmentation metrics: the CIPA paper's 2-D metrics exactly, and the autoPET per-case 3-D metrics.

One concept per module, as ``monai.metrics`` is laid out:

* :mod:`~cipa_bundle.metrics.foreground`: what counts as foreground (``value >= 0.5``) in every metric;
* :mod:`~cipa_bundle.metrics.confusion`: the paper's confusion matrix summed over the dataset, and IoU, F1 (= Dice)
  and balanced accuracy from it;
* :mod:`~cipa_bundle.metrics.surface_distance`: HD95 (medpy's definition, exact Euclidean distance transform) and
  the paper's per-slice HD95 in pixels;
* :mod:`~cipa_bundle.metrics.case`: the per-case 3-D metrics (Dice, HD95 in mm, autoPET false-positive and
  false-negative volumes);
* :mod:`~cipa_bundle.metrics.paper_confusion`: :class:`PaperConfusionMetric`, the confusion-matrix scores as a MONAI
  metric for ignite training and validation;
* :mod:`~cipa_bundle.metrics.evaluate`: :func:`evaluate_folder`, folders of predicted NIfTI masks scored against
  ground truth into ``metrics.csv`` and ``summary.json``.

It imports :mod:`cipa_bundle.errors`, :mod:`cipa_bundle.io` and :mod:`cipa_bundle.components` only, never
:mod:`cipa_bundle.data` or anything above it.
"""

from __future__ import annotations

from cipa_bundle.metrics.case import (
    AUTOPET_CONNECTIVITY,
    CaseMetrics,
    case_hd95_mm,
    case_metrics,
    dice_score,
    false_negative_volume_ml,
    false_positive_volume_ml,
)
from cipa_bundle.metrics.confusion import ConfusionCounts, confusion_counts
from cipa_bundle.metrics.evaluate import evaluate_folder
from cipa_bundle.metrics.foreground import DEFAULT_THRESHOLD
from cipa_bundle.metrics.paper_confusion import PaperConfusionMetric
from cipa_bundle.metrics.surface_distance import hd95, hd95_slice, mean_slice_hd95

__all__ = [
    "ConfusionCounts",
    "confusion_counts",
    "hd95",
    "hd95_slice",
    "mean_slice_hd95",
    "dice_score",
    "case_hd95_mm",
    "false_positive_volume_ml",
    "false_negative_volume_ml",
    "CaseMetrics",
    "case_metrics",
    "PaperConfusionMetric",
    "evaluate_folder",
    "DEFAULT_THRESHOLD",
    "AUTOPET_CONNECTIVITY",
]
