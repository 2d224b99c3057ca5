"""Folder evaluation: score predicted NIfTI masks against ground truth, case by case, and write the results.

:func:`evaluate_folder` pairs the cases, computes :func:`~cipa_bundle.metrics.case.case_metrics` for each, pools
the paper's 2-D metrics over all of them and writes ``metrics.csv`` (one row per case) and ``summary.json``.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from tqdm import tqdm

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.nifti import is_nifti_path, json_ready, json_text, strip_nifti_suffix
from cipa_bundle.metrics.case import AUTOPET_CONNECTIVITY, CaseMetrics, case_metrics
from cipa_bundle.metrics.confusion import ConfusionCounts
from cipa_bundle.metrics.foreground import DEFAULT_THRESHOLD

__all__ = ["evaluate_folder"]


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
    summary = json_ready(summary)
    _write_outputs(Path(out_dir), rows, summary)
    return summary


def _write_outputs(out_dir: Path, rows: list[CaseMetrics], summary: dict[str, Any]) -> None:
    """Write ``metrics.csv`` and ``summary.json`` together: both appear, or neither does."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(CaseMetrics.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        # An empty cell, not "nan", marks an undefined value so spreadsheet tools read the column as numbers.
        writer.writerow({k: "" if isinstance(v, float) and not math.isfinite(v) else v for k, v in asdict(row).items()})
    with atomic_outputs([out_dir / "metrics.csv", out_dir / "summary.json"]) as (csv_tmp, json_tmp):
        csv_tmp.write_text(buffer.getvalue(), encoding="utf-8")
        json_tmp.write_text(json_text(summary), encoding="utf-8")
