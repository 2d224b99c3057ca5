"""DICOM SEG writer/reader: references to the CT series, exact frame <-> slice mapping, geometry, coding, atomicity.

The CT series is written to disk with the project's DICOM writer and read back with pydicom, as the inference
pipeline does. The SEG is then checked twice: through highdicom and through plain pydicom (walking the per-frame
functional groups by hand), so a bug shared by our code and highdicom's reader would still show.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

import cipa_bundle
from cipa_bundle.errors import CipaInputError
from cipa_bundle.synthetic.dicom_writer import write_image_series
from cipa_bundle.io.seg import SEG_SOP_CLASS_UID, read_dicom_seg_mask, write_dicom_seg

# Tiny, deliberately non-square grid (I != J) so a transposed frame cannot have the right shape by accident.
SHAPE = (7, 5, 4)

#: Two storage orders of a CT series: the usual one (i -> patient left, j -> posterior, k -> head) and one with k
#: running head-to-feet and i running to the patient's right, so slice order != position order on at least one.
AFFINES = {
    "k_to_head": np.array([[-0.8, 0, 0, 10.0], [0, -0.9, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]]),
    "k_to_feet": np.array([[0.8, 0, 0, -14.0], [0, -0.9, 0, 20.0], [0, 0, -2.5, 30.0], [0, 0, 0, 1]]),
}


def _known_mask() -> np.ndarray:
    """An asymmetric (I, J, K) mask: slice 0 empty, two shapes on slice 1, one voxel on slice 2, a corner on 3."""
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[1:4, 2:4, 1] = 1
    mask[6, 0, 1] = 1
    mask[0, 4, 2] = 1
    mask[5, 0, 3] = 1
    return mask


@pytest.fixture(params=sorted(AFFINES))
def ct_series(request, tmp_path: Path) -> list[pydicom.Dataset]:
    """A 4-slice CT series on disk, headers read back in k order (as the reader returns them)."""
    values = np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE) - 500.0
    paths = write_image_series(values, AFFINES[request.param], tmp_path / "ct", "CT", uid_seed=f"seg-{request.param}")
    return [pydicom.dcmread(p) for p in paths]


def _frames_by_pydicom(path: Path) -> tuple[pydicom.Dataset, np.ndarray]:
    """The SEG dataset and its frames as ``(n_frames, rows, columns)`` using pydicom only."""
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array
    if frames.ndim == 2:  # pydicom drops the frame axis of a single-frame object
        frames = frames[None]
    return ds, frames


def test_seg_references_ct_and_frames_equal_mask(ct_series: list[pydicom.Dataset], tmp_path: Path) -> None:
    mask = _known_mask()
    out = write_dicom_seg(mask, ct_series, tmp_path / "out" / "seg.dcm")
    assert out == tmp_path / "out" / "seg.dcm"
    assert sorted(p.name for p in out.parent.iterdir()) == ["seg.dcm"]  # no temporary file left behind

    ds, frames = _frames_by_pydicom(out)
    ct_uids = [str(c.SOPInstanceUID) for c in ct_series]
    k_of_uid = {uid: k for k, uid in enumerate(ct_uids)}

    # Series- and study-level references.
    assert ds.SOPClassUID == SEG_SOP_CLASS_UID
    assert ds.Modality == "SEG"
    assert ds.StudyInstanceUID == ct_series[0].StudyInstanceUID
    assert ds.FrameOfReferenceUID == ct_series[0].FrameOfReferenceUID
    assert ds.SeriesInstanceUID != ct_series[0].SeriesInstanceUID
    (ref_series,) = ds.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == ct_series[0].SeriesInstanceUID
    assert {str(item.ReferencedSOPInstanceUID) for item in ref_series.ReferencedInstanceSequence} == set(ct_uids)

    # Frame by frame, by hand: the referenced CT slice, its pixels and its position.
    non_empty = [k for k in range(SHAPE[2]) if mask[:, :, k].any()]
    assert int(ds.NumberOfFrames) == len(non_empty) == frames.shape[0]
    seen = []
    for f, group in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = str(group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        k = k_of_uid[uid]
        seen.append(k)
        np.testing.assert_array_equal(frames[f], mask[:, :, k].T)  # DICOM frame = (rows=j, columns=i)
        np.testing.assert_allclose(
            [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in ct_series[k].ImagePositionPatient],
            atol=1e-4,
        )
    assert sorted(seen) == non_empty
    shared = ds.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in ct_series[0].ImageOrientationPatient],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
        [float(v) for v in ct_series[0].PixelSpacing],
    )

    # The same content through highdicom's reader.
    seg = hd.seg.segread(out)
    pixels = seg.get_pixels_by_source_instance(ct_uids, segment_numbers=[1], assert_missing_frames_are_empty=True)
    np.testing.assert_array_equal(pixels[..., 0], mask.transpose(2, 1, 0))

    # And through our reader, onto the (I, J, K) grid.
    back = read_dicom_seg_mask(out, ct_series)
    assert back.shape == SHAPE and back.dtype == np.uint8
    np.testing.assert_array_equal(back, mask)


def test_segment_description_is_coded(ct_series: list[pydicom.Dataset], tmp_path: Path) -> None:
    out = write_dicom_seg(_known_mask(), ct_series, tmp_path / "seg.dcm", label_name="tumor")
    ds = pydicom.dcmread(out)
    (segment,) = ds.SegmentSequence
    assert segment.SegmentLabel == "tumor"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "49755003")
    prop = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (prop.CodingSchemeDesignator, prop.CodeValue, prop.CodeMeaning) == ("SCT", "372087000", "Neoplasm, Primary")
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "CIPA"
    assert algorithm.AlgorithmVersion == cipa_bundle.__version__
    assert ds.SegmentationType == "BINARY"
    assert ds.ContentQualification == "RESEARCH"


def test_missing_type2_patient_tags_are_tolerated_without_touching_input(
    ct_series: list[pydicom.Dataset], tmp_path: Path
) -> None:
    for ds in ct_series:  # anonymisers drop Type-2 tags; highdicom needs them present
        for keyword in ("PatientSex", "PatientBirthDate"):
            if keyword in ds:
                delattr(ds, keyword)
    out = write_dicom_seg(_known_mask(), ct_series, tmp_path / "seg.dcm")
    seg = pydicom.dcmread(out)
    assert seg.PatientSex == "" and seg.PatientID == ct_series[0].PatientID
    assert all("PatientSex" not in ds for ds in ct_series)


def test_empty_mask_round_trips_as_empty(ct_series: list[pydicom.Dataset], tmp_path: Path) -> None:
    out = write_dicom_seg(np.zeros(SHAPE, dtype=bool), ct_series, tmp_path / "seg.dcm")
    _, frames = _frames_by_pydicom(out)
    assert frames.shape[0] >= 1 and not frames.any()
    back = read_dicom_seg_mask(out, ct_series)
    assert back.shape == SHAPE and not back.any()


def test_bad_masks_are_refused_and_nothing_is_written(ct_series: list[pydicom.Dataset], tmp_path: Path) -> None:
    out = tmp_path / "seg.dcm"
    with pytest.raises(CipaInputError, match=r"shape \(5, 7, 4\)"):
        write_dicom_seg(np.zeros((5, 7, 4), np.uint8), ct_series, out)  # (J, I, K): the transposition mistake
    probabilities = _known_mask().astype(np.float32) * 0.7
    with pytest.raises(CipaInputError, match="binary"):
        write_dicom_seg(probabilities, ct_series, out)
    with pytest.raises(CipaInputError, match="empty"):
        write_dicom_seg(_known_mask(), [], out)
    assert list(tmp_path.glob("seg.dcm*")) == [] and list(tmp_path.glob(".seg.dcm*")) == []


def test_reading_against_another_series_is_refused(ct_series: list[pydicom.Dataset], tmp_path: Path) -> None:
    out = write_dicom_seg(_known_mask(), ct_series, tmp_path / "seg.dcm")
    other_paths = write_image_series(
        np.zeros(SHAPE), AFFINES["k_to_head"], tmp_path / "other", "CT", uid_seed="another-patient"
    )
    other = [pydicom.dcmread(p, stop_before_pixels=True) for p in other_paths]
    with pytest.raises(CipaInputError, match="not in the given CT series"):
        read_dicom_seg_mask(out, other)
    with pytest.raises(CipaInputError, match="not a readable DICOM Segmentation|SOPClassUID"):
        read_dicom_seg_mask(other_paths[0], ct_series)


def test_a_seg_without_spatial_locations_preserved_is_read_where_its_frames_lie(
    ct_series: list[pydicom.Dataset], tmp_path: Path
) -> None:
    """dcmqi (MONAI Label's DICOMweb datastore, 3D Slicer) leaves SpatialLocationsPreserved out of its SEGs."""
    written = write_dicom_seg(_known_mask(), ct_series, tmp_path / "seg.dcm")
    ds = pydicom.dcmread(written)
    for item in ds.PerFrameFunctionalGroupsSequence:
        del item.DerivationImageSequence[0].SourceImageSequence[0].SpatialLocationsPreserved
    unstated = tmp_path / "unstated.dcm"
    ds.save_as(unstated, enforce_file_format=True)
    assert np.array_equal(read_dicom_seg_mask(unstated, ct_series), _known_mask())

    # The same SEG with one frame moved off its slice by 1 mm: the positions no longer back the reference.
    moved = pydicom.dcmread(unstated)
    position = moved.PerFrameFunctionalGroupsSequence[1].PlanePositionSequence[0]
    position.ImagePositionPatient = [float(v) + (1.0 if n == 2 else 0.0)
                                     for n, v in enumerate(position.ImagePositionPatient)]
    moved.save_as(tmp_path / "moved.dcm", enforce_file_format=True)
    with pytest.raises(CipaInputError, match=r"moved.dcm: frame 2 lies at ImagePositionPatient .* but references CT "
                                             r"instance .*SpatialLocationsPreserved is not stated"):
        read_dicom_seg_mask(tmp_path / "moved.dcm", ct_series)
