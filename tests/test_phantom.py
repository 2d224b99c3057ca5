"""Synthetic PET-CT phantom: determinism, DICOM content per vendor, truth bookkeeping and the PET shift.

Header checks read the written files with plain pydicom; the SUV factor is recomputed here from those tags with the
QIBA formula (W[g] / (D 2^(-dt / T_half))), independently of both the phantom and the SUV module.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cipa_bundle.synthetic.anatomy import SIZES, build_anatomy
from cipa_bundle.synthetic.phantom import make_phantom_case, make_phantom_dataset, parse_shift
from cipa_bundle.errors import CipaInputError


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _headers(folder: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]


def _dt(date: str, time: str) -> dt.datetime:
    return dt.datetime.strptime(date + time.split(".")[0], "%Y%m%d%H%M%S")


def test_same_seed_same_bytes_other_seed_other_case(tmp_path: Path) -> None:
    a = make_phantom_dataset(tmp_path / "a", cases=1, seed=7, shift=(1, 2, 3), vendor="philips")
    make_phantom_dataset(tmp_path / "b", cases=1, seed=7, shift=(1, 2, 3), vendor="philips")
    assert [p.name for p in a] == ["phantom_000"]
    files_a, files_b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(files_a) > 70 and files_a == files_b
    # The next case of a dataset, and another seed, draw other tumours (case n uses the stream (seed, n)).
    tumours = json.loads((a[0] / "truth.json").read_text())["tumours"]
    next_case = build_anatomy(np.random.default_rng((7, 1)), SIZES["small"]).tumours
    other_seed = build_anatomy(np.random.default_rng((8, 0)), SIZES["small"]).tumours
    same = build_anatomy(np.random.default_rng((7, 0)), SIZES["small"]).tumours
    assert [t["centre_lps_mm"] for t in tumours] == [t["centre_lps_mm"] for t in same]
    assert tumours[0]["centre_lps_mm"] != next_case[0]["centre_lps_mm"] != other_seed[0]["centre_lps_mm"]


@pytest.fixture(scope="module", params=["siemens", "ge", "philips"])
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = make_phantom_case(tmp_path_factory.mktemp(request.param), "c", seed=1, vendor=request.param)
    return folder, json.loads((folder / "truth.json").read_text())


def test_pet_header_and_expected_suv_factor(case: tuple[Path, dict]) -> None:
    folder, truth = case
    pet = _headers(folder / "dicom" / "pet")
    ct = _headers(folder / "dicom" / "ct")
    first = pet[0]
    assert {ds.Modality for ds in pet} == {"PT"} and {ds.Modality for ds in ct} == {"CT"}
    assert {ds.FrameOfReferenceUID for ds in pet + ct} == {truth["frame_of_reference_uid"]}
    assert len({ds.StudyInstanceUID for ds in pet + ct}) == 1
    assert len({float(ds.RescaleSlope) for ds in pet}) > 1  # per-slice slopes
    assert first.DecayCorrection == "START" and "ATTN" in first.CorrectedImage
    item = first.RadiopharmaceuticalInformationSequence[0]
    weight_g = float(first.PatientWeight) * 1000.0
    dose, half_life = float(item.RadionuclideTotalDose), float(item.RadionuclideHalfLife)
    injection = _dt(first.SeriesDate, item.RadiopharmaceuticalStartTime)
    acquisitions = sorted(_dt(ds.AcquisitionDate, ds.AcquisitionTime) for ds in pet)
    series_time = _dt(first.SeriesDate, first.SeriesTime)
    vendor = truth["vendor"]
    if vendor == "siemens":
        assert first.Units == "BQML" and "RadiopharmaceuticalStartDateTime" in item
        assert series_time == acquisitions[0] < acquisitions[-1]  # multi-bed: later beds acquired later
        t_ref = series_time
    elif vendor == "ge":
        assert first.Units == "BQML" and "RadiopharmaceuticalStartDateTime" not in item
        assert series_time > acquisitions[0]  # post-processed series: SeriesTime must not be used
        scan = first.private_block(0x0009, "GEMS_PETD_01")[0x0D].value
        t_ref = dt.datetime.strptime(scan, "%Y%m%d%H%M%S")
    else:
        assert first.Units == "CNTS"
        block = first.private_block(0x7053, "Philips PET Private Group")
        suv_scale, acsf = float(block[0x00].value), float(block[0x09].value)
        assert truth["suv_factor"] == suv_scale
        t_ref = series_time
    expected_bw = weight_g / (dose * 2.0 ** (-(t_ref - injection).total_seconds() / half_life))
    assert truth["suv_bw_factor_bqml"] == pytest.approx(expected_bw, rel=1e-12)
    if vendor == "philips":
        assert suv_scale == pytest.approx(acsf * expected_bw, rel=1e-9)
    else:
        assert truth["suv_factor"] == pytest.approx(expected_bw, rel=1e-12)
    assert truth["decay_time_s"] == (t_ref - injection).total_seconds()


def test_grids_and_label(case: tuple[Path, dict]) -> None:
    folder, truth = case
    ct, pet = truth["ct"], truth["pet"]
    assert ct["shape"] == [64, 64, 32] and min(pet["spacing_mm"]) > max(ct["spacing_mm"][:2])
    ct_z = (ct["origin_lps_mm"][2], ct["origin_lps_mm"][2] + (ct["shape"][2] - 1) * ct["spacing_mm"][2])
    pet_z = (pet["origin_lps_mm"][2], pet["origin_lps_mm"][2] + (pet["shape"][2] - 1) * pet["spacing_mm"][2])
    assert pet_z[0] < ct_z[0] and pet_z[1] > ct_z[1]  # different z-extent (PET covers the CT)
    label = nib.load(folder / "label.nii.gz")
    data = np.asarray(label.dataobj)
    assert data.dtype == np.uint8 and set(np.unique(data)) == {0, 1}
    np.testing.assert_allclose(label.affine, np.asarray(ct["affine_ras"]), atol=1e-6)
    voxel_ml = float(np.prod(ct["spacing_mm"])) / 1000.0
    tumours = truth["tumours"]
    assert tumours[0]["location"] == "juxta-mediastinal" and tumours[0]["hu"] == 40.0
    assert sum(t["volume_ml_voxels"] for t in tumours) == pytest.approx(data.sum() * voxel_ml)
    for t in tumours:
        assert 3.0 <= t["suv_max"] <= 15.0
        assert t["volume_ml"] == pytest.approx(4 / 3 * math.pi * t["radius_mm"] ** 3 / 1000)
        # Sampling a sphere at voxel centres: the voxel volume is close to the analytic one.
        assert t["volume_ml_voxels"] == pytest.approx(t["volume_ml"], rel=0.25)
        # The label holds the tumour centre (LPS -> RAS -> voxel index).
        x, y, z = t["centre_lps_mm"]
        ijk = np.rint(np.linalg.inv(label.affine) @ [-x, -y, z, 1])[:3].astype(int)
        assert data[tuple(ijk)] == 1
    kinds = {s["name"]: s["kind"] for s in truth["structures"]}
    assert kinds["lymph_node"] == kinds["brown_fat"] == "trap" and kinds["myocardium"] == "anatomy"
    suv = {s["name"]: s["suv"] for s in truth["structures"]}
    assert suv["myocardium"] > 3 and suv["lymph_node"] > 3 and suv["lung_left"] < suv["mediastinum"]


def test_shift_moves_pet_content(tmp_path: Path) -> None:
    shift = np.array([8.0, -4.0, 12.0])
    base = make_phantom_case(tmp_path, "base", seed=2, noise=False, blur=False)
    moved = make_phantom_case(tmp_path, "moved", seed=2, shift=shift, noise=False, blur=False)
    truth = json.loads((moved / "truth.json").read_text())
    assert truth["shift_lps_mm"] == shift.tolist()
    # CT and label do not move; the PET does.
    assert _files(base / "dicom" / "ct").keys() == _files(moved / "dicom" / "ct").keys()
    assert (base / "label.nii.gz").read_bytes() == (moved / "label.nii.gz").read_bytes()

    def pet_at(case: Path, lps: np.ndarray) -> float:
        headers = sorted(_headers(case / "dicom" / "pet"), key=lambda ds: float(ds.ImagePositionPatient[2]))
        k = int(np.argmin([abs(float(ds.ImagePositionPatient[2]) - lps[2]) for ds in headers]))
        ds = pydicom.dcmread(headers[k].filename)
        spacing = [float(v) for v in ds.PixelSpacing]
        col = int(round((lps[0] - float(ds.ImagePositionPatient[0])) / spacing[1]))
        row = int(round((lps[1] - float(ds.ImagePositionPatient[1])) / spacing[0]))
        return float(ds.pixel_array[row, col]) * float(ds.RescaleSlope)

    for tumour in truth["tumours"]:
        centre = np.asarray(tumour["centre_lps_mm"])
        hot = pet_at(moved, centre + shift)
        assert hot * truth["suv_factor"] == pytest.approx(tumour["suv_max"], rel=0.02)
        assert pet_at(base, centre + shift) * truth["suv_factor"] < 0.5 * tumour["suv_max"]


def test_bad_arguments(tmp_path: Path) -> None:
    np.testing.assert_array_equal(parse_shift("4,-3,6"), [4.0, -3.0, 6.0])
    np.testing.assert_array_equal(parse_shift((4, -3, 6)), [4.0, -3.0, 6.0])
    with pytest.raises(CipaInputError, match="shift"):
        parse_shift("4,-3")
    with pytest.raises(CipaInputError, match="shift"):
        make_phantom_case(tmp_path, shift=(0, float("nan"), 0))
    with pytest.raises(CipaInputError, match="vendor='agfa'"):
        make_phantom_case(tmp_path, vendor="agfa")
    with pytest.raises(CipaInputError, match="size='huge'"):
        make_phantom_dataset(tmp_path, size="huge")
    with pytest.raises(CipaInputError, match="cases"):
        make_phantom_dataset(tmp_path, cases=0)
    assert not any(tmp_path.iterdir())
