"""Real PET-CT studies through ``convert`` and ``predict``: the 8 Soft-tissue-Sarcoma patients of ``../shared/real`` (TCIA, via the
IBSI validation set, CC BY 3.0; credited in docs/README.md), checked against the reference files MIRP wrote.

The PET there is already SUVbw (Units GML), so reading it is the whole SUV path for these files; a GE Discovery ST
CT with 3.27 mm slices. Tests skip with a reason when the data folder is absent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from cipa_bundle.inference.predict import predict
from cipa_bundle.io.dicom import read_series
from cipa_bundle.io.rtstruct import read_rtstruct_mask
from cipa_bundle.io.seg import read_dicom_seg_mask
from cipa_bundle.networks import CIPA
from cipa_bundle.preprocessing.convert import convert_study

PATIENTS = [f"STS_{n:03d}" for n in range(2, 10)]


@pytest.mark.parametrize("patient", PATIENTS)
def test_real_study_converts_to_the_reference_suv_and_ct_grid(patient: str, shared_real: Path, tmp_path: Path) -> None:
    study = shared_real / "sts" / patient
    if not study.is_dir():
        pytest.skip(f"{study} is absent")
    paths = convert_study(study, tmp_path / "out", progress=False, label_rtstruct=study / "CT" / "mask" / "RS.dcm")

    # The PET read as SUV equals MIRP's SUV image voxel for voxel (float32 rounding of the stored values x slope).
    suv, reference = nib.load(paths["suv"]), nib.load(study / "nifti" / "PET_image.nii.gz")
    assert suv.shape == reference.shape
    np.testing.assert_allclose(suv.affine, reference.affine, atol=1e-3, rtol=0)
    ours, theirs = np.asarray(suv.dataobj, dtype=np.float64), np.asarray(reference.dataobj, dtype=np.float64)
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-5 * float(np.abs(theirs).max()))

    # The CT lands on the grid of the expert contour's voxel mask (MIRP rasterised it on the CT grid).
    ct, mask = nib.load(paths["ct"]), nib.load(study / "nifti" / "CT_mask.nii.gz")
    assert ct.shape == mask.shape[:3]
    np.testing.assert_allclose(ct.affine, mask.affine, atol=1e-3, rtol=0)
    provenance = json.loads(Path(paths["provenance"]).read_text())
    assert provenance["pet"]["slice_position_max_deviation_mm"] < 0.01  # MIRP re-wrote exact positions

    # The expert's GTV contours, rasterised from the RTSTRUCT, reproduce MIRP's voxel mask of them.
    label = nib.load(paths["label"])
    np.testing.assert_allclose(label.affine, mask.affine, atol=1e-3, rtol=0)
    ours_mask = np.asarray(label.dataobj) > 0
    theirs_mask = np.asarray(mask.dataobj).reshape(ours_mask.shape) > 0
    dice = 2 * np.sum(ours_mask & theirs_mask) / (np.sum(ours_mask) + np.sum(theirs_mask))
    assert dice >= 0.98, f"{patient}: Dice {dice:.4f} against nifti/CT_mask.nii.gz"
    assert provenance["label"]["roi"] == "GTV_Mass_CT"


def test_predict_runs_end_to_end_on_a_real_study(shared_real: Path, tmp_path: Path) -> None:
    """A small random-weight CIPA through ``cipa-bundle predict``: the outputs sit on the real CT and reference it."""
    study = shared_real / "sts" / PATIENTS[0]
    if not study.is_dir():
        pytest.skip(f"{study} is absent")
    torch.manual_seed(0)
    weights = tmp_path / "tiny.pt"
    torch.save(CIPA(img_size=128, dims=30, depths=[1, 1, 1, 1], decoder_depths=[1, 1, 1, 1]).state_dict(), weights)
    out = tmp_path / "pred"
    # Random weights mark tissue as readily as air; post-processing off keeps a non-empty mask to check the
    # SEG and the RTSTRUCT against. The crop (5 cm around a limb tumour) holds no lung: every body slice runs.
    # The study folder also holds the RTSTRUCTs, which are not image series; only CT and PET are chosen.
    written = predict(study, out, weights, rtstruct=True, progress=False,
                      overrides={"min_body_fraction": 0.0, "min_lesion_ml": 0.0})

    ct = read_series(study / "CT" / "image", modality="CT")
    mask_img = nib.load(written["mask"])
    mask = np.asarray(mask_img.dataobj)
    assert mask.shape == ct.volume.shape and 0 < mask.sum() < mask.size
    np.testing.assert_allclose(mask_img.affine, ct.volume.affine, atol=1e-4)
    ct_instances = {str(ds.SOPInstanceUID) for ds in ct.datasets}

    seg = pydicom.dcmread(written["seg"])
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    assert seg.FrameOfReferenceUID == ct.frame_of_reference_uid
    assert np.array_equal(read_dicom_seg_mask(written["seg"], ct.datasets), mask)

    rtstruct = pydicom.dcmread(written["rtstruct"])
    assert rtstruct.StructureSetROISequence[0].ReferencedFrameOfReferenceUID == ct.frame_of_reference_uid
    referenced = {
        image.ReferencedSOPInstanceUID
        for contour in rtstruct.ROIContourSequence[0].ContourSequence
        for image in contour.ContourImageSequence
    }
    assert referenced and referenced <= ct_instances
    back = read_rtstruct_mask(written["rtstruct"], ct) > 0
    assert 2 * np.sum(back & (mask > 0)) / (np.sum(back) + np.sum(mask > 0)) >= 0.98


@pytest.fixture(scope="module")
def sts_002_training_slice(shared_real: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """STS_002 converted once for the training-transform tests: its item (the slice with the most tumour) and label."""
    study = shared_real / "sts" / PATIENTS[0]
    if not study.is_dir():
        pytest.skip(f"{study} is absent")
    out = tmp_path_factory.mktemp("sts_002") / "out"
    paths = convert_study(study, out, progress=False, label_rtstruct=study / "CT" / "mask" / "RS.dcm")
    label = np.asarray(nib.load(paths["label"]).dataobj)
    k = int(np.argmax(label.sum(axis=(0, 1))))
    return {"item": {"image": str(paths["image"]), "label": str(paths["label"]), "slice": k},
            "image": np.asarray(nib.load(paths["image"]).dataobj)[:, :, k], "label": label[:, :, k]}


def _train_config(img_size: int) -> Any:
    """``configs/train.json`` parsed at ``img_size``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(Path(__file__).resolve().parents[1] / "configs" / "train.json"))
    parser["img_size"] = img_size
    return parser


def test_training_pads_a_real_slice_smaller_than_img_size_and_crops_nothing(sts_002_training_slice: dict[str, Any]) -> None:
    """STS_002's CT is 161 x 143 px: at ``img_size`` 256 the training transforms pad it and keep every tumour voxel."""
    parser = _train_config(256)
    parser["validate#preprocessing"]["transforms"] = "$@train#deterministic_transforms"  # no random, no normalising
    out = parser.get_parsed_content("validate#preprocessing")(sts_002_training_slice["item"])
    assert tuple(out["image"].shape) == (2, 256, 256) and tuple(out["label"].shape[-2:]) == (256, 256)
    assert float(out["label"].sum()) == float(sts_002_training_slice["label"].sum()) > 0
    # The image's own content is all there, with zeros (air, no uptake) around it.
    assert float(out["image"].sum()) == pytest.approx(float(sts_002_training_slice["image"].sum()), rel=1e-5)


def test_training_crops_a_real_slice_larger_than_img_size_at_random_positions(
    sts_002_training_slice: dict[str, Any],
) -> None:
    """At ``img_size`` 64, STS_002's 161 x 143 px slices are trained as 64 x 64 patches drawn anywhere on the slice.

    The sliding-window inferer shows the network the tumour anywhere in its window, cut by the window's edge, too. The
    earlier centre crop (plus the 10 % translation and the square crop-resize) kept the tumour's centroid within 11 px
    of the patch centre in these 40 draws and cut it in 3, and the networks then depended on where the inference
    tiles fell.
    """
    training = _train_config(64).get_parsed_content("train#preprocessing")
    training.set_random_state(seed=0)
    truth = float(sts_002_training_slice["label"].sum())
    offsets, cut = [], 0
    for _ in range(40):
        out = training(sts_002_training_slice["item"])
        assert tuple(out["image"].shape) == (2, 64, 64) and tuple(out["label"].shape[-2:]) == (64, 64)
        patch = np.asarray(out["label"]).reshape(64, 64) > 0
        if patch.any():
            offsets.append(np.abs(np.argwhere(patch).mean(axis=0) - 31.5).max())
        cut += int(patch.sum() < truth)
    assert len(offsets) >= 10 and max(offsets) > 24, offsets
    assert cut >= 10  # the tumour is often cut by the patch border, as it is by an inference tile
