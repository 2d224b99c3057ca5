"""DICOM RTSTRUCT in and out (cipa_bundle.io.rtstruct).

Expected masks are computed here from coordinates (which voxel centres lie inside which rectangle or triangle), not
with scikit-image, so the voxel-centre and even-odd rules are checked independently of the rasteriser. Contour
points are placed with the DICOM definition of a pixel's position (IPP + i * column spacing * row cosine + j * row
spacing * column cosine), not with the reader's affine.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

from cipa_bundle.synthetic.phantom import make_phantom_case
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.dicom import DicomSeries, read_series
from cipa_bundle.io.rtstruct import (
    RTSTRUCT_SOP_CLASS_UID,
    RtStructError,
    list_rois,
    read_rtstruct_mask,
    write_rtstruct,
)

STS_PATIENTS = [f"STS_00{n}" for n in range(2, 10)]
SLICE = 10  # the phantom slice the hand-built contours are drawn on


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """2 |A & B| / (|A| + |B|), 1.0 for two empty masks."""
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def index_to_lps(ds: Dataset, ij: np.ndarray) -> np.ndarray:
    """``(N, 2)`` continuous (i, j) = (column, row) indices on the slice ``ds`` -> ``(N, 3)`` LPS mm (PS3.3
    C.7.6.2.1.1)."""
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    iop = np.array([float(v) for v in ds.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)
    ij = np.asarray(ij, dtype=np.float64)
    return ipp + ij[:, :1] * column_spacing * iop[:3] + ij[:, 1:] * row_spacing * iop[3:]


def rectangle(i0: float, i1: float, j0: float, j1: float) -> np.ndarray:
    """Corners of an axis-aligned rectangle in (i, j), all drawn in the same (counter-clockwise) direction."""
    return np.array([[i0, j0], [i1, j0], [i1, j1], [i0, j1]])


def contour_item(ds: Dataset, points_lps: np.ndarray, kind: str = "CLOSED_PLANAR") -> Dataset:
    item = Dataset()
    ref = Dataset()
    ref.ReferencedSOPClassUID = ds.SOPClassUID
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    item.ContourImageSequence = DicomSequence([ref])
    item.ContourGeometricType = kind
    item.NumberOfContourPoints = len(points_lps)
    item.ContourData = [f"{v:.6f}" for v in np.asarray(points_lps).ravel()]
    return item


def edited(src: Path, dst: Path, edit: Callable[[Dataset], None]) -> Path:
    """A copy of the RTSTRUCT ``src`` at ``dst`` after ``edit`` changed it in place."""
    ds = pydicom.dcmread(src)
    edit(ds)
    ds.save_as(dst, enforce_file_format=True)
    return dst


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def phantom(tmp_path_factory) -> tuple[DicomSeries, np.ndarray]:
    """The small phantom's CT series and its truth mask (bool, [i, j, k] on the CT grid)."""
    case = make_phantom_case(tmp_path_factory.mktemp("rtstruct_phantom"), size="small")
    ct = read_series(case / "dicom" / "ct", modality="CT")
    label = nib.load(case / "label.nii.gz")
    assert np.allclose(label.affine, ct.volume.affine, atol=1e-3), "phantom label and CT grids differ"
    truth = np.asarray(label.dataobj) > 0
    assert truth.shape == ct.volume.shape == (64, 64, 32) and truth.any()
    return ct, truth


@pytest.fixture(scope="module")
def written(phantom, tmp_path_factory) -> Path:
    """The phantom truth written as an RTSTRUCT."""
    import datetime as dt

    ct, truth = phantom
    out = tmp_path_factory.mktemp("rtstruct_out") / "sub" / "rtstruct.dcm"
    when = dt.datetime(2024, 5, 6, 7, 8, 9)
    assert write_rtstruct(truth, ct.datasets, out, content_datetime=when) == out
    return out


@pytest.fixture(scope="module")
def skeleton(phantom, tmp_path_factory) -> Path:
    """A valid RTSTRUCT with one ROI ("tumor") and no contours, to which tests add hand-made contours."""
    ct, _ = phantom
    out = tmp_path_factory.mktemp("rtstruct_skeleton") / "empty.dcm"
    write_rtstruct(np.zeros(ct.volume.shape, dtype=np.uint8), ct.datasets, out)
    return out


def with_contours(skeleton: Path, dst: Path, items: list[Dataset]) -> Path:
    def edit(ds: Dataset) -> None:
        ds.ROIContourSequence[0].ContourSequence = DicomSequence(items)

    return edited(skeleton, dst, edit)


# ------------------------------------------------------------------------------------------------ 1. writing
def test_written_file_is_a_referencing_rtstruct(phantom, written):
    ct, truth = phantom
    ds = pydicom.dcmread(written)
    assert ds.SOPClassUID == RTSTRUCT_SOP_CLASS_UID == ds.file_meta.MediaStorageSOPClassUID
    assert ds.Modality == "RTSTRUCT"
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert ds.StructureSetDate == "20240506" and ds.StructureSetTime == "070809"
    first = ct.datasets[0]
    assert ds.StudyInstanceUID == first.StudyInstanceUID and ds.PatientID == first.PatientID
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    for keyword in ("PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber",
                    "ReferringPhysicianName", "StudyDate", "StudyTime"):
        assert keyword in ds, keyword  # type 2: present even when empty

    frame = ct.frame_of_reference_uid
    assert frame and ds.FrameOfReferenceUID == frame
    ref_frame = ds.ReferencedFrameOfReferenceSequence[0]
    assert ref_frame.FrameOfReferenceUID == frame
    ref_series = ref_frame.RTReferencedStudySequence[0].RTReferencedSeriesSequence[0]
    assert ref_series.SeriesInstanceUID == ct.series_uid
    ct_uids = [str(d.SOPInstanceUID) for d in ct.datasets]
    assert sorted(str(r.ReferencedSOPInstanceUID) for r in ref_series.ContourImageSequence) == sorted(ct_uids)

    (roi,) = ds.StructureSetROISequence
    assert (roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID, roi.ROIGenerationAlgorithm) == (
        1, "tumor", frame, "AUTOMATIC")
    assert ds.RTROIObservationsSequence[0].RTROIInterpretedType == "GTV"
    (roi_contour,) = ds.ROIContourSequence
    assert roi_contour.ReferencedROINumber == 1
    contours = roi_contour.ContourSequence
    z_by_uid = {str(d.SOPInstanceUID): float(d.ImagePositionPatient[2]) for d in ct.datasets}
    slices_with_tumour = {k for k in range(truth.shape[2]) if truth[:, :, k].any()}
    referenced_slices = set()
    for contour in contours:
        assert contour.ContourGeometricType == "CLOSED_PLANAR"
        points = np.array(contour.ContourData, dtype=float).reshape(-1, 3)
        assert len(points) == contour.NumberOfContourPoints >= 3
        (image,) = contour.ContourImageSequence
        uid = str(image.ReferencedSOPInstanceUID)
        assert uid in z_by_uid
        # The contour lies exactly in the plane of the slice it references.
        np.testing.assert_allclose(points[:, 2], z_by_uid[uid], atol=1e-4)
        referenced_slices.add(ct_uids.index(uid))
        raw = contour["ContourData"].value
        assert all(len(str(v)) <= 16 for v in raw)
    assert referenced_slices == slices_with_tumour


def test_written_file_reads_back_to_the_truth(phantom, written):
    ct, truth = phantom
    mask = read_rtstruct_mask(written, ct)
    assert mask.dtype == np.uint8 and mask.shape == truth.shape
    assert set(np.unique(mask)) <= {0, 1}
    assert dice(mask, truth) >= 0.98
    # Marching-squares contours never pass through a voxel centre, so the round trip is exact.
    assert np.array_equal(mask > 0, truth)
    assert list_rois(written) == ["tumor"]
    assert np.array_equal(read_rtstruct_mask(written, ct, roi="tumor"), mask)


def test_round_trip_of_holes_islands_and_edges(phantom, tmp_path):
    """Shapes the phantom lacks: a ring with an island in its hole, a diagonal chain, voxels on the grid border."""
    ct, _ = phantom
    mask = np.zeros(ct.volume.shape, dtype=bool)
    mask[10:30, 12:40, 5] = True
    mask[14:26, 18:34, 5] = False
    mask[18:22, 24:28, 5] = True
    for n in range(8):  # touching only at corners
        mask[40 + n, 40 + n, 6] = True
    mask[0:3, :, 7] = True  # the first columns, every row
    mask[63, 63, 8] = True
    out = write_rtstruct(mask, ct.datasets, tmp_path / "shapes.dcm")
    assert np.array_equal(read_rtstruct_mask(out, ct) > 0, mask)


def test_empty_mask_gives_an_rtstruct_without_contours(phantom, skeleton):
    ct, _ = phantom
    ds = pydicom.dcmread(skeleton)
    assert ds.StructureSetROISequence[0].ROIName == "tumor"
    assert "ContourSequence" not in ds.ROIContourSequence[0]
    with pytest.warns(UserWarning, match="no contour"):
        mask = read_rtstruct_mask(skeleton, ct)
    assert mask.shape == ct.volume.shape and not mask.any()


def test_writer_refuses_bad_masks_and_headers(phantom, tmp_path):
    ct, truth = phantom
    out = tmp_path / "bad.dcm"
    with pytest.raises(RtStructError, match=r"shape \(64, 64, 31\).*\(64, 64, 32\)"):
        write_rtstruct(truth[:, :, 1:], ct.datasets, out)
    with pytest.raises(RtStructError, match="binary"):
        write_rtstruct(truth.astype(np.float32) * 0.7, ct.datasets, out)
    with pytest.raises(RtStructError, match="empty"):
        write_rtstruct(truth, [], out)
    with pytest.raises(RtStructError, match=r"ROIName \(3006,0026\)"):
        write_rtstruct(truth, ct.datasets, out, roi_name="x" * 65)
    broken = list(ct.datasets)
    broken[3] = copy.deepcopy(broken[3])
    del broken[3].FrameOfReferenceUID
    with pytest.raises(RtStructError, match="FrameOfReferenceUID is missing"):
        write_rtstruct(truth, broken, out)
    assert not out.exists() and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ 2. hand-built
def test_even_odd_and_voxel_centre_rules(phantom, skeleton, tmp_path):
    ct, _ = phantom
    ds_k = ct.datasets[SLICE]
    outer = rectangle(10.5, 20.5, 5.2, 25.7)  # centres i 11..20, j 6..25
    hole = rectangle(12.5, 18.5, 9.5, 21.5)  # same direction as outer: a nonzero-winding fill would not cut it
    island = rectangle(14.5, 16.5, 13.5, 17.5)
    triangle = np.array([[29.7, 29.6], [40.3, 29.6], [29.7, 40.3]])  # on the next slice
    items = [contour_item(ds_k, index_to_lps(ds_k, p)) for p in (outer, hole, island)]
    items.append(contour_item(ct.datasets[SLICE + 1], index_to_lps(ct.datasets[SLICE + 1], triangle)))
    path = with_contours(skeleton, tmp_path / "ring.dcm", items)

    ii, jj = np.meshgrid(np.arange(64), np.arange(64), indexing="ij")

    def inside(rect: np.ndarray) -> np.ndarray:
        (i0, j0), (i1, j1) = rect.min(axis=0), rect.max(axis=0)
        return (ii > i0) & (ii < i1) & (jj > j0) & (jj < j1)

    expected = np.zeros(ct.volume.shape, dtype=bool)
    expected[:, :, SLICE] = inside(outer) & ~(inside(hole) & ~inside(island))
    # Triangle: right of i = 29.7, above j = 29.6, on the vertex side of the hypotenuse.
    (a_i, a_j), (b_i, b_j) = triangle[1], triangle[2]
    side = (b_i - a_i) * (jj - a_j) - (b_j - a_j) * (ii - a_i)
    side_of_vertex = (b_i - a_i) * (triangle[0, 1] - a_j) - (b_j - a_j) * (triangle[0, 0] - a_i)
    assert np.abs(side).min() > 1e-6  # no centre on the hypotenuse: the expectation is unambiguous
    expected[:, :, SLICE + 1] = (ii > 29.7) & (jj > 29.6) & (np.sign(side) == np.sign(side_of_vertex))

    mask = read_rtstruct_mask(path, ct)
    assert np.array_equal(mask > 0, expected)
    ring = mask[:, :, SLICE]
    assert ring[11:21, 6:26].sum() == ring.sum() == 10 * 20 - 6 * 12 + 2 * 4
    assert ring[11, 6] and ring[20, 25] and not ring[10, 6] and not ring[11, 5] and not ring[21, 25]
    assert not ring[13, 10] and ring[15, 14] and ring[16, 17]


def test_contours_snap_to_the_nearest_slice_within_tolerance(phantom, skeleton, tmp_path):
    ct, _ = phantom
    spacing = float(ct.volume.spacing[2])
    ds_k = ct.datasets[SLICE]
    square = index_to_lps(ds_k, rectangle(20.5, 23.5, 20.5, 23.5))
    square[:, 2] += 0.08 * spacing  # within 10 % of the spacing: this slice, not the next
    mask = read_rtstruct_mask(with_contours(skeleton, tmp_path / "near.dcm", [contour_item(ds_k, square)]), ct)
    assert mask.sum() == 9 and mask[21:24, 21:24, SLICE].all()


# ------------------------------------------------------------------------------------------------ 3. refusals
def test_frame_of_reference_mismatch_names_both_uids(phantom, written, tmp_path):
    ct, _ = phantom
    other = "1.2.826.0.1.3680043.8.498.1"

    def roi_uid(ds: Dataset) -> None:
        ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID = other

    with pytest.raises(RtStructError, match=r"\(3006,0024\)") as err:
        read_rtstruct_mask(edited(written, tmp_path / "for.dcm", roi_uid), ct)
    assert other in str(err.value) and ct.frame_of_reference_uid in str(err.value)
    assert str(tmp_path / "for.dcm") in str(err.value)

    def sequence_uid(ds: Dataset) -> None:
        del ds.StructureSetROISequence[0].ReferencedFrameOfReferenceUID
        ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = other

    with pytest.raises(RtStructError, match=r"\(3006,0010\)") as err:
        read_rtstruct_mask(edited(written, tmp_path / "for2.dcm", sequence_uid), ct)
    assert other in str(err.value) and ct.frame_of_reference_uid in str(err.value)


def test_roi_selection(phantom, written, tmp_path):
    ct, truth = phantom

    def add_roi(ds: Dataset) -> None:
        second = Dataset()
        second.ROINumber = 2
        second.ReferencedFrameOfReferenceUID = ds.FrameOfReferenceUID
        second.ROIName = "lung"
        second.ROIGenerationAlgorithm = "MANUAL"
        ds.StructureSetROISequence.append(second)

    path = edited(written, tmp_path / "two.dcm", add_roi)
    assert list_rois(path) == ["tumor", "lung"]
    with pytest.raises(RtStructError, match=r"2 ROIs \['tumor', 'lung'\].*--roi NAME"):
        read_rtstruct_mask(path, ct)
    with pytest.raises(RtStructError, match=r"no ROI named 'heart'.*\['tumor', 'lung'\]"):
        read_rtstruct_mask(path, ct, roi="heart")
    assert np.array_equal(read_rtstruct_mask(path, ct, roi="tumor") > 0, truth)
    with pytest.warns(UserWarning, match="'lung'.*no contour"):
        assert not read_rtstruct_mask(path, ct, roi="lung").any()

    def no_roi(ds: Dataset) -> None:
        ds.StructureSetROISequence = DicomSequence([])

    path = edited(written, tmp_path / "none.dcm", no_roi)
    assert list_rois(path) == []
    with pytest.raises(RtStructError, match=r"\(3006,0020\) holds no ROI"):
        read_rtstruct_mask(path, ct)


def test_not_an_rtstruct(phantom, tmp_path):
    ct, _ = phantom
    ct_file = ct.files[0]
    with pytest.raises(RtStructError) as err:
        read_rtstruct_mask(ct_file, ct)
    message = str(err.value)
    assert str(ct_file) in message and "Modality (0008,0060) is 'CT'" in message and "SOPClassUID" in message
    assert isinstance(err.value, CipaInputError)
    with pytest.raises(RtStructError, match="RTSTRUCT"):
        list_rois(ct_file)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(RtStructError, match=str(junk)):
        list_rois(junk)


def test_contours_off_the_slice_planes_are_refused(phantom, skeleton, tmp_path):
    ct, _ = phantom
    spacing = float(ct.volume.spacing[2])
    ds_k = ct.datasets[SLICE]
    square = index_to_lps(ds_k, rectangle(20.5, 23.5, 20.5, 23.5))
    good = contour_item(ds_k, square)

    between = square.copy()
    between[:, 2] += 0.3 * spacing
    path = with_contours(skeleton, tmp_path / "between.dcm", [good, contour_item(ds_k, between)])
    z = f"{between[0, 2]:.3f}"
    with pytest.raises(RtStructError, match=rf"contour #2 lies at z = {z} mm.*slice k={SLICE}"):
        read_rtstruct_mask(path, ct)

    tilted = square.copy()
    tilted[2, 2] += 0.5 * spacing
    with pytest.raises(RtStructError, match=r"contour #1 lies at .*\.\..* along the slice normal"):
        read_rtstruct_mask(with_contours(skeleton, tmp_path / "tilted.dcm", [contour_item(ds_k, tilted)]), ct)

    beyond = square.copy()
    beyond[:, 2] = float(ct.datasets[-1].ImagePositionPatient[2]) + 3 * spacing
    with pytest.raises(RtStructError, match="outside the CT's slices"):
        read_rtstruct_mask(with_contours(skeleton, tmp_path / "beyond.dcm", [contour_item(ds_k, beyond)]), ct)


def test_malformed_and_non_area_contours(phantom, skeleton, tmp_path):
    ct, _ = phantom
    ds_k = ct.datasets[SLICE]
    square = index_to_lps(ds_k, rectangle(20.5, 23.5, 20.5, 23.5))

    short = contour_item(ds_k, square)
    short.ContourData = short.ContourData[:-1]
    short.NumberOfContourPoints = 4
    with pytest.raises(RtStructError, match=r"ContourData \(3006,0050\) holds 11 values; expected .*multiple of 3"):
        read_rtstruct_mask(with_contours(skeleton, tmp_path / "short.dcm", [short]), ct)

    miscounted = contour_item(ds_k, square)
    miscounted.NumberOfContourPoints = 5
    with pytest.raises(RtStructError, match=r"NumberOfContourPoints \(3006,0046\) is 5 .* 4 points"):
        read_rtstruct_mask(with_contours(skeleton, tmp_path / "count.dcm", [miscounted]), ct)

    line = contour_item(ds_k, square[:2], kind="OPEN_PLANAR")
    point = contour_item(ds_k, square[:1], kind="POINT")
    with pytest.raises(RtStructError, match=r"none of its 2 contours is usable.*CLOSED_PLANAR"):
        read_rtstruct_mask(with_contours(skeleton, tmp_path / "open.dcm", [line, point]), ct)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mask = read_rtstruct_mask(
            with_contours(skeleton, tmp_path / "mixed.dcm", [line, contour_item(ds_k, square), point]), ct
        )
    assert mask.sum() == 9
    messages = " ".join(str(w.message) for w in caught)
    assert "'tumor'" in messages and "OPEN_PLANAR" in messages and "POINT" in messages


# ------------------------------------------------------------------------------------------------ 4. real data
@pytest.mark.parametrize("patient", STS_PATIENTS)
def test_real_rtstruct_matches_mirp_mask(shared_real, patient):
    base = shared_real / "sts" / patient
    if not (base / "CT" / "mask" / "RS.dcm").exists():
        pytest.skip(f"{base}/CT/mask/RS.dcm not found")
    ct = read_series(base / "CT" / "image", modality="CT")
    reference = nib.load(base / "nifti" / "CT_mask.nii.gz")
    # Compare arrays only on the same grid: both are [i, j, k] with a RAS affine.
    assert np.allclose(ct.volume.affine, reference.affine, atol=1e-3)
    assert list_rois(base / "CT" / "mask" / "RS.dcm") == ["GTV_Mass_CT"]
    mask = read_rtstruct_mask(base / "CT" / "mask" / "RS.dcm", ct)
    truth = np.asarray(reference.dataobj) > 0
    assert truth.any() and mask.shape == truth.shape
    assert dice(mask, truth) >= 0.98


def test_real_round_trip(shared_real, tmp_path):
    base = shared_real / "sts" / "STS_007"  # two separate contours on some slices
    if not base.exists():
        pytest.skip(f"{base} not found")
    ct = read_series(base / "CT" / "image", modality="CT")
    mask = read_rtstruct_mask(base / "CT" / "mask" / "RS.dcm", ct)
    out = write_rtstruct(mask, ct.datasets, tmp_path / "rs.dcm", roi_name="GTV")
    again = read_rtstruct_mask(out, ct, roi="GTV")
    assert dice(again, mask) >= 0.98
    assert np.array_equal(again, mask)
