"""``convert_study`` / ``cipa-bundle convert`` end to end on phantom studies, with the truth from truth.json.

* Round trip (noise, blur and shift off): HU exact at CT probes, SUV within 0.5 % at PET probes on the native grid and
  at combined probes on the CT grid, tumour SUVmax within 0.5 %, for every vendor's timing and units path.
* Geometry: the ct.nii.gz affine maps voxels to the positions written in the DICOM ImagePositionPatient tags.
* Bad studies: exit code 2 with one line on stderr, and no output file left behind.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pydicom.uid
import pytest

from cipa_bundle.cli import main
from cipa_bundle.data.datalist import build_studies_datalist
from cipa_bundle.synthetic.phantom import make_phantom_case
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.dicom import read_series
from cipa_bundle.io.rtstruct import write_rtstruct
from cipa_bundle.preprocessing.convert import OUTPUT_FILES, StudyLayoutError, convert_study


def _index(affine: np.ndarray, lps: list[float]) -> tuple[int, int, int]:
    """Nearest voxel of an LPS point through a RAS affine."""
    x, y, z = lps
    return tuple(int(v) for v in np.rint(np.linalg.solve(affine, [-x, -y, z, 1.0])[:3]))  # type: ignore[return-value]


@pytest.fixture(scope="module", params=["siemens", "ge", "philips"])
def converted(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp(request.param)
    case = make_phantom_case(root, "case", seed=11, vendor=request.param, noise=False, blur=False)
    out = root / "out"
    paths = convert_study(case, out, progress=False)
    assert sorted(p.name for p in paths.values()) == sorted(OUTPUT_FILES)
    return case, out, json.loads((case / "truth.json").read_text())


def test_round_trip_hu_and_suv(converted: tuple[Path, Path, dict]) -> None:
    _, out, truth = converted
    ct = nib.load(out / "ct.nii.gz")
    suv = nib.load(out / "suv.nii.gz")
    suv_ct = nib.load(out / "suv_ct.nii.gz")
    ct_data = np.asarray(ct.dataobj)
    suv_data, suv_ct_data = np.asarray(suv.dataobj), np.asarray(suv_ct.dataobj)
    assert ct_data.dtype == np.int16 and suv_data.dtype == np.float32
    assert list(suv.shape) == truth["pet"]["shape"] and suv_ct.shape == ct.shape
    combined = 0
    for s in truth["structures"]:
        assert ct_data[_index(ct.affine, s["ct_probe_lps_mm"])] == s["hu"], s["name"]
        assert suv_data[_index(suv.affine, s["pet_probe_lps_mm"])] == pytest.approx(s["suv"], rel=5e-3), s["name"]
        if s["probe_lps_mm"] is not None:
            ijk = _index(ct.affine, s["probe_lps_mm"])
            assert ct_data[ijk] == s["hu"], s["name"]
            assert suv_ct_data[ijk] == pytest.approx(s["suv"], rel=5e-3), s["name"]
            combined += 1
    assert combined >= len(truth["structures"]) - 2  # only the smallest (node, small tumours) may lack one
    # Tumour SUVmax: the hottest PET voxel within the sphere (native grid) is the uniform true value.
    pet_ras = nib.affines.apply_affine(suv.affine, np.indices(suv.shape).reshape(3, -1).T)
    for t in truth["tumours"]:
        c = np.array(t["centre_lps_mm"]) * [-1, -1, 1]
        inside = np.linalg.norm(pet_ras - c, axis=1) <= t["radius_mm"]
        assert suv_data.reshape(-1)[inside].max() == pytest.approx(t["suv_max"], rel=5e-3), t["name"]


def test_ct_affine_matches_dicom_positions(converted: tuple[Path, Path, dict]) -> None:
    case, out, truth = converted
    affine = nib.load(out / "ct.nii.gz").affine
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted((case / "dicom" / "ct").glob("*.dcm"))]
    headers.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))  # axial HFS: k follows +z
    for i, j, k in [(0, 0, 0), (5, 7, 3), (63, 10, len(headers) - 1)]:
        ds = headers[k]
        row_dir = np.array(ds.ImageOrientationPatient[:3], float)
        col_dir = np.array(ds.ImageOrientationPatient[3:], float)
        dr, dc = (float(v) for v in ds.PixelSpacing)  # (between rows, between columns)
        lps = np.array(ds.ImagePositionPatient, float) + i * dc * row_dir + j * dr * col_dir
        np.testing.assert_allclose(affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1], atol=1e-4)
    np.testing.assert_allclose(affine, np.asarray(truth["ct"]["affine_ras"]), atol=1e-4)


def test_image_channels_and_provenance(converted: tuple[Path, Path, dict]) -> None:
    _, out, truth = converted
    image = nib.load(out / "image.nii.gz")
    data = np.asarray(image.dataobj)
    ct = np.asarray(nib.load(out / "ct.nii.gz").dataobj).astype(np.float64)
    suv_ct = np.asarray(nib.load(out / "suv_ct.nii.gz").dataobj).astype(np.float64)
    assert data.shape == (*ct.shape, 2) and data.dtype == np.float32
    np.testing.assert_allclose(image.affine, nib.load(out / "ct.nii.gz").affine)
    np.testing.assert_allclose(data[..., 0], np.clip((ct + 1200) / 1000, 0, 1), atol=1e-6)
    np.testing.assert_allclose(data[..., 1], np.clip(suv_ct / 10, 0, 1), atol=1e-6)
    record = json.loads((out / "provenance.json").read_text())
    assert record["suv"]["factor"] == pytest.approx(truth["suv_factor"], rel=1e-9)
    assert record["ct"]["series_uid"] == truth["ct_series_uid"]
    assert record["pet"]["series_uid"] == truth["pet_series_uid"]
    assert record["frame_of_reference"]["shared"] is True
    assert record["registration"] == {"method": "none", "applied": False}
    assert record["image"]["channels"] == ["ct", "pet"] and record["versions"]["itk"]


def test_rigid_convert_recovers_shift(tmp_path: Path) -> None:
    case = make_phantom_case(tmp_path, "shifted", seed=12, shift=(4.0, -3.0, 6.0), vendor="ge")
    convert_study(case, tmp_path / "out", register="rigid", progress=False)
    reg = json.loads((tmp_path / "out" / "provenance.json").read_text())["registration"]
    assert reg["method"] == "rigid" and reg["applied"] is True
    assert np.linalg.norm(np.subtract(reg["translation_mm"], [4.0, -3.0, 6.0])) < 1.0
    # The corrected PET puts each tumour's uptake back on its CT position.
    truth = json.loads((case / "truth.json").read_text())
    suv_ct = nib.load(tmp_path / "out" / "suv_ct.nii.gz")
    for t in truth["tumours"]:
        assert np.asarray(suv_ct.dataobj)[_index(suv_ct.affine, t["centre_lps_mm"])] > 0.5 * t["suv_max"]


@pytest.fixture(scope="module")
def clean_case(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_phantom_case(tmp_path_factory.mktemp("bad"), "case", seed=13, noise=False, blur=False)


def test_cli_missing_pet_exits_2_with_one_line(tmp_path: Path, clean_case: Path) -> None:
    study = tmp_path / "study"
    shutil.copytree(clean_case / "dicom" / "ct", study / "ct")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "cipa_bundle", "convert", str(study), str(out)],
                          capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cipa-bundle: error:")]
    assert len(lines) == 1 and "no PET series" in lines[0] and "(0008,0060)" in lines[0] and str(study) in lines[0]
    assert not out.exists()


def test_cli_ct_window_sets_the_ct_channel(tmp_path: Path, clean_case: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "cipa_bundle", "convert", str(clean_case / "dicom"), str(out),
                           "--ct_window=-160,240"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    hu = np.asarray(nib.load(out / "ct.nii.gz").dataobj, dtype=np.float32)
    channel = np.asarray(nib.load(out / "image.nii.gz").dataobj)[..., 0]
    np.testing.assert_allclose(channel, np.clip((hu + 160.0) / 400.0, 0, 1), atol=1e-6)
    assert json.loads((out / "provenance.json").read_text())["image"]["ct_window_hu"] == [-160.0, 240.0]
    proc = subprocess.run([sys.executable, "-m", "cipa_bundle", "convert", str(clean_case / "dicom"),
                           str(tmp_path / "bad"), "--ct_window=240,-160"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "ct_window_hu=(240, -160): expected finite LOW < HIGH" in proc.stderr
    assert not (tmp_path / "bad").exists()


def test_cli_mismatched_frame_of_reference(tmp_path: Path, clean_case: Path, capsys: pytest.CaptureFixture) -> None:
    study = tmp_path / "study"
    shutil.copytree(clean_case / "dicom", study)
    for path in (study / "pet").glob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.FrameOfReferenceUID = "1.2.3.4.5"
        ds.save_as(path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        main(["convert", str(study), str(out)])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "E15" in err and "1.2.3.4.5" in err and "(0020,0052)" in err
    assert not out.exists()


def test_nothing_half_written_when_a_write_fails(tmp_path: Path, clean_case: Path) -> None:
    out = tmp_path / "out"
    (out / "provenance.json").mkdir(parents=True)  # the last rename cannot replace a folder
    with pytest.raises(OSError):
        convert_study(clean_case, out, progress=False)
    assert [p.name for p in out.iterdir()] == ["provenance.json"]  # only the obstacle; no NIfTI, no temporaries


def _copy_series(source: Path, target: Path, name: str, edit) -> str:  # noqa: ANN001
    """Every file of ``source`` as a new series in ``target`` (new UIDs), after ``edit(ds)``; returns its UID."""
    series_uid = pydicom.uid.generate_uid(entropy_srcs=[name])
    target.mkdir(parents=True)
    for path in sorted(source.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[path.name, name])
        edit(ds)
        ds.save_as(target / path.name)
    return series_uid


def test_bad_arguments_and_layouts(tmp_path: Path, clean_case: Path) -> None:
    with pytest.raises(CipaInputError, match="register='affine'"):
        convert_study(clean_case, tmp_path / "o", register="affine")
    with pytest.raises(CipaInputError, match="kind='sul'"):
        convert_study(clean_case, tmp_path / "o", suv_kind="sul")
    doubled = tmp_path / "two_pets"
    shutil.copytree(clean_case / "dicom", doubled)
    _copy_series(doubled / "pet", doubled / "pet_copy", "second PET", lambda ds: None)  # same pixels, new series
    with pytest.raises(StudyLayoutError, match="2 PET series.*choose one with pet_series=<SeriesInstanceUID>"):
        convert_study(doubled, tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
    with pytest.raises(StudyLayoutError, match="pet_series=1.2.3 is not a PET series"):
        convert_study(doubled, tmp_path / "o", progress=False, pet_series="1.2.3")
    assert not (tmp_path / "o").exists()


def test_scouts_and_uncorrected_pet_are_set_aside_and_uids_choose(tmp_path: Path, clean_case: Path) -> None:
    reference = convert_study(clean_case, tmp_path / "reference", progress=False)
    study = tmp_path / "export"
    shutil.copytree(clean_case / "dicom", study)
    # A scout: one CT image of ImageType LOCALIZER in a series of its own, as scanner exports have.
    scout = _copy_series(study / "ct", tmp_path / "scout_all", "scout",
                         lambda ds: setattr(ds, "ImageType", ["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    (study / "scout").mkdir()
    shutil.move(sorted((tmp_path / "scout_all").glob("*.dcm"))[0], study / "scout" / "scout.dcm")
    # The same PET without attenuation correction (here: the same pixels, CorrectedImage without ATTN).
    nac = _copy_series(study / "pet", study / "pet_nac", "nac", lambda ds: setattr(ds, "CorrectedImage", ["DECY"]))
    out = convert_study(study, tmp_path / "out", progress=False)
    for key in ("ct", "suv"):
        assert np.array_equal(np.asarray(nib.load(out[key]).dataobj), np.asarray(nib.load(reference[key]).dataobj))
    provenance = json.loads(out["provenance"].read_text())
    reference_provenance = json.loads(reference["provenance"].read_text())
    assert provenance["ct"]["series_uid"] == reference_provenance["ct"]["series_uid"] != scout
    assert provenance["pet"]["series_uid"] == reference_provenance["pet"]["series_uid"] != nac
    # Asked for by UID, the uncorrected PET is the one read, and the SUV conversion refuses it (E9).
    with pytest.raises(CipaInputError, match=r"pet_nac/PT_0000.dcm: \[E9\] image not attenuation/decay corrected"):
        convert_study(study, tmp_path / "nac_out", progress=False, pet_series=nac)
    assert not (tmp_path / "nac_out").exists()
    with pytest.raises(SystemExit) as info:  # the same through the command line
        main(["convert", str(study), str(tmp_path / "nac_out"), "--pet_series", nac])
    assert info.value.code == 2
    # A scout alone is no CT volume.
    only_scout = tmp_path / "only_scout"
    shutil.copytree(study / "pet", only_scout / "pet")
    shutil.copytree(study / "scout", only_scout / "scout")
    with pytest.raises(StudyLayoutError, match="no CT series .* other than localizers"):
        convert_study(only_scout, tmp_path / "o", progress=False)


def test_a_scout_inside_the_ct_series_is_set_aside(tmp_path: Path, clean_case: Path) -> None:
    from cipa_bundle.inference.inputs import prepare_input

    reference = convert_study(clean_case, tmp_path / "reference", progress=False)
    study = tmp_path / "export"
    shutil.copytree(clean_case / "dicom", study)
    ct_files = sorted((study / "ct").glob("*.dcm"))
    # A coronal scout of another size in the CT series itself, named so that it is the series' first file.
    scout = pydicom.dcmread(ct_files[0])
    scout.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["in-series scout"])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.Rows, scout.Columns = 40, int(scout.Columns) + 8
    dtype = np.int16 if scout.PixelRepresentation else np.uint16
    scout.PixelData = np.full((40, scout.Columns), 1024, dtype=dtype).tobytes()
    scout.save_as(study / "ct" / "000_scout.dcm")
    out = convert_study(study, tmp_path / "out", progress=False)
    for key in ("ct", "suv_ct", "image"):
        assert np.array_equal(np.asarray(nib.load(out[key]).dataobj), np.asarray(nib.load(reference[key]).dataobj))
    record = json.loads(out["provenance"].read_text())["ct"]
    assert record["set_aside"] == [os.path.join("ct", "000_scout.dcm")]
    assert record["files"] == [os.path.relpath(f, study) for f in ct_files]  # slice k is files[k], sorted by z here
    # The DICOM SEG of a prediction references the volume's instances only, in slice order.
    prepared = prepare_input(study, tmp_path / "prepared", progress=False)
    assert [str(ds.SOPInstanceUID) for ds in prepared.ct_datasets] == [
        str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in ct_files
    ]
    # A series of scouts only is no volume, also when read directly.
    from cipa_bundle.io.dicom import UnsupportedImageError, read_series

    with pytest.raises(UnsupportedImageError, match=r"every instance is a localizer .*000_scout.dcm"):
        read_series([study / "ct" / "000_scout.dcm"])


def test_cli_phantom_verb(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["phantom", str(tmp_path), "--cases", "1", "--seed", "5", "--shift", "4,-3,6", "--vendor", "philips",
          "--nonoise"])
    truth = json.loads((tmp_path / "phantom_000" / "truth.json").read_text())
    assert truth["shift_lps_mm"] == [4.0, -3.0, 6.0] and truth["vendor"] == "philips" and truth["noise"] is False
    assert "phantom_000" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["phantom", str(tmp_path / "x"), "--vendor", "agfa"])
    assert info.value.code == 2


def test_multi_bed_pet_with_junction_jitter_converts_to_the_analytic_suv(tmp_path: Path) -> None:
    from cipa_bundle.io.dicom import NonUniformSpacingError

    # Three 60 mm beds of 4 mm slices, each bed's positions from its own start (off by up to 0.08 mm), rounded to
    # 0.01 mm: as the real GE Discovery ST series that the former 1 % gap rule refused.
    case = make_phantom_case(tmp_path, "multibed", seed=11, vendor="ge", noise=False, blur=False,
                             pet_bed_jitter_mm=0.08)
    pet_files = sorted((case / "dicom" / "pet").iterdir())
    heights = sorted(float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in pet_files)
    gaps = np.diff(heights)
    assert 0.005 < np.max(np.abs(gaps - 4.0)) <= 0.17  # the junctions jitter (beyond 1 % of the spacing at some)
    paths = convert_study(case, tmp_path / "out", progress=False)
    truth = json.loads((case / "truth.json").read_text())
    suv = nib.load(paths["suv"])
    suv_data = np.asarray(suv.dataobj)
    for s in truth["structures"]:
        assert suv_data[_index(suv.affine, s["pet_probe_lps_mm"])] == pytest.approx(s["suv"], rel=5e-3), s["name"]
    provenance = json.loads(Path(paths["provenance"]).read_text())
    design = np.stack([np.ones(len(heights)), np.arange(len(heights))], axis=1)
    (start, spacing), *_ = np.linalg.lstsq(design, np.array(heights), rcond=None)
    deviation = np.max(np.abs(np.array(heights) - start - spacing * np.arange(len(heights))))
    assert provenance["pet"]["slice_position_max_deviation_mm"] == pytest.approx(deviation, abs=1e-6)
    assert 0.005 < deviation < 0.4 and provenance["ct"]["slice_position_max_deviation_mm"] < 1e-6

    # A missing slice is still refused, naming the gap.
    pet_files[len(pet_files) // 2].unlink()
    missing = r"PT_\d+\.dcm: slice gap (8|7\.9\d*|8\.0\d*) mm .*\(is a slice missing\?\)"
    with pytest.raises(NonUniformSpacingError, match=missing):
        convert_study(case, tmp_path / "out2", progress=False)


def test_label_rtstruct_is_rasterised_onto_the_ct_grid_and_feeds_the_studies_datalist(
    tmp_path: Path, clean_case: Path
) -> None:
    ct = read_series(clean_case / "dicom" / "ct", modality="CT")
    truth_img = nib.load(clean_case / "label.nii.gz")
    truth = np.asarray(truth_img.dataobj) > 0
    rtstruct = write_rtstruct(truth.astype(np.uint8), ct.datasets, tmp_path / "rs.dcm", roi_name="GTV")

    # A second ROI makes the choice ambiguous: refused in one line that lists both names, and nothing is written.
    two_rois = pydicom.dcmread(rtstruct)
    roi = copy.deepcopy(two_rois.StructureSetROISequence[0])
    roi.ROINumber, roi.ROIName = 2, "Lung_R"
    two_rois.StructureSetROISequence.append(roi)
    contours = copy.deepcopy(two_rois.ROIContourSequence[0])
    contours.ReferencedROINumber = 2
    two_rois.ROIContourSequence.append(contours)
    observation = copy.deepcopy(two_rois.RTROIObservationsSequence[0])
    observation.ObservationNumber, observation.ReferencedROINumber = 2, 2
    two_rois.RTROIObservationsSequence.append(observation)
    two_rois.save_as(tmp_path / "rs_two.dcm")
    refused = tmp_path / "refused"
    proc = subprocess.run(
        [sys.executable, "-m", "cipa_bundle", "convert", str(clean_case / "dicom"), str(refused),
         "--label_rtstruct", str(tmp_path / "rs_two.dcm")],
        capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("cipa-bundle: error:")]
    assert len(lines) == 1 and "rs_two.dcm" in lines[0] and "GTV" in lines[0] and "Lung_R" in lines[0]
    assert not refused.exists()

    # --roi chooses; the label lands on the CT grid, equal to the mask the contours were drawn from.
    root = tmp_path / "converted"
    for case in ("c1", "c2"):
        main(["convert", str(clean_case / "dicom"), str(root / case), "--label_rtstruct",
              str(tmp_path / "rs_two.dcm"), "--roi", "GTV", "--studies_dir", str(tmp_path / "studies")])
    label_img = nib.load(root / "c1" / "label.nii.gz")
    label = np.asarray(label_img.dataobj)
    assert label.dtype == np.uint8 and label_img.shape == truth.shape
    np.testing.assert_allclose(label_img.affine, nib.load(root / "c1" / "ct.nii.gz").affine, atol=1e-6)
    assert 2 * np.sum((label > 0) & truth) / (np.sum(label > 0) + np.sum(truth)) >= 0.98
    record = json.loads((root / "c1" / "provenance.json").read_text())["label"]
    assert record["roi"] == "GTV" and record["voxels"] == int(np.sum(label > 0))
    # The MONAI Label studies folder gets the same label, and `datalist studies` pairs it with the image.
    studies_label = tmp_path / "studies" / "labels" / "final" / "c1.nii.gz"
    np.testing.assert_array_equal(np.asarray(nib.load(studies_label).dataobj), label)
    doc = build_studies_datalist(root, val_fraction=0.5, seed=0)
    items = doc["training"] + doc["validation"]
    assert sorted(item["label"] for item in items) == ["c1/label.nii.gz", "c2/label.nii.gz"]
