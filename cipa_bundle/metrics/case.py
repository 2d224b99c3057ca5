"""Per-case 3-D metrics: the autoPET metrics, 3-D HD95 in mm and the paper's per-slice HD95 of one case.

**autoPET metrics** per 3-D case (Gatidis et al., autoPET challenge; the reference script is ``val_script.py`` in
github.com/lab-midas/autoPET): Dice, false-positive volume (ml of the predicted connected components that do not
touch the ground truth) and false-negative volume (ml of the ground-truth components that the prediction does not
touch). That script labels components with ``cc3d.connected_components(..., connectivity=18)``, so 18-connectivity
(faces and edges, not corners) is the default here; 6 and 26 are available; components come from
:mod:`cipa_bundle.components`. Per case this module also reports HD95 in mm (the definition of
:mod:`cipa_bundle.metrics.surface_distance` on the 3-D masks with the voxel spacing: 0 when both masks are empty,
undefined when exactly one is). Dice of two empty masks is 1.0 (the paper's rule; the autoPET script would divide by
zero).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cipa_bundle.components import label_components_in_box
from cipa_bundle.io.volume import axial_axis
from cipa_bundle.metrics.confusion import confusion_counts
from cipa_bundle.metrics.foreground import foreground
from cipa_bundle.metrics.surface_distance import hd95, slice_hd95_values

__all__ = [
    "AUTOPET_CONNECTIVITY",
    "CaseMetrics",
    "case_hd95_mm",
    "case_metrics",
    "dice_score",
    "false_negative_volume_ml",
    "false_positive_volume_ml",
]

#: Neighbourhood size used by the autoPET reference script (``cc3d`` connectivity 18).
AUTOPET_CONNECTIVITY = 18


def dice_score(pred: Any, gt: Any) -> float:
    """``2|P ∩ G| / (|P| + |G|)``; 1.0 when both masks are empty (the paper's rule)."""
    return confusion_counts(pred, gt).dice


def case_hd95_mm(pred: Any, gt: Any, spacing: Sequence[float]) -> float:
    """3-D HD95 in mm (definition in :mod:`cipa_bundle.metrics.surface_distance`); 0 if both masks are empty, ``nan``
    if exactly one is.

    A 3-D case has no "image centre" convention: a missed or invented tumour is reported through the FP/FN
    volumes instead, and ``nan`` keeps it out of the mean HD95.
    """
    p, g = foreground(pred), foreground(gt)
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    if has_p != has_g:
        return math.nan
    return hd95(p, g, spacing)


def _untouched_voxels(mask: np.ndarray, other: np.ndarray, connectivity: int) -> int:
    """Voxels of the connected components of ``mask`` that share no voxel with ``other``."""
    if mask.ndim != 3 or mask.shape != other.shape:
        raise ValueError(f"need two 3-D masks of one shape, got {mask.shape} and {other.shape}")
    labels, box, n = label_components_in_box(mask, connectivity)
    if n == 0:
        return 0
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    touched = np.unique(labels[np.asarray(other[box], dtype=bool) & (labels > 0)])
    return int(sizes[1:].sum() - sizes[touched].sum())


def false_positive_volume_ml(pred: Any, gt: Any, voxel_ml: float, connectivity: int = AUTOPET_CONNECTIVITY) -> float:
    """autoPET false-positive volume: ml of predicted connected components with no voxel in the ground truth.

    Args:
        pred, gt: same-shape ``(I, J, K)`` masks.
        voxel_ml: volume of one voxel in ml (mm^3 / 1000).
        connectivity: 18 as in the autoPET reference script; 6 or 26 also accepted.
    """
    return _untouched_voxels(foreground(pred), foreground(gt), connectivity) * voxel_ml


def false_negative_volume_ml(pred: Any, gt: Any, voxel_ml: float, connectivity: int = AUTOPET_CONNECTIVITY) -> float:
    """autoPET false-negative volume: ml of ground-truth connected components with no voxel in the prediction."""
    return _untouched_voxels(foreground(gt), foreground(pred), connectivity) * voxel_ml


@dataclass
class CaseMetrics:
    """Every number :func:`~cipa_bundle.metrics.evaluate.evaluate_folder` reports for one 3-D case (one CSV row)."""

    case: str
    dice: float
    hd95_mm: float
    fp_volume_ml: float
    fn_volume_ml: float
    gt_volume_ml: float
    pred_volume_ml: float
    tp: int
    fp: int
    fn: int
    tn: int
    n_slices: int
    n_tumour_slices: int
    slice_hd95_px_mean: float


def case_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    affine: np.ndarray,
    case: str = "",
    connectivity: int = AUTOPET_CONNECTIVITY,
) -> tuple[CaseMetrics, np.ndarray, np.ndarray]:
    """All metrics of one ``(I, J, K)`` case.

    Args:
        pred, gt: same-shape 3-D masks (binarised as ``>= 0.5``).
        affine: ``(4, 4)`` voxel-to-world matrix giving the voxel spacing (mm) and the axial axis.
        case: name recorded in the result.
        connectivity: component connectivity for the FP/FN volumes.

    Returns:
        ``(metrics, slice_hd95, tumour_slices)``: the case metrics, the ``(n_slices,)`` per-axial-slice paper HD95
        in pixels and the ``(n_slices,)`` bool flags of slices whose ground truth has foreground, which
        :func:`~cipa_bundle.metrics.evaluate.evaluate_folder` pools over all cases.
    """
    p, g = foreground(pred), foreground(gt)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    axis = axial_axis(affine)
    counts = confusion_counts(p, g)
    slice_hd = slice_hd95_values(p, g, axis)
    tumour = np.moveaxis(g, axis, 0).reshape(g.shape[axis], -1).any(axis=1)
    metrics = CaseMetrics(
        case=case,
        dice=counts.dice,
        hd95_mm=case_hd95_mm(p, g, spacing),
        fp_volume_ml=false_positive_volume_ml(p, g, voxel_ml, connectivity),
        fn_volume_ml=false_negative_volume_ml(p, g, voxel_ml, connectivity),
        gt_volume_ml=(counts.tp + counts.fn) * voxel_ml,
        pred_volume_ml=(counts.tp + counts.fp) * voxel_ml,
        tp=counts.tp,
        fp=counts.fp,
        fn=counts.fn,
        tn=counts.tn,
        n_slices=int(g.shape[axis]),
        n_tumour_slices=int(tumour.sum()),
        slice_hd95_px_mean=float(slice_hd.mean()) if slice_hd.size else math.nan,
    )
    return metrics, slice_hd, tumour

