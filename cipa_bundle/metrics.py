"""Segmentation metrics: the CIPA paper's 2-D metrics exactly, and the autoPET per-case 3-D metrics.

**Paper metrics** (CIPA, CVPR 2025, arXiv 2503.17261; the official ``pred.py``):

* one confusion matrix summed over every pixel of every slice of the test set (TP, FP, FN, TN), then
  ``IoU = TP / (TP + FP + FN)``, ``F1 = Dice = 2TP / (2TP + FP + FN)`` and
  ``Acc = (TP / (TP + FN) + TN / (TN + FP)) / 2`` (*balanced* accuracy, not pixel accuracy).
  A ratio whose denominator is 0 is 1.0 (nothing to find, or nothing to reject, counts as perfect), as the paper
  does for Dice;
* HD95 computed per 2-D slice in pixels (spacing 1) and then averaged over slices, with the paper's empty-mask rules
  (see :func:`hd95_slice`).

**HD95 definition** (medpy's ``hd95``, which the paper calls on 2-D arrays): the surface of a mask is
``mask XOR binary_erosion(mask)`` with the connectivity-1 structuring element (4-neighbourhood in 2-D,
6-neighbourhood in 3-D) and voxels outside the array counting as background, so a mask touching the array edge has
a surface there. With ``d(a, B)`` the Euclidean distance (in the given spacing) from a surface voxel ``a`` to the
nearest surface voxel of ``B``, HD95 is the 95th percentile (numpy's default linear interpolation) of the pooled
set ``{d(a, B) : a in surface(A)} ∪ {d(b, A) : b in surface(B)}``. This is *not* MONAI's
``compute_hausdorff_distance(percentile=95)``, which takes the larger of the two directed percentiles; the two
differ on asymmetric shapes, which is why this module computes it itself (exact Euclidean distance transform,
Felzenszwalb & Huttenlocher, as a small numba kernel: scipy is not a dependency).

**autoPET metrics** per 3-D case (Gatidis et al., autoPET challenge; the reference script is ``val_script.py`` in
github.com/lab-midas/autoPET): Dice, false-positive volume (ml of the predicted connected components that do not
touch the ground truth) and false-negative volume (ml of the ground-truth components that the prediction does not
touch). That script labels components with ``cc3d.connected_components(..., connectivity=18)``, so 18-connectivity
(faces and edges, not corners) is the default here; 6 and 26 are available. Per case this module also reports HD95
in mm (the definition above on the 3-D masks with the voxel spacing: 0 when both masks are empty, undefined when
exactly one is). Dice of two empty masks is 1.0 (the paper's rule; the autoPET script would divide by zero).

Masks are binarised as ``value >= 0.5`` everywhere (the paper's sigmoid threshold, and 0/1 or 0/255-scaled labels
alike), so both probability maps and label maps are accepted.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numba
import numpy as np
import torch
from monai.metrics import CumulativeIterationMetric

from cipa_bundle.components import label_components_in_box
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.nifti import is_nifti_path, strip_nifti_suffix
from cipa_bundle.io.volume import axial_axis

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

#: Foreground is ``value >= DEFAULT_THRESHOLD``: the paper thresholds sigmoid outputs at 0.5.
DEFAULT_THRESHOLD = 0.5

#: Neighbourhood size used by the autoPET reference script (``cc3d`` connectivity 18).
AUTOPET_CONNECTIVITY = 18


def _binary(mask: Any, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean array of ``mask >= threshold`` (bool input passes through)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    arr = np.asarray(mask)
    return arr if arr.dtype == bool else arr >= threshold


# ---------------------------------------------------------------------------------------------------- confusion
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
    p, g = _binary(pred, threshold), _binary(gt, threshold)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    tp = int(np.count_nonzero(p & g))
    fp = int(np.count_nonzero(p)) - tp
    fn = int(np.count_nonzero(g)) - tp
    return ConfusionCounts(tp, fp, fn, int(p.size) - tp - fp - fn)


# ---------------------------------------------------------------------------------------------------- kernels
# scipy is not a dependency of this package (and ITK's Python wrappers take many seconds to load), so the exact
# Euclidean distance transform below is a small numba kernel; components come from cipa_bundle.components.
@numba.njit(cache=True, nogil=True)
def _squared_edt_lines(f: np.ndarray, step: float) -> np.ndarray:
    """1-D squared distance transform of each row of ``f`` (Felzenszwalb & Huttenlocher 2012, lower envelope).

    Args:
        f: ``(n_lines, L)`` float64: 0 at sites, ``inf`` elsewhere, or squared distances from earlier axes.
        step: sample spacing along the rows.

    Returns:
        ``(n_lines, L)``: ``min_q step^2 (p - q)^2 + f[q]`` for every ``p`` (``inf`` on rows without a finite value).
    """
    n_lines, length = f.shape
    out = np.empty_like(f)
    v = np.empty(length, dtype=np.int64)
    z = np.empty(length + 1, dtype=np.float64)
    w2 = step * step
    for line in range(n_lines):
        k = -1
        for q in range(length):
            fq = f[line, q]
            if fq == np.inf:
                continue
            if k < 0:
                k = 0
                v[0] = q
                z[0] = -np.inf
                z[1] = np.inf
                continue
            while True:
                p = v[k]
                s = ((fq + w2 * q * q) - (f[line, p] + w2 * p * p)) / (2.0 * w2 * (q - p))
                if s <= z[k]:
                    k -= 1  # z[0] is -inf, so this never pops the first parabola
                else:
                    break
            k += 1
            v[k] = q
            z[k] = s
            z[k + 1] = np.inf
        if k < 0:
            out[line, :] = np.inf
            continue
        j = 0
        for q in range(length):
            while z[j + 1] < q:
                j += 1
            p = v[j]
            out[line, q] = w2 * (q - p) * (q - p) + f[line, p]
    return out


def _distance_to(sites: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance from every voxel to the nearest ``True`` voxel of ``sites`` (exact, any dimension)."""
    d = np.where(sites, 0.0, np.inf)
    for axis in range(sites.ndim):
        moved = np.moveaxis(d, axis, -1)
        lines = np.ascontiguousarray(moved).reshape(-1, moved.shape[-1])
        d = np.moveaxis(_squared_edt_lines(lines, float(spacing[axis])).reshape(moved.shape), -1, axis)
    return np.sqrt(d)


# ---------------------------------------------------------------------------------------------------- HD95
def _surface(mask: np.ndarray) -> np.ndarray:
    """``mask XOR erosion(mask)`` with the connectivity-1 element; outside the array is background."""
    padded = np.pad(mask, 1, constant_values=False)
    eroded = mask.copy()
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            eroded &= np.roll(padded, shift, axis=axis)[core]
    return mask & ~eroded


def hd95(pred: Any, gt: Any, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two non-empty masks (medpy ``hd95`` semantics).

    Args:
        pred, gt: same-shape masks of any dimension (binarised as ``>= 0.5``).
        spacing: voxel size per axis (e.g. mm); ``None`` means 1 per axis, giving the result in voxels.

    Returns:
        HD95 in the units of ``spacing``. See the module docstring for the exact definition.

    Raises:
        ValueError: when either mask is empty (the distance is undefined; callers apply their own rule).
    """
    p, g = _binary(pred), _binary(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    if not p.any() or not g.any():
        raise ValueError("hd95 is undefined when a mask is empty")
    spacing_arr = np.ones(p.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (p.ndim,):
        raise ValueError(f"spacing needs {p.ndim} values, got {spacing}")
    # Every surface voxel lies inside the bounding box of both masks; one voxel of margin keeps the erosion exact
    # (the margin is background, just as the array outside is), so the distance maps only cover that box.
    where = np.nonzero(p | g)
    box = tuple(
        slice(max(int(ix.min()) - 1, 0), min(int(ix.max()) + 2, n)) for ix, n in zip(where, p.shape, strict=True)
    )
    sp, sg = _surface(p[box]), _surface(g[box])
    to_g = _distance_to(sg, spacing_arr)[sp]
    to_p = _distance_to(sp, spacing_arr)[sg]
    return float(np.percentile(np.concatenate([to_g, to_p]), 95))


def hd95_slice(pred: Any, gt: Any) -> float:
    """The paper's per-slice HD95 in pixels, with its empty-mask rules.

    Args:
        pred, gt: ``(H, W)`` masks.

    Rules (official ``pred.py``): both empty -> 0. Prediction empty, ground truth not -> one foreground pixel is set
    at the image centre ``(H // 2, W // 2)`` of the prediction (``(256, 256)`` for 512 x 512) and HD95 is computed.
    Ground truth empty, prediction not (the official script crashes on this case; PCLT20K's test slices all contain
    tumour) -> the same centre pixel is set in the ground truth instead, the symmetric extension of the rule.
    """
    p, g = _binary(pred).copy(), _binary(gt).copy()
    if p.ndim != 2:
        raise ValueError(f"hd95_slice takes (H, W) masks, got shape {p.shape}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    centre = (p.shape[0] // 2, p.shape[1] // 2)
    if not has_p:
        p[centre] = True
    elif not has_g:
        g[centre] = True
    return hd95(p, g)


def mean_slice_hd95(pred: np.ndarray, gt: np.ndarray, axis: int = 2, tumour_slices_only: bool = False) -> float:
    """Mean of :func:`hd95_slice` over the 2-D slices of two volumes along ``axis`` (pixels).

    Args:
        pred, gt: same-shape 3-D masks.
        axis: the slicing axis (2 = the ``k`` axis of an ``(I, J, K)`` volume).
        tumour_slices_only: average only over slices whose ground truth has foreground (PCLT20K's test set holds
            only such slices); otherwise every slice counts, both-empty ones as 0.

    Returns:
        The mean, or ``nan`` when no slice qualifies.
    """
    values = _slice_hd95_values(_binary(pred), _binary(gt), axis)
    g = np.moveaxis(_binary(gt), axis, 0).reshape(values.size, -1).any(axis=1)
    chosen = values[g] if tumour_slices_only else values
    return float(chosen.mean()) if chosen.size else math.nan


def _slice_hd95_values(p: np.ndarray, g: np.ndarray, axis: int) -> np.ndarray:
    """Per-slice paper HD95 (pixels) along ``axis``; both-empty slices skip the distance computation."""
    p, g = np.moveaxis(p, axis, 0), np.moveaxis(g, axis, 0)
    out = np.zeros(p.shape[0])
    for k in np.nonzero(p.reshape(p.shape[0], -1).any(1) | g.reshape(g.shape[0], -1).any(1))[0]:
        out[k] = hd95_slice(p[k], g[k])
    return out


# ---------------------------------------------------------------------------------------------------- 3-D case
def dice_score(pred: Any, gt: Any) -> float:
    """``2|P ∩ G| / (|P| + |G|)``; 1.0 when both masks are empty (the paper's rule)."""
    return confusion_counts(pred, gt).dice


def case_hd95_mm(pred: Any, gt: Any, spacing: Sequence[float]) -> float:
    """3-D HD95 in mm (definition in the module docstring); 0 if both masks are empty, ``nan`` if exactly one is.

    A 3-D case has no "image centre" convention: a missed or invented tumour is reported through the FP/FN
    volumes instead, and ``nan`` keeps it out of the mean HD95.
    """
    p, g = _binary(pred), _binary(gt)
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
    return _untouched_voxels(_binary(pred), _binary(gt), connectivity) * voxel_ml


def false_negative_volume_ml(pred: Any, gt: Any, voxel_ml: float, connectivity: int = AUTOPET_CONNECTIVITY) -> float:
    """autoPET false-negative volume: ml of ground-truth connected components with no voxel in the prediction."""
    return _untouched_voxels(_binary(gt), _binary(pred), connectivity) * voxel_ml


@dataclass
class CaseMetrics:
    """Every number :func:`evaluate_folder` reports for one 3-D case (one CSV row)."""

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
        :func:`evaluate_folder` pools over all cases.
    """
    p, g = _binary(pred), _binary(gt)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_ml = abs(float(np.linalg.det(affine[:3, :3]))) / 1000.0
    axis = axial_axis(affine)
    counts = confusion_counts(p, g)
    slice_hd = _slice_hd95_values(p, g, axis)
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


# ---------------------------------------------------------------------------------------------------- MONAI metric
class PaperConfusionMetric(CumulativeIterationMetric):
    """Dataset-level IoU / Dice / balanced accuracy for MONAI and ignite validation, as the paper computes them.

    Each call records the per-sample ``[TP, FP, FN, TN]`` pixel counts (int64, so sums over a large dataset stay
    exact and gather across ranks); :meth:`aggregate` sums them over everything seen since :meth:`reset` and returns
    one score. Use it as a key metric to select the best checkpoint on dataset-level IoU::

        {"_target_": "IgniteMetricHandler",
         "metric_fn": {"_target_": "cipa_bundle.metrics.PaperConfusionMetric", "metric": "iou"},
         "output_transform": "$monai.handlers.from_engine(['pred', 'label'])"}

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


# ---------------------------------------------------------------------------------------------------- evaluate
def _collect(path: Path, name: str | None, role: str) -> dict[str, Path]:
    """Map case id -> file for a NIfTI file or a folder searched recursively.

    Without ``name`` the case id is the file's path relative to the folder, minus ``.nii[.gz]`` (flat nnU-Net
    style folders: ``case001.nii.gz``). With ``name`` only files called ``name`` count and the case id is their
    folder relative to ``path`` (per-case folders: ``case001/label.nii.gz``).
    """
    if not path.exists():
        raise CipaInputError(f"{role} path {path} does not exist; expected a NIfTI file or a folder of them")
    if path.is_file():
        if not is_nifti_path(path):
            raise CipaInputError(f"{role} file {path} is not NIfTI; expected a .nii or .nii.gz file")
        return {strip_nifti_suffix(path.name): path}
    found: dict[str, Path] = {}
    for file in sorted(path.rglob("*")):
        if not file.is_file() or file.name.startswith("."):
            continue
        if name is not None:
            if file.name != name:
                continue
            rel = file.parent.relative_to(path).as_posix()
            case = strip_nifti_suffix(name) if rel == "." else rel
        elif is_nifti_path(file):
            case = strip_nifti_suffix(file.relative_to(path).as_posix())
        else:
            continue
        found[case] = file
    if not found:
        what = f"files named {name!r}" if name else "NIfTI files (.nii, .nii.gz)"
        raise CipaInputError(f"{role} folder {path} holds no {what}")
    return found


def _load_mask(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types for unreadable files
        raise CipaInputError(f"cannot read NIfTI {path}: {err}") from err
    data = np.asanyarray(img.dataobj)
    # Trailing singleton axes (a (I, J, K, 1) mask) carry no information; anything else is not a binary 3-D mask.
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CipaInputError(f"mask {path} has shape {data.shape}; expected a 3-D (I, J, K) mask")
    return data >= DEFAULT_THRESHOLD, np.asarray(img.affine, dtype=np.float64)


def _json_safe(value: Any) -> Any:
    """NaN/inf become ``null`` so the summary stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    return value


def _nanmean(values: list[float]) -> tuple[float, int]:
    finite = [v for v in values if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else math.nan), len(finite)


def evaluate_folder(
    pred: str | os.PathLike[str],
    gt: str | os.PathLike[str],
    out_dir: str | os.PathLike[str] = "eval",
    pred_name: str | None = None,
    gt_name: str | None = None,
    connectivity: int = AUTOPET_CONNECTIVITY,
    affine_atol_mm: float = 1e-3,
) -> dict[str, Any]:
    """Evaluate predicted masks against ground truth and write ``metrics.csv`` and ``summary.json``.

    Args:
        pred: a prediction NIfTI, or a folder of them.
        gt: the ground-truth NIfTI, or a folder of them.
        out_dir: where ``metrics.csv`` (one row per case) and ``summary.json`` go (written atomically).
        pred_name, gt_name: for folders of per-case sub-folders, the file name to look for on each side (e.g.
            ``"mask.nii.gz"`` and ``"label.nii.gz"``); the case id is then the sub-folder. When ``None`` every
            NIfTI file is a case named by its path without the suffix (``case001.nii.gz`` -> ``case001``).
        connectivity: connected-component neighbourhood for the FP/FN volumes (autoPET: 18).
        affine_atol_mm: largest allowed difference between the prediction's and ground truth's affine entries.

    Returns:
        The summary dict written to ``summary.json``: ``paper_2d`` (pooled IoU/Dice/Acc over all voxels and HD95 in
        pixels averaged over all axial slices, plus the same HD95 over ground-truth tumour slices only, which is
        PCLT20K's condition), ``per_case_mean`` (Dice, HD95 mm over cases where it is defined, FP/FN volumes in ml)
        and ``cases`` (count). Undefined values are ``null``.

    Raises:
        CipaInputError: missing paths, unpaired cases, unreadable files, or a prediction whose shape or affine
            differs from its ground truth.
    """
    pred_path, gt_path = Path(pred), Path(gt)
    if pred_path.is_file() and gt_path.is_file():
        preds = {strip_nifti_suffix(gt_path.name): pred_path}
        gts = {strip_nifti_suffix(gt_path.name): gt_path}
    else:
        if pred_path.is_file() != gt_path.is_file() and pred_path.exists() and gt_path.exists():
            raise CipaInputError(
                f"prediction {pred_path} and ground truth {gt_path} must both be files or both be folders"
            )
        preds, gts = _collect(pred_path, pred_name, "prediction"), _collect(gt_path, gt_name, "ground-truth")
    only_pred, only_gt = sorted(set(preds) - set(gts)), sorted(set(gts) - set(preds))
    if only_pred or only_gt:
        raise CipaInputError(
            f"unpaired cases between prediction {pred_path} and ground truth {gt_path}: "
            f"prediction only {only_pred[:5]}{'...' if len(only_pred) > 5 else ''}, "
            f"ground truth only {only_gt[:5]}{'...' if len(only_gt) > 5 else ''}; "
            "expected the same case ids on both sides"
        )

    rows: list[CaseMetrics] = []
    pooled = ConfusionCounts()
    slice_hd: list[np.ndarray] = []
    tumour_flags: list[np.ndarray] = []
    from tqdm import tqdm

    for case in tqdm(sorted(gts), desc="evaluate", unit="case", disable=len(gts) < 2):
        p, p_aff = _load_mask(preds[case])
        g, g_aff = _load_mask(gts[case])
        if p.shape != g.shape:
            raise CipaInputError(
                f"case {case}: prediction {preds[case]} has shape {p.shape}, ground truth {gts[case]} has {g.shape}; "
                "expected the same grid"
            )
        if not np.allclose(p_aff, g_aff, rtol=0.0, atol=affine_atol_mm):
            raise CipaInputError(
                f"case {case}: prediction {preds[case]} affine {p_aff[:3].round(4).tolist()} differs from ground "
                f"truth {gts[case]} affine {g_aff[:3].round(4).tolist()}; expected the same grid"
            )
        metrics, hd_values, tumour = case_metrics(p, g, g_aff, case=case, connectivity=connectivity)
        rows.append(metrics)
        pooled = pooled + ConfusionCounts(metrics.tp, metrics.fp, metrics.fn, metrics.tn)
        slice_hd.append(hd_values)
        tumour_flags.append(tumour)

    all_hd = np.concatenate(slice_hd)
    tumour_hd = all_hd[np.concatenate(tumour_flags)]
    hd95_mean, hd95_n = _nanmean([r.hd95_mm for r in rows])
    summary: dict[str, Any] = {
        "cases": len(rows),
        "paper_2d": {
            **pooled.paper_scores(),
            "hd95_px": float(all_hd.mean()) if all_hd.size else math.nan,
            "hd95_px_tumour_slices": float(tumour_hd.mean()) if tumour_hd.size else math.nan,
            **asdict(pooled),
            "n_slices": int(all_hd.size),
            "n_tumour_slices": int(tumour_hd.size),
        },
        "per_case_mean": {
            "dice": float(np.mean([r.dice for r in rows])),
            "hd95_mm": hd95_mean,
            "hd95_mm_cases": hd95_n,
            "fp_volume_ml": float(np.mean([r.fp_volume_ml for r in rows])),
            "fn_volume_ml": float(np.mean([r.fn_volume_ml for r in rows])),
        },
        "settings": {"threshold": DEFAULT_THRESHOLD, "connectivity": connectivity, "axial_axis": "voxel axis nearest superior-inferior"},
    }
    summary = _json_safe(summary)
    _write_outputs(Path(out_dir), rows, summary)
    return summary


def _write_outputs(out_dir: Path, rows: list[CaseMetrics], summary: dict[str, Any]) -> None:
    """Write ``metrics.csv`` and ``summary.json`` together: both appear, or neither does."""
    from cipa_bundle.io.atomic import atomic_outputs
    from cipa_bundle.io.nifti import json_text

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CaseMetrics.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # An empty cell, not "nan", marks an undefined value so spreadsheet tools read the column as numbers.
        writer.writerow({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(row).items()})
    with atomic_outputs([out_dir / "metrics.csv", out_dir / "summary.json"]) as (csv_tmp, json_tmp):
        csv_tmp.write_text(buffer.getvalue(), encoding="utf-8")
        json_tmp.write_text(json_text(summary), encoding="utf-8")
