"""Paper and autoPET metrics against hand-built masks whose answers are worked out by hand in each test."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cipa_bundle.cli import main
from cipa_bundle.errors import CipaInputError
from cipa_bundle.metrics import (
    ConfusionCounts,
    PaperConfusionMetric,
    case_hd95_mm,
    case_metrics,
    confusion_counts,
    evaluate_folder,
    false_negative_volume_ml,
    false_positive_volume_ml,
    hd95,
    hd95_slice,
    mean_slice_hd95,
)


# ------------------------------------------------------------------------------------------- reference HD95
def brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing: tuple[float, ...]) -> float:
    """Independent HD95: surfaces by explicit face-neighbour checks, then every pair of surface voxels."""

    def surface(m: np.ndarray) -> np.ndarray:
        pts = []
        for idx in zip(*np.nonzero(m), strict=True):
            for axis, step in itertools.product(range(m.ndim), (-1, 1)):
                n = list(idx)
                n[axis] += step
                if not 0 <= n[axis] < m.shape[axis] or not m[tuple(n)]:
                    pts.append(idx)  # a background face-neighbour (or the array edge) makes it a surface voxel
                    break
        return np.array(pts, dtype=np.float64) * np.asarray(spacing)

    sa, sb = surface(a), surface(b)
    d = np.sqrt(((sa[:, None, :] - sb[None, :, :]) ** 2).sum(-1))
    return float(np.percentile(np.concatenate([d.min(1), d.min(0)]), 95))


# ------------------------------------------------------------------------------------------- confusion
def test_confusion_counts_and_paper_scores_by_hand():
    gt = np.zeros((4, 5), bool)
    gt[0, 0:4] = True  # 4 tumour pixels
    pred = np.zeros((4, 5), bool)
    pred[0, 1:4] = True  # 3 of them found
    pred[2, 2] = pred[3, 4] = True  # 2 false alarms
    c = confusion_counts(pred, gt)
    assert (c.tp, c.fp, c.fn, c.tn) == (3, 2, 1, 14)
    assert c.iou == pytest.approx(3 / 6)
    assert c.dice == pytest.approx(6 / 9)
    # balanced accuracy: sensitivity 3/4, specificity 14/16
    assert c.balanced_accuracy == pytest.approx((0.75 + 14 / 16) / 2)
    assert c.paper_scores() == pytest.approx({"iou": 0.5, "dice": 2 / 3, "acc": 0.8125})


def test_probabilities_threshold_at_half():
    gt = np.array([[1, 1, 0, 0]])
    prob = np.array([[0.5, 0.49, 0.51, 0.0]])
    c = confusion_counts(prob, gt)
    assert (c.tp, c.fp, c.fn, c.tn) == (1, 1, 1, 1)


def test_dataset_level_counts_are_pooled_not_averaged():
    # image 1: tp=1 fp=0 fn=0 (IoU 1); image 2: tp=1 fp=3 fn=0 (IoU 0.25). Mean of IoUs = 0.625, pooled = 2/5.
    g1 = np.array([[1, 0, 0, 0]])
    p1 = g1.copy()
    g2 = np.array([[1, 0, 0, 0]])
    p2 = np.array([[1, 1, 1, 1]])
    pooled = confusion_counts(p1, g1) + confusion_counts(p2, g2)
    assert pooled == ConfusionCounts(2, 3, 0, 3)
    assert pooled.iou == pytest.approx(0.4)
    assert pooled.dice == pytest.approx(4 / 7)


def test_zero_denominators_score_one():
    empty = np.zeros((3, 3))
    c = confusion_counts(empty, empty)
    assert c.paper_scores() == {"iou": 1.0, "dice": 1.0, "acc": 1.0}
    # all-foreground image with a perfect prediction: specificity is 0/0 -> 1
    full = np.ones((2, 2))
    assert confusion_counts(full, full).balanced_accuracy == 1.0


# ------------------------------------------------------------------------------------------- HD95
def test_two_squares_at_known_offset():
    # Two 3x3 squares, columns 0-2 and 10-12. Surfaces: the 8 ring pixels each (centre eroded).
    # A -> B: column 0: 3 px at 10, column 1: 2 px at 9, column 2: 3 px at 8 (and symmetric for B -> A).
    # Pooled 16 values: six 8s, four 9s, six 10s; 95th percentile at position 14.25 -> 10.
    a = np.zeros((5, 15), bool)
    b = np.zeros((5, 15), bool)
    a[1:4, 0:3] = True
    b[1:4, 10:13] = True
    assert hd95(a, b) == pytest.approx(10.0)
    assert hd95(b, a) == pytest.approx(10.0)


def test_pooled_percentile_not_max_of_directed():
    # A = one pixel at column 0; B = pixels at columns 3 and 10. Distances pooled: [3 (A->B), 3, 10 (B->A)].
    # 95th percentile at position 1.9: 3 + 0.9 * 7 = 9.3. (MONAI's max of directed 95th percentiles gives 9.65.)
    a = np.zeros((1, 12), bool)
    b = np.zeros((1, 12), bool)
    a[0, 0] = True
    b[0, [3, 10]] = True
    assert hd95(a, b) == pytest.approx(9.3)


def test_spacing_scales_distance():
    # Two one-pixel-wide lines 4 rows apart: every distance is 4 rows; with 2 mm rows, 8 mm.
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    a[2, :] = True
    b[6, :] = True
    assert hd95(a, b) == pytest.approx(4.0)
    assert hd95(a, b, spacing=(2.0, 0.5)) == pytest.approx(8.0)


def test_mask_touching_the_array_edge_has_a_surface_there():
    # pred fills the 5x5 image: its surface is the 16 border pixels (outside counts as background).
    # gt is the centre pixel. Distances: ring -> centre 4 x 2, 8 x sqrt(5), 4 x sqrt(8); centre -> ring 2.
    # 17 pooled values; 95th percentile at position 15.2 falls between two sqrt(8) -> 2 sqrt(2).
    pred = np.ones((5, 5), bool)
    gt = np.zeros((5, 5), bool)
    gt[2, 2] = True
    assert hd95(pred, gt) == pytest.approx(2 * math.sqrt(2))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hd95_matches_brute_force_2d(seed):
    rng = np.random.default_rng(seed)
    a = rng.random((17, 23)) > 0.7
    b = rng.random((17, 23)) > 0.8
    a[8:12, 5:9] = True  # a solid block, so erosion has interior pixels to remove
    assert hd95(a, b) == pytest.approx(brute_force_hd95(a, b, (1.0, 1.0)))


@pytest.mark.parametrize("seed", [3, 4])
def test_hd95_matches_brute_force_3d_anisotropic(seed):
    rng = np.random.default_rng(seed)
    a = np.zeros((9, 11, 7), bool)
    b = np.zeros((9, 11, 7), bool)
    a[2:6, 3:8, 1:5] = True
    b[3:8, 2:7, 2:6] = True
    a |= rng.random(a.shape) > 0.97
    spacing = (0.8, 1.3, 3.0)
    assert hd95(a, b, spacing) == pytest.approx(brute_force_hd95(a, b, spacing))


def test_hd95_refuses_empty_masks():
    with pytest.raises(ValueError):
        hd95(np.zeros((4, 4)), np.ones((4, 4)))


def test_paper_empty_mask_rules():
    empty = np.zeros((8, 8), bool)
    one = empty.copy()
    one[1, 1] = True
    assert hd95_slice(empty, empty) == 0.0
    # prediction empty -> a pixel at the centre (4, 4): distance from (1, 1) is sqrt(9 + 9)
    assert hd95_slice(empty, one) == pytest.approx(math.sqrt(18))
    # ground truth empty -> the centre pixel goes into the ground truth instead
    assert hd95_slice(one, empty) == pytest.approx(math.sqrt(18))
    # odd, non-square image: the centre is (H // 2, W // 2) = (3, 4); from (0, 0) that is 5
    odd = np.zeros((7, 9), bool)
    corner = odd.copy()
    corner[0, 0] = True
    assert hd95_slice(odd, corner) == pytest.approx(5.0)


def test_mean_slice_hd95_all_and_tumour_slices():
    pred = np.zeros((5, 15, 3), bool)
    gt = np.zeros((5, 15, 3), bool)
    # slice 0: both empty -> 0; slice 1: the two-squares case -> 10; slice 2: gt only at (2, 7) = centre -> 0.
    pred[1:4, 0:3, 1] = True
    gt[1:4, 10:13, 1] = True
    gt[2, 7, 2] = True
    assert mean_slice_hd95(pred, gt) == pytest.approx(10 / 3)
    assert mean_slice_hd95(pred, gt, tumour_slices_only=True) == pytest.approx(5.0)


# ------------------------------------------------------------------------------------------- 3-D case metrics
def test_case_hd95_mm_with_spacing_and_empty_rules():
    a = np.zeros((5, 5, 6), bool)
    b = np.zeros((5, 5, 6), bool)
    a[2, 2, 1] = True
    b[2, 2, 3] = True  # two slices apart at 3 mm
    assert case_hd95_mm(a, b, (1.0, 1.0, 3.0)) == pytest.approx(6.0)
    assert case_hd95_mm(np.zeros_like(a), np.zeros_like(a), (1, 1, 1)) == 0.0
    assert math.isnan(case_hd95_mm(a, np.zeros_like(a), (1, 1, 1)))


def test_false_positive_and_negative_volumes():
    voxel_ml = 2 * 2 * 3 / 1000  # 2 x 2 x 3 mm voxels
    gt = np.zeros((12, 12, 12), bool)
    pred = np.zeros_like(gt)
    gt[1:3, 1:3, 1:3] = True  # lesion 1: 8 voxels, found
    pred[2:4, 2:4, 2:4] = True  # overlaps lesion 1 -> not a false positive
    pred[8:9, 8:11, 1:2] = True  # 3 voxels touching nothing -> false positive
    gt[6:7, 1:6, 9:10] = True  # lesion 2: 5 voxels, missed -> false negative
    assert false_positive_volume_ml(pred, gt, voxel_ml) == pytest.approx(3 * voxel_ml)
    assert false_negative_volume_ml(pred, gt, voxel_ml) == pytest.approx(5 * voxel_ml)


@pytest.mark.parametrize(
    ("step", "fp_voxels"),
    [
        # pred voxel at (0,0,0) overlaps gt; a second pred voxel one step away. It is a false positive unless the
        # step joins it to the first component under the chosen connectivity.
        ((1, 0, 0), {6: 0, 18: 0, 26: 0}),  # face
        ((1, 1, 0), {6: 1, 18: 0, 26: 0}),  # edge
        ((1, 1, 1), {6: 1, 18: 1, 26: 0}),  # corner
    ],
)
def test_connectivity_of_components(step, fp_voxels):
    gt = np.zeros((3, 3, 3), bool)
    pred = np.zeros_like(gt)
    gt[0, 0, 0] = pred[0, 0, 0] = True
    pred[step] = True
    for conn, expected in fp_voxels.items():
        assert false_positive_volume_ml(pred, gt, 1.0, connectivity=conn) == expected
    # the autoPET reference script uses 18-connectivity
    assert false_positive_volume_ml(pred, gt, 1.0) == fp_voxels[18]


def test_case_metrics_by_hand():
    affine = np.diag([-2.0, -2.0, 3.0, 1.0])  # LPS-like voxel order, 12 mm^3 voxels, axial = third axis
    gt = np.zeros((6, 6, 5), bool)
    pred = np.zeros_like(gt)
    gt[1:3, 1:3, 1] = True  # 4 voxels on slice 1
    pred[1:3, 1:2, 1] = True  # 2 of them
    pred[5, 5, 4] = True  # 1 stray voxel on slice 4
    m, slice_hd, tumour = case_metrics(pred, gt, affine, case="c1")
    assert (m.tp, m.fp, m.fn, m.tn) == (2, 1, 2, 180 - 5)
    assert m.dice == pytest.approx(4 / 7)
    assert m.fp_volume_ml == pytest.approx(0.012)
    assert m.fn_volume_ml == 0.0  # the lesion is touched
    assert m.gt_volume_ml == pytest.approx(0.048)
    assert m.pred_volume_ml == pytest.approx(0.036)
    assert (m.n_slices, m.n_tumour_slices) == (5, 1)
    assert tumour.tolist() == [False, True, False, False, False]
    # slice 4: gt empty -> centre (3, 3) added to gt; distance from (5, 5) is sqrt(8)
    assert slice_hd[4] == pytest.approx(math.sqrt(8))
    assert slice_hd[1] == pytest.approx(brute_force_hd95(pred[:, :, 1], gt[:, :, 1], (1, 1)))
    assert m.hd95_mm == pytest.approx(brute_force_hd95(pred, gt, (2.0, 2.0, 3.0)))


# ------------------------------------------------------------------------------------------- MONAI metric
def _batch(*masks: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.stack(masks)[:, None].astype(np.float32))


def test_paper_confusion_metric_pools_batches():
    g1 = np.array([[1, 0], [0, 0]])
    p1 = np.array([[1, 0], [0, 0]])
    g2 = np.array([[1, 0], [0, 0]])
    p2 = np.array([[0.9, 0.6], [0.7, 0.2]])  # probabilities: 3 foreground, 1 true positive
    metric = PaperConfusionMetric("iou")
    metric(_batch(p1), _batch(g1))
    metric([torch.as_tensor(p2[None], dtype=torch.float32)], [torch.as_tensor(g2[None], dtype=torch.float32)])
    assert metric.counts() == ConfusionCounts(2, 2, 0, 4)
    assert metric.aggregate().item() == pytest.approx(0.5)
    metric.metric = "dice"
    assert metric.aggregate().item() == pytest.approx(4 / 6)
    metric.metric = "acc"
    assert metric.aggregate().item() == pytest.approx((1.0 + 4 / 6) / 2)
    metric.reset()
    assert metric.counts() == ConfusionCounts()


def test_paper_confusion_metric_rejects_bad_shapes():
    with pytest.raises(ValueError):
        PaperConfusionMetric("miou")
    with pytest.raises(ValueError):
        PaperConfusionMetric()(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 4))


def test_paper_confusion_metric_as_ignite_key_metric():
    from ignite.engine import Engine
    from monai.handlers import IgniteMetricHandler

    gt = np.zeros((2, 4, 4))
    gt[:, 0, :] = 1  # 4 tumour pixels per image
    pred = np.zeros((2, 4, 4))
    pred[0, 0, :2] = 1  # image 1: 2 found
    pred[1, 0, :] = 1
    pred[1, 3, 3] = 1  # image 2: 4 found, 1 false alarm
    batches = [(_batch(pred[0]), _batch(gt[0])), (_batch(pred[1]), _batch(gt[1]))]
    engine = Engine(lambda e, batch: batch)
    IgniteMetricHandler(metric_fn=PaperConfusionMetric("iou")).attach(engine, "val_iou")
    engine.run(batches, max_epochs=1)
    # pooled: TP 6, FP 1, FN 2 -> IoU 6 / 9
    assert engine.state.metrics["val_iou"] == pytest.approx(6 / 9)


# ------------------------------------------------------------------------------------------- evaluate
def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))
    return path


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    a = np.zeros((6, 6, 4), np.uint8)
    gt_a = a.copy()
    gt_a[1:3, 1:3, 1] = 1  # 4 voxels
    pred_a = a.copy()
    pred_a[1:3, 1:3, 1] = 1  # perfect
    gt_b = a.copy()
    gt_b[2:4, 2:4, 2] = 1  # 4 voxels, missed entirely
    pred_b = a.copy()
    pred_b[0, 0, 0] = 1  # 1 false-positive voxel
    return {"case_a": (pred_a, gt_a), "case_b": (pred_b, gt_b)}


AFFINE = np.diag([-2.0, -2.0, 2.5, 1.0])  # 10 mm^3 voxels


def test_evaluate_folder_flat_layout(tmp_path):
    for name, (p, g) in _cases().items():
        _save(tmp_path / "pred" / f"{name}.nii.gz", p, AFFINE)
        _save(tmp_path / "gt" / f"{name}.nii.gz", g, AFFINE)
    summary = evaluate_folder(tmp_path / "pred", tmp_path / "gt", tmp_path / "eval")

    # pooled over both cases: TP 4, FP 1, FN 4, TN 2 * 144 - 9
    paper = summary["paper_2d"]
    assert (paper["tp"], paper["fp"], paper["fn"], paper["tn"]) == (4, 1, 4, 279)
    assert paper["iou"] == pytest.approx(4 / 9)
    assert paper["dice"] == pytest.approx(8 / 13)
    assert paper["acc"] == pytest.approx((0.5 + 279 / 280) / 2)
    # axial slices: case_a all 0; case_b slice 0: gt empty -> centre (3, 3) in gt, distance sqrt(18) from (0, 0);
    # slice 2: pred empty -> centre (3, 3) in pred; gt block 2..3 x 2..3 all surface -> distances 0, 1, 1, sqrt2
    # and 0 back -> pooled [0, 0, 1, 1, 1.414]: 95th percentile at position 3.8 -> 1 + 0.8 * 0.414
    slice2 = 1 + 0.8 * (math.sqrt(2) - 1)
    assert paper["n_slices"] == 8 and paper["n_tumour_slices"] == 2
    assert paper["hd95_px"] == pytest.approx((math.sqrt(18) + slice2) / 8)
    assert paper["hd95_px_tumour_slices"] == pytest.approx((0 + slice2) / 2)

    per_case = summary["per_case_mean"]
    assert per_case["dice"] == pytest.approx((1.0 + 0.0) / 2)
    pred_b, gt_b = _cases()["case_b"]
    assert per_case["hd95_mm"] == pytest.approx(brute_force_hd95(pred_b, gt_b, (2.0, 2.0, 2.5)) / 2)
    assert per_case["hd95_mm_cases"] == 2
    assert per_case["fp_volume_ml"] == pytest.approx((0 + 0.01) / 2)
    assert per_case["fn_volume_ml"] == pytest.approx((0 + 0.04) / 2)

    assert json.loads((tmp_path / "eval" / "summary.json").read_text()) == summary
    rows = list(csv.DictReader((tmp_path / "eval" / "metrics.csv").open()))
    assert [r["case"] for r in rows] == ["case_a", "case_b"]
    assert float(rows[1]["fn_volume_ml"]) == pytest.approx(0.04)
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == ["metrics.csv", "summary.json"]


def test_evaluate_single_files_and_case_folders(tmp_path):
    p, g = _cases()["case_a"]
    g2 = g.copy()
    g2[4, 4, 3] = 1  # a second lesion the prediction misses, so one empty side per-case HD95 stays defined
    single = evaluate_folder(
        _save(tmp_path / "m.nii.gz", p, AFFINE), _save(tmp_path / "l.nii.gz", g2, AFFINE), tmp_path / "e1"
    )
    assert single["cases"] == 1
    assert single["per_case_mean"]["fn_volume_ml"] == pytest.approx(0.01)

    for name, (pp, gg) in _cases().items():
        _save(tmp_path / "preds" / name / "mask.nii.gz", pp, AFFINE)
        _save(tmp_path / "data" / name / "label.nii.gz", gg, AFFINE)
        _save(tmp_path / "data" / name / "image.nii.gz", gg, AFFINE)  # other files in a case folder are ignored
    summary = evaluate_folder(
        tmp_path / "preds", tmp_path / "data", tmp_path / "e2", pred_name="mask.nii.gz", gt_name="label.nii.gz"
    )
    assert summary["cases"] == 2
    assert summary["paper_2d"]["iou"] == pytest.approx(4 / 9)


def test_evaluate_undefined_hd95_is_null(tmp_path):
    p, g = _cases()["case_b"]
    summary = evaluate_folder(
        _save(tmp_path / "p.nii.gz", p * 0, AFFINE), _save(tmp_path / "g.nii.gz", g, AFFINE), tmp_path / "e"
    )
    assert summary["per_case_mean"]["hd95_mm"] is None and summary["per_case_mean"]["hd95_mm_cases"] == 0
    row = next(csv.DictReader((tmp_path / "e" / "metrics.csv").open()))
    assert row["hd95_mm"] == ""


def test_evaluate_errors(tmp_path):
    p, g = _cases()["case_a"]
    _save(tmp_path / "pred" / "case_a.nii.gz", p, AFFINE)
    _save(tmp_path / "gt" / "case_a.nii.gz", g, AFFINE)
    _save(tmp_path / "gt" / "case_z.nii.gz", g, AFFINE)
    with pytest.raises(CipaInputError, match="case_z"):
        evaluate_folder(tmp_path / "pred", tmp_path / "gt", tmp_path / "e")

    shifted = AFFINE.copy()
    shifted[0, 3] = 5.0
    with pytest.raises(CipaInputError, match="affine"):
        evaluate_folder(
            _save(tmp_path / "a.nii.gz", p, shifted), _save(tmp_path / "b.nii.gz", g, AFFINE), tmp_path / "e"
        )
    with pytest.raises(CipaInputError, match="shape"):
        evaluate_folder(_save(tmp_path / "c.nii.gz", p[:, :, :3], AFFINE), tmp_path / "b.nii.gz", tmp_path / "e")
    with pytest.raises(CipaInputError, match="does not exist"):
        evaluate_folder(tmp_path / "nope", tmp_path / "gt", tmp_path / "e")
    assert not (tmp_path / "e").exists()  # nothing written when evaluation fails


def test_cli_evaluate_and_bad_input_exit_code(tmp_path, capsys):
    p, g = _cases()["case_a"]
    pred, gt = _save(tmp_path / "p.nii.gz", p, AFFINE), _save(tmp_path / "g.nii.gz", g, AFFINE)
    main(["evaluate", str(pred), str(gt), "--out_dir", str(tmp_path / "eval")])
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["paper_2d"]["iou"] == 1.0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", str(pred), str(tmp_path / "missing"), "--out_dir", str(tmp_path / "eval2")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cipa-bundle: error:") and "missing" in err and "\n" not in err
