"""Smoke test of ``benchmarks/bench_quality.py``'s pieces on two real STS patients: one fold, one epoch, tiny networks.

The full benchmark (8 patients, 4 folds) runs for about 40 minutes and is recorded in docs/performance.md; here each
piece runs once, small, and its output is checked: the folds keep test patients out of training, both trained
methods go through the bundle's training and inference workflows, the SUV thresholds segment what they should (checked
against a threshold computed here by hand), the evaluation pairs every case, and the figure is a PNG.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from cipa_bundle.inference.threshold import SUVThreshold

REPO = Path(__file__).resolve().parents[1]
SMALL = {"img_size": 128, "network_width": 30, "encoder_depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1, 1],
         "batch_size": 4, "memory_preflight": False}
TINY_UNET = {"unet_filters": [4, 8, 8, 8, 8, 8], "img_size": 64, "batch_size": 4, "memory_preflight": False}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_folds_hold_each_patient_out_once_and_never_train_on_it(bench) -> None:
    patients = [f"P{n}" for n in range(8)]
    folds = bench.patient_folds(patients, 4)
    assert sorted(p for fold in folds for p in fold["test"]) == patients
    for fold in folds:
        assert len(fold["test"]) == 2 and len(fold["validation"]) == 1 and len(fold["training"]) == 5
        assert not set(fold["test"]) & set(fold["training"] + fold["validation"])
        assert not set(fold["validation"]) & set(fold["training"])
    with pytest.raises(ValueError, match="validation patient and a training patient"):
        bench.patient_folds(patients[:2], 1)


def test_suv_threshold_keeps_body_components_at_the_published_cut_offs() -> None:
    suv = np.zeros((1, 12, 12, 4), dtype=np.float32)
    suv[0, 2:5, 2:5, 1:3] = 8.0  # a lesion inside the body
    suv[0, 8:10, 8:10, 1] = 3.0  # uptake of 3 inside the body: above 2.5, below 41 % of 8
    suv[0, 0, 11, 0] = 6.0  # a hot voxel outside the body (the couch, say)
    body = np.zeros((1, 12, 12, 4), dtype=bool)
    body[0, 1:11, 1:11, :] = True
    affine = np.diag([2.0, 2.0, 3.0, 1.0])

    absolute = np.asarray(SUVThreshold(absolute=2.5)(suv, body, affine))
    expected = np.zeros_like(absolute)
    expected[0, 2:5, 2:5, 1:3] = 1
    expected[0, 8:10, 8:10, 1] = 1
    np.testing.assert_array_equal(absolute, expected)

    relative = SUVThreshold(fraction_of_max=0.41)
    mask = np.asarray(relative(suv, body, affine))
    assert relative.last_threshold == pytest.approx(0.41 * 8.0)
    expected[0, 8:10, 8:10, 1] = 0
    np.testing.assert_array_equal(mask, expected)
    with pytest.raises(ValueError, match="exactly one"):
        SUVThreshold(absolute=2.5, fraction_of_max=0.41)


def test_benchmark_pieces_on_two_real_patients(bench, shared_real: Path, tmp_path: Path) -> None:
    data = shared_real / "sts"
    patients = bench.find_patients(data, ["STS_002", "STS_003"])
    converted = bench.convert_patients(data, patients, tmp_path)
    fold = {"test": ["STS_003"], "validation": ["STS_002"], "training": ["STS_002"]}
    datalist = bench.write_datalist(tmp_path / "fold0" / "datalist.json", fold, converted)
    assert json.loads(datalist.read_text())["training"][0]["label"].endswith("STS_002/label.nii.gz")

    predictions = {}
    for method, extra in (("cipa", SMALL), ("unet", TINY_UNET)):
        fold_dir = tmp_path / "fold0" / method
        fold_dir.mkdir(parents=True)
        best, seconds = bench.train_method(method, fold_dir, datalist, 1, extra)
        assert best.is_file() and seconds > 0
        predictions[method] = tmp_path / "predictions" / method
        final = bench.weights(fold_dir, 1, "final")  # the last epoch's: what the benchmark predicts with
        bench.trained_predict(method, final, converted, fold["test"], predictions[method], extra)
    predictions["suv_2.5"] = tmp_path / "predictions" / "suv_2.5"
    bench.threshold_predict("suv_2.5", converted, fold["test"], predictions["suv_2.5"])

    ct = nib.load(converted["STS_003"] / "ct.nii.gz")
    suv = np.asarray(nib.load(converted["STS_003"] / "suv_ct.nii.gz").dataobj)
    for method, root in predictions.items():
        mask = nib.load(root / "STS_003" / "mask.nii.gz")
        assert mask.shape == ct.shape, method
        np.testing.assert_allclose(mask.affine, ct.affine, atol=1e-4)
    # The whole crop is body, so SUV >= 2.5 keeps every voxel at or above 2.5 and nothing else.
    threshold_mask = np.asarray(nib.load(predictions["suv_2.5"] / "STS_003" / "mask.nii.gz").dataobj) > 0
    hot = suv >= 2.5
    assert hot.any() and np.sum(threshold_mask & ~hot) == 0 and np.sum(hot & ~threshold_mask) <= 0.01 * hot.sum()

    from cipa_bundle.metrics import evaluate_folder

    gt = tmp_path / "truth" / "STS_003"
    gt.mkdir(parents=True)
    (gt / "label.nii.gz").symlink_to(converted["STS_003"] / "label.nii.gz")
    summary = evaluate_folder(predictions["suv_2.5"], tmp_path / "truth", tmp_path / "metrics",
                              pred_name="mask.nii.gz", gt_name="label.nii.gz")
    truth = np.asarray(nib.load(converted["STS_003"] / "label.nii.gz").dataobj) > 0
    by_hand = 2 * np.sum(threshold_mask & truth) / (threshold_mask.sum() + truth.sum())
    assert summary["cases"] == 1 and summary["per_case_mean"]["dice"] == pytest.approx(by_hand)

    figure = bench.overlay_figure(converted, "STS_003", predictions, tmp_path / "overlay.png")
    with Image.open(figure) as png:
        assert png.mode == "RGB" and png.width > 3 * png.height / 2  # three panels side by side
    assert bench.parameter_count("unet") > 0
