"""Multi-frame CT and PET (Legacy Converted Enhanced objects) read like the single-frame series they came from.

highdicom's ``LegacyConvertedEnhancedCTImage`` / ``...PETImage`` turn a phantom's single-frame series into one
multi-frame object each, moving every per-slice attribute into functional groups (positions, rescale, frame times) and
the PET's SUV inputs into the Unassigned Shared Converted Attributes. ``convert`` must give the same NIfTI files,
voxel for voxel, and refuse a broken multi-frame object with a message that names the file, the frame and the tag.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from cipa_bundle.synthetic.phantom import make_phantom_case
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.dicom import DuplicatePositionError, read_series
from cipa_bundle.io.multiframe import frame_datasets, frame_number
from cipa_bundle.io.rtstruct import read_rtstruct_mask, write_rtstruct
from cipa_bundle.io.seg import read_dicom_seg_mask, write_dicom_seg
from cipa_bundle.preprocessing.convert import convert_study

_CONVERTERS = {"ct": hd.legacy.LegacyConvertedEnhancedCTImage, "pet": hd.legacy.LegacyConvertedEnhancedPETImage}


def _multiframe_study(case: Path, out: Path) -> Path:
    """Write the phantom case's CT and PET series as one Legacy Converted Enhanced object each, under ``out``."""
    for name, convert in _CONVERTERS.items():
        singles = [pydicom.dcmread(p) for p in sorted((case / "dicom" / name).glob("*.dcm"))]
        mf = convert(singles, series_instance_uid=hd.UID(), series_number=100, sop_instance_uid=hd.UID(),
                     instance_number=1)
        (out / name).mkdir(parents=True)
        mf.save_as(out / name / f"{name}_multiframe.dcm")
    return out


@pytest.mark.parametrize("vendor", ["siemens", "ge", "philips"])
def test_legacy_converted_ct_and_pet_convert_to_the_same_nifti_as_their_single_frame_series(
    vendor: str, tmp_path: Path
) -> None:
    # Noise on, so that per-slice PET rescale slopes differ and land in per-frame Pixel Value Transformation items.
    case = make_phantom_case(tmp_path, "case", seed=3, vendor=vendor)
    study = _multiframe_study(case, tmp_path / "multiframe")
    single = convert_study(case / "dicom", tmp_path / "single_out", progress=False)
    multi = convert_study(study, tmp_path / "multi_out", progress=False)

    for key in ("ct", "suv", "suv_ct", "image"):
        a, b = nib.load(single[key]), nib.load(multi[key])
        assert a.shape == b.shape, key
        np.testing.assert_array_equal(a.affine, b.affine, err_msg=key)
        np.testing.assert_array_equal(np.asarray(a.dataobj), np.asarray(b.dataobj), err_msg=key)

    prov_single = json.loads(Path(single["provenance"]).read_text())
    prov_multi = json.loads(Path(multi["provenance"]).read_text())
    assert prov_multi["suv"]["factor"] == prov_single["suv"]["factor"]
    assert prov_multi["pet"]["n_instances"] == 1 and prov_multi["pet"]["files"] == ["pet/pet_multiframe.dcm"]
    n_slices = prov_single["pet"]["shape"][2]
    assert sorted(prov_multi["pet"]["frames"]) == list(range(1, n_slices + 1))

    # Independent check of the SUV: the analytic truth's factor, as for the single-frame series.
    truth = json.loads((case / "truth.json").read_text())
    assert prov_multi["suv"]["factor"] == pytest.approx(truth["suv_factor"], rel=1e-6)


def test_each_frame_view_carries_its_own_position_and_rescale(tmp_path: Path) -> None:
    case = make_phantom_case(tmp_path, "case", seed=5, vendor="ge")
    study = _multiframe_study(case, tmp_path / "multiframe")
    path = study / "pet" / "pet_multiframe.dcm"
    ds = pydicom.dcmread(path)
    views = frame_datasets(ds, path)
    singles = {
        str(s.SOPInstanceUID): s for s in (pydicom.dcmread(p) for p in (case / "dicom" / "pet").glob("*.dcm"))
    }
    assert len(views) == int(ds.NumberOfFrames) == len(singles)
    for n, (view, item) in enumerate(zip(views, ds.PerFrameFunctionalGroupsSequence)):
        source = singles[str(item.ConversionSourceAttributesSequence[0].ReferencedSOPInstanceUID)]
        assert frame_number(view) == n + 1
        assert [float(v) for v in view.ImagePositionPatient] == [float(v) for v in source.ImagePositionPatient]
        assert float(view.RescaleSlope) == float(source.RescaleSlope)
        assert view.Units == source.Units and view.DecayCorrection == source.DecayCorrection
        np.testing.assert_array_equal(view.pixel_array, source.pixel_array)


def test_a_broken_multiframe_object_is_refused_naming_the_file_frame_and_tag(tmp_path: Path) -> None:
    case = make_phantom_case(tmp_path, "case", seed=7, vendor="siemens", size="small")
    study = _multiframe_study(case, tmp_path / "multiframe")
    path = study / "ct" / "ct_multiframe.dcm"

    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    frames[1].PlanePositionSequence[0].ImagePositionPatient = frames[0].PlanePositionSequence[0].ImagePositionPatient
    ds.save_as(path)
    with pytest.raises(DuplicatePositionError, match=r"ct_multiframe\.dcm frame [12]: ImagePositionPatient"):
        read_series(study / "ct")

    ds = pydicom.dcmread(path)
    del ds.PerFrameFunctionalGroupsSequence[-1]
    ds.save_as(path)
    with pytest.raises(CipaInputError, match=r"ct_multiframe\.dcm: PerFrameFunctionalGroupsSequence \(5200,9230\)"):
        read_series(study / "ct")

    ds = pydicom.dcmread(path)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.4.1"  # Enhanced MR: not a CT or PET object
    ds.save_as(path, enforce_file_format=False)
    with pytest.raises(CipaInputError, match=r"ct_multiframe\.dcm: SOPClassUID \(0008,0016\) = '1\.2\.840\.10008\.5\.1\.4\.1\.1\.4\.1'"):
        read_series(study / "ct")


def test_a_seg_of_a_multiframe_ct_references_its_frames_and_reads_back_onto_the_ct_grid(tmp_path: Path) -> None:
    case = make_phantom_case(tmp_path, "case", seed=9, vendor="siemens")
    study = _multiframe_study(case, tmp_path / "multiframe")
    ct = read_series(study / "ct", modality="CT")
    truth = np.asarray(nib.load(case / "label.nii.gz").dataobj).astype(np.uint8)
    assert truth.shape == ct.volume.shape and truth.any()

    seg_path = write_dicom_seg(truth, ct.datasets, tmp_path / "seg.dcm")
    np.testing.assert_array_equal(read_dicom_seg_mask(seg_path, ct.datasets), truth)

    # Each SEG frame names the CT object and the frame whose plane it lies in.
    seg = pydicom.dcmread(seg_path)
    ct_object = pydicom.dcmread(study / "ct" / "ct_multiframe.dcm", stop_before_pixels=True)
    positions = {
        n + 1: [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        for n, item in enumerate(ct_object.PerFrameFunctionalGroupsSequence)
    }
    assert int(seg.NumberOfFrames) == int(np.count_nonzero(truth.any(axis=(0, 1))))
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == ct_object.SOPInstanceUID
        seg_position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(seg_position, positions[int(source.ReferencedFrameNumber)], atol=1e-3)


def test_an_rtstruct_of_a_multiframe_ct_references_its_frames_and_reads_back(tmp_path: Path) -> None:
    case = make_phantom_case(tmp_path, "case", seed=9, vendor="ge")
    study = _multiframe_study(case, tmp_path / "multiframe")
    ct = read_series(study / "ct", modality="CT")
    truth = np.asarray(nib.load(case / "label.nii.gz").dataobj).astype(np.uint8)

    path = write_rtstruct(truth, ct.datasets, tmp_path / "rs.dcm")
    np.testing.assert_array_equal(read_rtstruct_mask(path, ct), truth)
    ct_object = pydicom.dcmread(study / "ct" / "ct_multiframe.dcm", stop_before_pixels=True)
    heights = {
        n + 1: float(item.PlanePositionSequence[0].ImagePositionPatient[2])
        for n, item in enumerate(ct_object.PerFrameFunctionalGroupsSequence)
    }
    contours = pydicom.dcmread(path).ROIContourSequence[0].ContourSequence
    assert len(contours) > 0
    for contour in contours:
        image = contour.ContourImageSequence[0]
        assert image.ReferencedSOPInstanceUID == ct_object.SOPInstanceUID
        # Axial phantom: the contour's z is the z of the frame it references.
        assert float(contour.ContourData[2]) == pytest.approx(heights[int(image.ReferencedFrameNumber)], abs=1e-3)
