"""The inference workflow (configs/inference.json) and ``cipa-bundle predict``, end to end on phantom studies.

The network is a tiny random CIPA (img_size 128, width 30, one block per stage) saved to a temporary checkpoint:
its masks mean nothing, so the end-to-end tests check geometry and bookkeeping (grids, affines, SEG references,
report fields, files), while the post-processing and the inferer are checked on hand-built inputs whose answers are
worked out in the comments.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer
from PIL import Image

from cipa_bundle.errors import CipaInputError
from cipa_bundle.inference.inputs import case_name, check_datalist, prepare_input
from cipa_bundle.inference.postprocess import (
    BodyMask,
    BodyMaskd,
    RemoveSmallLesions,
    RemoveSmallLesionsd,
    fill_holes_2d,
)
from cipa_bundle.inference.body_range import BodySliceInferer
from cipa_bundle.inference.predict import MissingWeightsError, predict
from cipa_bundle.networks.weights import checkpoint_architecture

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "inference.json"
TINY = {"img_size": 128, "dims": 30, "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1, 1]}
# Random weights cover air as readily as tissue; with post-processing on, nothing of them would survive, so the
# end-to-end runs switch it off and test it separately below.
NO_POSTPROCESSING = {"min_body_fraction": 0.0, "min_lesion_ml": 0.0}


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.as_tensor() if isinstance(tensor, MetaTensor) else tensor


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def case(tmp_path_factory) -> Path:
    from cipa_bundle.synthetic.phantom import make_phantom_dataset

    return make_phantom_dataset(tmp_path_factory.mktemp("phantom"), 1, seed=3, noise=False, blur=False)[0]


@pytest.fixture(scope="module")
def converted(case: Path, tmp_path_factory) -> dict[str, Path]:
    from cipa_bundle.preprocessing.convert import convert_study

    return convert_study(case / "dicom", tmp_path_factory.mktemp("study") / "case_a", progress=False)


@pytest.fixture(scope="module")
def cropped(converted: dict[str, Path], tmp_path_factory) -> dict[str, Path]:
    """Eight axial slices of the converted study (nibabel's slicer moves the affine's origin with the crop).

    The workflow tests only need a few slices; fewer slices keep the random network's CPU time down.
    """
    folder = tmp_path_factory.mktemp("cropped") / "case_b"
    folder.mkdir()
    out = {}
    for key in ("image", "ct", "suv_ct"):
        img = nib.load(converted[key])
        out[key] = folder / converted[key].name
        nib.save(img.slicer[:, :, 12:20], out[key])
    out["suv"] = converted["suv"]  # native PET grid, uncropped: the pair path resamples it onto the cropped CT
    return out


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from cipa_bundle.networks import CIPA

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "tiny.pt"
    torch.save(CIPA(**TINY).state_dict(), path)
    return path


# --------------------------------------------------------------------------------------------- bundle config
def test_check_properties_of_the_default_config() -> None:
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(config_file=str(CONFIG), workflow_type="infer", logging_file=False)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert isinstance(workflow.inferer, BodySliceInferer)
    assert workflow.inferer.orig_roi_size == (512, 512) and workflow.inferer.spatial_dim == 2
    # The padding value is normalised black: 0 * 3.2 - 1.6.
    assert workflow.inferer.cval == pytest.approx(-1.6)
    config = json.loads(CONFIG.read_text())
    assert config["imports"] == ["$import glob", "$import os", "$import torch"]
    assert "initialize" not in config or not any("cipa_bundle" in str(x) for x in config["initialize"])


def test_inference_view_is_the_training_slice_view(converted: dict[str, Path]) -> None:
    """The network sees slice k exactly as training's ExtractAxialSlice(display=True) shows it."""
    from monai.bundle import ConfigParser

    from cipa_bundle.data.slices import ExtractAxialSlice
    from cipa_bundle.preprocessing.transforms import NormalizeCIPAInput

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    item = parser.get_parsed_content("preprocessing")({"image": str(converted["image"])})
    image = item["image"]
    raw = np.asarray(nib.load(converted["image"]).dataobj)  # (I, J, K, 2), i -> patient left, j -> posterior
    assert tuple(image.shape) == (2, raw.shape[1], raw.shape[0], raw.shape[2])
    assert tuple(item["body"].shape) == (1, *image.shape[1:])
    normalise = NormalizeCIPAInput()
    for k in (0, 11, raw.shape[2] - 1):
        training = normalise(ExtractAxialSlice(display=True)(converted["image"], k))
        assert torch.equal(_plain(image[..., k]), _plain(training))
        # Independently: display rows are j (anterior -> posterior), columns are i (right -> left), so slice.T.
        by_hand = normalise(torch.as_tensor(np.ascontiguousarray(np.moveaxis(raw[:, :, k, :], -1, 0).swapaxes(1, 2))))
        assert torch.equal(_plain(image[..., k]), _plain(by_hand))


def test_monai_bundle_run_on_a_fused_nifti(cropped: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "eval"
    datalist = repr([{"image": str(cropped["image"])}])
    args = ["-m", "monai.bundle", "run", "--config_file", str(CONFIG), "--bundle_root", str(REPO),
            "--datalist", datalist, "--output_dir", str(out), "--checkpoint", str(tiny_checkpoint),
            "--img_size", "128", "--network_width", "30", "--encoder_depths", "[1,1,1,1]",
            "--decoder_depths", "[1,1,1,1]", "--save_probabilities", "True",
            "--min_body_fraction", "0.0", "--min_lesion_ml", "0.0"]
    result = _run(args, cwd=tmp_path)  # another working directory: the bundle must not rely on the cwd
    assert result.returncode == 0, result.stderr[-3000:]
    case_dir = out / "case_b"
    mask_img, prob_img = nib.load(case_dir / "mask.nii.gz"), nib.load(case_dir / "probabilities.nii.gz")
    ct = nib.load(cropped["ct"])
    assert mask_img.shape == prob_img.shape == ct.shape
    assert np.array_equal(mask_img.affine, ct.affine) and np.array_equal(prob_img.affine, ct.affine)
    assert mask_img.get_data_dtype() == np.uint8 and prob_img.get_data_dtype() == np.float32
    mask, prob = np.asarray(mask_img.dataobj), np.asarray(prob_img.dataobj)
    assert 0.0 <= prob.min() and prob.max() <= 1.0 and prob.std() > 0
    # With post-processing off the mask is exactly the thresholded probability map, voxel for voxel.
    assert np.array_equal(mask, (prob >= 0.5).astype(np.uint8))
    assert not list(case_dir.glob("*.tmp*"))


def test_postprocessing_inverts_prediction_and_body_to_the_input_grid(tmp_path: Path) -> None:
    """The config's pre- and post-processing around a hand-made prediction, on a non-square grid (I != J).

    A prediction that came back transposed or flipped would not fit the grid, or would keep the wrong lesion.
    """
    from monai.bundle import ConfigParser
    from monai.utils import convert_to_dst_type

    from cipa_bundle.io.nifti import save_nifti
    from cipa_bundle.io.volume import Volume

    shape = (12, 10, 6)  # i -> patient left, j -> posterior, k -> superior, 3 mm voxels (0.027 ml)
    affine = np.array([[-3.0, 0, 0, 15], [0, -3.0, 0, 12], [0, 0, 3.0, -9], [0, 0, 0, 1]])
    ct = np.full(shape, 0.2, dtype=np.float32)  # air
    ct[:8] = 1.0  # the body is i < 8
    save_nifti(Volume(np.stack([ct, np.zeros_like(ct)], axis=-1), affine), tmp_path / "case_c" / "image.nii.gz")

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["output_dir"] = str(tmp_path / "out")
    item = parser.get_parsed_content("preprocessing")({"image": str(tmp_path / "case_c" / "image.nii.gz")})
    logits = np.full(shape, -10.0, dtype=np.float32)
    logits[2:5, 2:5, 1:4] = 10.0  # lesion A, 27 voxels = 0.73 ml, inside the body
    logits[9:12, 2:5, 1:4] = 10.0  # lesion B, same size, outside the body
    # The network works in (P, L, S) = (j, i, k) order for this LPS-stored grid.
    pls = torch.as_tensor(np.ascontiguousarray(logits.transpose(1, 0, 2)))[None]
    item["pred"] = convert_to_dst_type(pls, item["image"])[0]
    parser.get_parsed_content("postprocessing")(item)

    saved = nib.load(tmp_path / "out" / "case_c" / "mask.nii.gz")
    expected = np.zeros(shape, dtype=np.uint8)
    expected[2:5, 2:5, 1:4] = 1
    assert saved.shape == shape and np.array_equal(np.asarray(saved.dataobj), expected)
    np.testing.assert_allclose(saved.affine, affine, atol=1e-6)


def test_missing_datalist_and_weights_fail_clearly(tmp_path: Path) -> None:
    with pytest.raises(CipaInputError, match="dataset_dir '/nowhere' holds no"):
        check_datalist([], "/nowhere")
    with pytest.raises(CipaInputError, match="datalist item 0: image /nowhere/image.nii.gz does not exist"):
        check_datalist([{"image": "/nowhere/image.nii.gz"}])
    with pytest.raises(MissingWeightsError, match="import-official") as err:
        predict(tmp_path / "image.nii.gz", tmp_path / "out", tmp_path / "model.pt")
    assert str(tmp_path / "model.pt") in str(err.value)


def test_inference_workflow_without_weights_ends_with_the_one_line_that_predict_gives(tmp_path: Path) -> None:
    case = tmp_path / "data" / "case_a"
    case.mkdir(parents=True)
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), dtype=np.float32), np.eye(4)), case / "image.nii.gz")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(CONFIG),
               "--bundle_root", str(tmp_path), "--dataset_dir", str(tmp_path / "data")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    with pytest.raises(MissingWeightsError) as expected:
        predict(case / "image.nii.gz", tmp_path / "out", tmp_path / "models" / "model.pt")
    assert result.stderr.strip().splitlines()[-1] == f"cipa-bundle: error: {expected.value}"
    assert "Traceback" not in result.stderr and "import-official" in str(expected.value)
    assert not (tmp_path / "eval").exists()


# --------------------------------------------------------------------------------------------- predict
def test_cli_predict_on_a_dicom_study(case: Path, tiny_checkpoint: Path, tmp_path: Path) -> None:
    from cipa_bundle.io.dicom import read_series
    from cipa_bundle.io.rtstruct import read_rtstruct_mask
    from cipa_bundle.io.seg import read_dicom_seg_mask

    out = tmp_path / "pred"
    result = _run(["-m", "cipa_bundle", "predict", str(case / "dicom"), str(out), "--checkpoint", str(tiny_checkpoint),
                   "--override", repr(NO_POSTPROCESSING), "--rtstruct"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]

    ct = read_series(case / "dicom" / "ct", modality="CT")
    mask_img = nib.load(out / "mask.nii.gz")
    mask = np.asarray(mask_img.dataobj)
    assert mask.shape == ct.volume.shape
    np.testing.assert_allclose(mask_img.affine, ct.volume.affine, atol=1e-4)
    assert 0 < mask.sum() < mask.size  # a mask with something in it, so the SEG comparison below means something

    # DICOM SEG: references exactly the CT's instances and reads back onto the CT grid as the NIfTI mask.
    seg = pydicom.dcmread(out / "seg.dcm")
    referenced = {item.ReferencedSOPInstanceUID for item in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct.series_uid
    assert referenced == {str(ds.SOPInstanceUID) for ds in ct.datasets}
    assert np.array_equal(read_dicom_seg_mask(out / "seg.dcm", ct.datasets), mask)

    # RTSTRUCT: the mask's contours, referencing the CT's frame of reference and instances; rasterised back at voxel
    # centres they give the mask.
    rtstruct = pydicom.dcmread(out / "rtstruct.dcm")
    assert rtstruct.Modality == "RTSTRUCT" and rtstruct.StructureSetROISequence[0].ReferencedFrameOfReferenceUID == (
        ct.frame_of_reference_uid
    )
    contour_images = {
        image.ReferencedSOPInstanceUID
        for contour in rtstruct.ROIContourSequence[0].ContourSequence
        for image in contour.ContourImageSequence
    }
    assert contour_images and contour_images <= {str(ds.SOPInstanceUID) for ds in ct.datasets}
    back = read_rtstruct_mask(out / "rtstruct.dcm", ct)
    assert 2 * np.sum((back > 0) & (mask > 0)) / (np.sum(back > 0) + np.sum(mask > 0)) >= 0.98

    report = json.loads((out / "report.json").read_text())
    for key in ("versions", "device", "timings_s", "suv_provenance", "tumor_count", "total_volume_ml", "lesions",
                "model", "inference", "postprocessing", "input"):
        assert key in report, key
    assert set(report["timings_s"]) >= {"prepare", "inference", "outputs"}
    assert report["device"] == "cpu" and report["input"]["kind"] == "dicom"
    assert report["model"]["img_size"] == 128 and report["model"]["network_width"] == 30  # read from the checkpoint
    # The small phantom is a thorax whose lungs span every slice: the lung range (plus 2 cm) is the whole study.
    assert report["inference"]["selection"] == "lung"
    assert report["inference"]["slices_run"] == report["inference"]["slices"] == ct.volume.shape[2]
    assert isinstance(report["suv_provenance"], dict) and report["suv_provenance"]
    voxel_ml = abs(np.linalg.det(mask_img.affine[:3, :3])) / 1000
    assert report["total_volume_ml"] == pytest.approx(mask.sum() * voxel_ml)
    assert report["tumor_count"] == len(report["lesions"]) >= 1
    assert all(lesion["suv_max"] >= lesion["suv_mean"] >= 0 for lesion in report["lesions"])
    for name in ("overlay_axial.png", "mip_coronal.png"):
        with Image.open(out / name) as png:
            png.verify()
        with Image.open(out / name) as png:
            assert png.mode == "RGB" and min(png.size) > 16
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["mask.nii.gz", "seg.dcm", "rtstruct.dcm", "overlay_axial.png", "mip_coronal.png", "report.json"]
    )  # no temporary work folder left behind


def test_predict_on_a_ct_pet_nifti_pair(cropped: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path) -> None:
    out = tmp_path / "pair"
    written = predict(f"{cropped['ct']},{cropped['suv']}", out, tiny_checkpoint, overrides=NO_POSTPROCESSING,
                      probabilities=True, keep_intermediate=True, progress=False)
    # The pair path rebuilds convert's fused image: same resampling, same window and scale.
    rebuilt = np.asarray(nib.load(out / "intermediate" / "input" / "image.nii.gz").dataobj)
    np.testing.assert_allclose(rebuilt, np.asarray(nib.load(cropped["image"]).dataobj), atol=1e-5)
    ct = nib.load(cropped["ct"])
    mask_img = nib.load(written["mask"])
    assert mask_img.shape == ct.shape and np.array_equal(mask_img.affine, ct.affine)
    assert "seg" not in written and not (out / "seg.dcm").exists()
    # An RTSTRUCT references CT instances, which a NIfTI pair does not have: refused by name, before inference.
    with pytest.raises(CipaInputError, match=r"rtstruct=True needs a DICOM study as input .* nifti_pair input"):
        predict(f"{cropped['ct']},{cropped['suv']}", tmp_path / "refused", tiny_checkpoint, rtstruct=True,
                progress=False)
    assert not (tmp_path / "refused" / "mask.nii.gz").exists()
    probabilities = nib.load(written["probabilities"])
    assert probabilities.get_data_dtype() == np.float32 and np.array_equal(probabilities.affine, ct.affine)
    assert np.array_equal(np.asarray(mask_img.dataobj), (np.asarray(probabilities.dataobj) >= 0.5).astype(np.uint8))
    report = json.loads(written["report"].read_text())
    assert report["input"]["kind"] == "nifti_pair" and report["input"]["suv_available"] is True
    assert "probabilities.nii.gz" in report["outputs"]


def test_prediction_does_not_depend_on_how_the_voxels_are_stored(
    cropped: dict[str, Path], tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """The same image stored in other voxel orders (an in-plane flip, the in-plane axes swapped, the slices reversed)
    describes the same patient, so every physical voxel must get the same probability: a prediction that came back
    flipped or transposed on the way in or out would differ here. The random network's output varies from voxel to
    voxel, so even a one-voxel shift would show."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation, ornt_transform

    source = nib.load(cropped["image"])
    data = np.asarray(source.dataobj)
    shape = data.shape[:3]

    def stored(order: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> nib.Nifti1Image:
        # voxel axis a of the new image is axis order[a] of the source, reversed where flips[a]
        ornt = np.array([[order.index(a), -1 if flips[order.index(a)] else 1] for a in range(3)], dtype=float)
        array = apply_orientation(data, ornt)
        return nib.Nifti1Image(array, source.affine @ inv_ornt_aff(ornt, shape))

    probabilities = {}
    variants = {"as_converted": ((0, 1, 2), (False, False, False)), "flip_i": ((0, 1, 2), (True, False, False)),
                "swap_ij": ((1, 0, 2), (False, False, False)), "slices_reversed": ((0, 1, 2), (False, False, True))}
    for name, (order, flips) in variants.items():
        image = stored(order, flips)
        path = tmp_path / name / "image.nii.gz"
        path.parent.mkdir()
        nib.save(image, path)
        written = predict(path, tmp_path / f"out_{name}", tiny_checkpoint, overrides=NO_POSTPROCESSING,
                          probabilities=True, progress=False)
        result = nib.load(written["probabilities"])
        assert np.allclose(result.affine, image.affine, atol=1e-6)
        # back to the converted image's voxel order, through the affines alone
        back = ornt_transform(io_orientation(result.affine), io_orientation(source.affine))
        probabilities[name] = apply_orientation(np.asarray(result.dataobj), back)
    reference = probabilities.pop("as_converted")
    assert reference.shape == shape and reference.std() > 1e-3  # the network's output does vary across voxels
    for name, values in probabilities.items():
        np.testing.assert_allclose(values, reference, rtol=0, atol=1e-5, err_msg=name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without usable CUDA")
def test_a_cuda_device_without_cuda_is_refused_before_any_work(cropped: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CipaInputError, match=r"device 'cuda:0': CUDA is not available here"):
        predict(cropped["image"], tmp_path / "out", tmp_path / "missing.pt", device="cuda:0", progress=False)
    with pytest.raises(CipaInputError, match=r"device 'gpu0': .*expected e.g. cpu or cuda:0"):
        predict(cropped["image"], tmp_path / "out", tmp_path / "missing.pt", device="gpu0", progress=False)
    assert not (tmp_path / "out").exists()


def test_bad_input_exits_with_code_2_and_one_line(tiny_checkpoint: Path, tmp_path: Path, capsys) -> None:
    from cipa_bundle.cli import main

    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", str(bad), str(tmp_path / "o"), "--checkpoint", str(tiny_checkpoint)])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("cipa-bundle: error:") and str(bad) in lines[0] and "not a NIfTI" in lines[0]


def test_prepare_input_refuses_what_it_cannot_use(converted: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(CipaInputError, match="pass the PET too"):
        prepare_input(converted["ct"], tmp_path)
    raw = nib.load(converted["image"])
    hu_like = nib.Nifti1Image(np.asarray(raw.dataobj) * 1000.0, raw.affine)
    nib.save(hu_like, tmp_path / "raw.nii.gz")
    with pytest.raises(CipaInputError, match=r"values span \[0, 1000\]; expected windowed CT"):
        prepare_input(tmp_path / "raw.nii.gz", tmp_path)
    with pytest.raises(CipaInputError, match="expected Hounsfield units"):  # SUV passed as the CT
        prepare_input((converted["suv_ct"], converted["suv"]), tmp_path)
    with pytest.raises(CipaInputError, match="does not exist"):
        prepare_input(tmp_path / "missing", tmp_path)
    # A convert output folder is a fused input with HU and SUV beside it.
    prepared = prepare_input(converted["image"].parent, tmp_path)
    assert prepared.kind == "fused" and prepared.ct == converted["ct"] and prepared.suv == converted["suv_ct"]
    assert prepared.case == "case_a" == case_name(converted["image"])
    # Options that act on DICOM studies only are refused for NIfTI input, not silently ignored.
    with pytest.raises(CipaInputError, match=r"is a converted image folder; register='rigid' apply to DICOM studies"):
        prepare_input(converted["image"].parent, tmp_path, register="rigid")
    with pytest.raises(CipaInputError, match=r"is a CT \+ PET NIfTI pair; suv_kind='lbm', pet_series='1.2.3' apply"):
        prepare_input((converted["ct"], converted["suv"]), tmp_path, suv_kind="lbm", pet_series="1.2.3")
    # A damaged or shifted sibling is refused by name, never used beside the image.
    folder = tmp_path / "case_c"
    folder.mkdir()
    (folder / converted["image"].name).write_bytes(converted["image"].read_bytes())
    (folder / "ct.nii.gz").write_bytes(converted["ct"].read_bytes()[:200])
    with pytest.raises(CipaInputError, match=r"case case_c: cannot read NIfTI header of .*case_c/ct\.nii\.gz"):
        prepare_input(folder, tmp_path)
    ct = nib.load(converted["ct"])
    shifted = ct.affine.copy()
    shifted[0, 3] += 0.5
    nib.save(nib.Nifti1Image(np.asarray(ct.dataobj), shifted), folder / "ct.nii.gz")
    with pytest.raises(CipaInputError, match=r"ct\.nii\.gz: the CT is not on the grid of the fused image"):
        prepare_input(folder, tmp_path)


def test_ct_window_is_the_one_asked_for_and_a_fused_image_must_record_it(
    case: Path, converted: dict[str, Path], cropped: dict[str, Path], tmp_path: Path
) -> None:
    soft = (-160.0, 240.0)
    hu = np.asarray(nib.load(cropped["ct"]).dataobj, dtype=np.float32)
    # A CT + PET pair: the CT channel is clip((HU + 160) / 400, 0, 1), worked out here from the HU themselves.
    pair = prepare_input((cropped["ct"], cropped["suv"]), tmp_path / "pair", ct_window_hu="-160,240")
    channel = np.asarray(nib.load(pair.image).dataobj)[..., 0]
    np.testing.assert_allclose(channel, np.clip((hu + 160.0) / 400.0, 0, 1), atol=1e-6)
    assert pair.provenance["image"]["ct_window_hu"] == list(soft)
    # A DICOM study goes through convert with that window, and its provenance records it.
    dicom = prepare_input(case / "dicom", tmp_path / "dicom", ct_window_hu=soft, progress=False)
    study_hu = np.asarray(nib.load(dicom.ct).dataobj, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(nib.load(dicom.image).dataobj)[..., 0],
                               np.clip((study_hu + 160.0) / 400.0, 0, 1), atol=1e-6)
    assert dicom.provenance["image"]["ct_window_hu"] == list(soft)
    # A fused image is already windowed: the same window passes, another one is refused naming both.
    assert prepare_input(dicom.image, tmp_path / "x", ct_window_hu=soft).kind == "fused"
    with pytest.raises(CipaInputError, match=r"ct_window_hu=\[-160.0, 240.0\] was asked for, but this fused image "
                                             r"was windowed with \[-1200.0, -200.0\] HU"):
        prepare_input(converted["image"], tmp_path / "y", ct_window_hu=soft)
    with pytest.raises(CipaInputError, match=r"has no provenance.json recording its window"):
        prepare_input(cropped["image"], tmp_path / "z", ct_window_hu=soft)
    for bad in ("240,-160", "soft", (1.0, float("nan")), "1,2,3"):
        with pytest.raises(CipaInputError, match=r"ct_window_hu=.*expected"):
            prepare_input(cropped["image"], tmp_path / "w", ct_window_hu=bad)


def test_checkpoint_architecture_is_read_from_shapes(tmp_path: Path) -> None:
    from cipa_bundle.networks import CIPA

    path = tmp_path / "w.pt"
    torch.save({"model": CIPA(img_size=256, dims=30, depths=[1, 2, 1, 3], decoder_depths=[2, 1, 3, 1]).state_dict()},
               path)
    assert checkpoint_architecture(path) == {
        "img_size": 256, "network_width": 30, "encoder_depths": [1, 2, 1, 3], "decoder_depths": [2, 1, 3, 3]
    }
    with pytest.raises(CipaInputError, match="--img_size 512 disagrees"):
        predict(tmp_path / "x.nii.gz", tmp_path / "o", path, img_size=512)
    torch.save({"head.weight": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(CipaInputError, match="encoder.patch_embed.weight missing"):
        checkpoint_architecture(tmp_path / "other.pt")


# --------------------------------------------------------------------------------------------- inferer
def test_body_slice_inferer_runs_only_the_body_range() -> None:
    # 10 axial slices of 8 x 8; CT channel (0) is normalised black (-1.6) except slices 3..5 (value 1.0 = tissue).
    x = torch.full((1, 2, 8, 8, 10), -1.6)
    x[0, 0, :, :, 3:6] = 1.0
    x[0, 1] = torch.arange(10.0)  # PET channel: the slice index, so each output slice says which slice it came from
    seen: list[int] = []

    def network(batch: torch.Tensor) -> torch.Tensor:
        seen.append(batch.shape[0])
        # Per slice: mean of the CT channel over the 16 x 16 window (with padding) + the PET value at the centre.
        return batch[:, :1].mean(dim=(2, 3), keepdim=True).expand(-1, 1, 16, 16) + batch[:, 1:2, 8:9, 8:9]

    inferer = BodySliceInferer(roi_size=(16, 16), sw_batch_size=2, margin=1)
    out = inferer(x, network)
    # Body slices 3..5 plus one slice of margin on each side: 2..6, five slices, in batches of 2 -> 2 + 2 + 1.
    assert inferer.last_stats["slices_run"] == 5 and sum(seen) == 5
    assert torch.all(out[..., [0, 1, 7, 8, 9]] == -1e4)
    # Padding 8 x 8 -> 16 x 16 with cval -1.6: a tissue slice's mean is (64 * 1.0 + 192 * -1.6) / 256 = -0.95.
    for k in (3, 4, 5):
        assert torch.allclose(out[0, 0, :, :, k], torch.tensor(-0.95 + k))
    assert torch.allclose(out[0, 0, :, :, 2], torch.tensor(-1.6 + 2))
    plain = SliceInferer(roi_size=(16, 16), sw_batch_size=2, spatial_dim=2, cval=-1.6)(x, network)
    assert torch.equal(out[..., 2:7], plain[..., 2:7])
    # No body at all: nothing is skipped.
    inferer(torch.full((1, 2, 8, 8, 4), -1.6), network)
    assert inferer.last_stats["slices_run"] == 4


# --------------------------------------------------------------------------------------------- post-processing
def test_fill_holes_2d_fills_enclosed_background_only() -> None:
    ring = np.zeros((7, 7, 2), dtype=bool)
    ring[1:6, 1:6, :] = True
    ring[2:5, 2:5, :] = False  # a 3 x 3 hole in both slices
    ring[0:3, 3, 1] = False  # slice 1: a channel from the border into the hole opens it
    filled = fill_holes_2d(ring, axis=2)
    assert filled[1:6, 1:6, 0].all() and filled[..., 0].sum() == 25
    assert np.array_equal(filled[..., 1], ring[..., 1])


def test_remove_small_lesions_drops_specks_and_findings_outside_the_body() -> None:
    # 2 x 2 x 2.5 mm voxels = 0.01 ml, so min_volume_ml 0.1 keeps components of 10 voxels or more.
    affine = np.diag([2.0, 2.0, 2.5, 1.0])
    mask = np.zeros((1, 20, 20, 10), dtype=np.float32)
    mask[0, 2:6, 2:6, 2:6] = 1  # 64 voxels = 0.64 ml, inside the body: kept
    mask[0, 10, 10, 1:3] = 1  # 2 voxels = 0.02 ml: too small
    mask[0, 15:18, 15:18, 5:8] = 1  # 27 voxels, all outside the body: removed
    mask[0, 8:10, 2:7, 8] = 1  # a 10-voxel bar straddling the body's edge (see below)
    body = np.zeros((1, 20, 20, 10), dtype=bool)
    body[0, :9, :12, :] = True  # i < 9 and j < 12
    # The bar: i in {8, 9}, j in 2..6 -> inside only where i == 8: 5 of 10 = 0.5 -> kept (>= 0.5).
    remover = RemoveSmallLesions(min_volume_ml=0.1, min_body_fraction=0.5)
    out = remover(MetaTensor(torch.as_tensor(mask), affine=torch.as_tensor(affine)), torch.as_tensor(body))
    expected = np.zeros_like(mask)
    expected[0, 2:6, 2:6, 2:6] = 1
    expected[0, 8:10, 2:7, 8] = 1
    assert isinstance(out, MetaTensor) and np.array_equal(out.numpy(), expected)
    assert remover.last_removed == {"too_small": 1, "outside_body": 1, "kept": 2}
    # Stricter body test: the half-outside bar goes too.
    stricter = RemoveSmallLesions(min_volume_ml=0.1, min_body_fraction=0.6)(mask, body, affine=affine)
    assert stricter.sum() == 64


def test_body_mask_includes_the_lungs_and_guards_the_dict_pipeline() -> None:
    # Windowed CT in [0, 1]: air 0.2, body 1.0 in a 12 x 12 square, "lungs" 0.35 in a 6 x 6 hole inside it.
    ct = np.full((16, 16, 3), 0.2, dtype=np.float32)
    ct[2:14, 2:14] = 1.0
    ct[5:11, 5:11] = 0.35
    image = MetaTensor(torch.as_tensor(np.stack([ct, np.zeros_like(ct)])), affine=torch.eye(4))
    body = BodyMask(threshold=0.5)(image)
    assert tuple(body.shape) == (1, 16, 16, 3) and int(body.sum()) == 12 * 12 * 3
    pred = torch.zeros((1, 16, 16, 3))
    pred[0, 6:9, 6:9, :] = 1  # a lesion in the lung: inside the (filled) body, kept
    pred[0, 0, 0, :] = 1  # 3 voxels in the air outside: removed
    data = BodyMaskd(keys="image", name="body", threshold=0.5)({"image": image, "pred": MetaTensor(pred)})
    data = RemoveSmallLesionsd(keys="pred", body_key="body", min_volume_ml=0.0)(data)
    assert int(data["pred"].sum()) == 27 and data["pred"][0, 0, 0].sum() == 0



def test_default_postprocessing_keeps_every_phantom_tumour(case: Path, converted: dict[str, Path]) -> None:
    """On a real study the body mask holds the lungs, so the true tumours (all in the lungs) survive."""
    from cipa_bundle.report import label_lesions

    image = nib.load(converted["image"])
    fused = MetaTensor(torch.as_tensor(np.moveaxis(np.asarray(image.dataobj), -1, 0)),
                       affine=torch.as_tensor(image.affine))
    body = BodyMask()(fused)[0].numpy()
    truth = json.loads((case / "truth.json").read_text())
    to_voxel = np.linalg.inv(image.affine)
    lungs = [s for s in truth["structures"] if s["name"] in ("lung_right", "lung_left")]
    assert len(lungs) == 2
    for structure in lungs:
        x, y, z = structure["ct_probe_lps_mm"]
        ijk = tuple(np.rint(to_voxel @ [-x, -y, z, 1])[:3].astype(int))
        assert fused[0][ijk] < 0.5 and body[ijk], structure["name"]  # below the threshold, inside the filled body
    assert not body[0, 0].any()  # the corners of the 192 mm field of view are air
    label = np.asarray(nib.load(case / "label.nii.gz").dataobj)[None].astype(np.float32)
    remover = RemoveSmallLesions()
    kept = remover(MetaTensor(torch.as_tensor(label), affine=torch.as_tensor(image.affine)), torch.as_tensor(body))
    assert np.array_equal(kept.numpy(), label)
    assert remover.last_removed["kept"] == label_lesions(label[0])[1] >= 1
