"""DICOM series writing and reading, and the atomic NIfTI/JSON writers.

Geometry is checked against numbers worked out by hand from the DICOM definition (patient point =
IPP + i x column spacing x row cosine + j x row spacing x column cosine, in LPS), never against the reader's own
affine, and in every representation the project hands on: ``Volume``, a NIfTI file read back by nibabel, an ITK
image and a MONAI ``MetaTensor``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage

from cipa_bundle.io import dicom
from cipa_bundle.synthetic.dicom_writer import pet_header, write_image_series
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.nifti import json_ready, json_text, save_json, save_nifti, save_nifti_with_sidecar, sidecar_path

# An oblique-in-plane, feet-first-like geometry: rows rotated 30 degrees about z, slices written top-down.
COS, SIN = math.cos(math.radians(30)), math.sin(math.radians(30))
ROW_LPS = np.array([COS, SIN, 0.0])  # direction of increasing column index i
COL_LPS = np.array([-SIN, COS, 0.0])  # direction of increasing row index j
NORMAL_LPS = np.cross(ROW_LPS, COL_LPS)  # = +z (superior)
SPACING = (0.8, 1.25, 2.5)  # i (column spacing), j (row spacing), slice gap, mm
ORIGIN_LPS = np.array([-120.0, 35.5, 400.0])


def lps_affine(k_sign: float = 1.0) -> np.ndarray:
    """The RAS affine the writer receives, built by hand from the LPS directions above."""
    lps = np.eye(4)
    lps[:3, 0] = ROW_LPS * SPACING[0]
    lps[:3, 1] = COL_LPS * SPACING[1]
    lps[:3, 2] = NORMAL_LPS * SPACING[2] * k_sign
    lps[:3, 3] = ORIGIN_LPS
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def ramp(shape: tuple[int, int, int] = (5, 4, 6)) -> np.ndarray:
    """Voxel value 100 i + 10 j + k: every voxel is identifiable."""
    i, j, k = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    return (100 * i + 10 * j + k).astype(np.float64)


# ------------------------------------------------------------------------------------------------ writer
def test_writer_part10_files_and_tags(tmp_path: Path) -> None:
    paths = write_image_series(ramp(), lps_affine(), tmp_path, "CT", uid_seed="s1")
    assert len(paths) == 6 and all(p.exists() for p in paths)
    assert not list(tmp_path.glob(".*"))  # no temporaries left
    raw = paths[2].read_bytes()
    assert raw[128:132] == b"DICM"
    ds = pydicom.dcmread(paths[2])
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert ds.SOPClassUID == CTImageStorage == ds.file_meta.MediaStorageSOPClassUID
    assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
    # IOP, IPP, PixelSpacing and SliceThickness by hand.
    np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], [COS, SIN, 0, -SIN, COS, 0], atol=1e-12)
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], ORIGIN_LPS + [0, 0, 2 * 2.5], atol=1e-9)
    assert [float(v) for v in ds.PixelSpacing] == [1.25, 0.8]
    assert float(ds.SliceThickness) == 2.5
    assert (ds.Rows, ds.Columns) == (4, 5)
    # HU = stored + (-1024): pixel (row j=3, column i=1) of slice 2 holds 100*1 + 10*3 + 2.
    assert int(ds.pixel_array[3, 1]) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) == 132.0

    pet = write_image_series(ramp(), lps_affine(), tmp_path / "pt", "PT", uid_seed="s1", header=pet_header())
    pds = pydicom.dcmread(pet[0])
    assert pds.SOPClassUID == PositronEmissionTomographyImageStorage
    assert pds.StudyInstanceUID == ds.StudyInstanceUID and pds.FrameOfReferenceUID == ds.FrameOfReferenceUID
    assert pds.SeriesInstanceUID != ds.SeriesInstanceUID
    assert float(pds.PatientWeight) == 70.0 and pds.Units == "BQML"


def test_writer_is_deterministic(tmp_path: Path) -> None:
    def blob(folder: Path, seed: str) -> bytes:
        paths = write_image_series(ramp(), lps_affine(), folder, "PT", uid_seed=seed, header=pet_header(),
                                   series_datetime=dt.datetime(2023, 5, 6, 7, 8, 9))
        return b"".join(p.read_bytes() for p in paths)

    assert blob(tmp_path / "a", "seed") == blob(tmp_path / "b", "seed")
    assert blob(tmp_path / "a", "seed") != blob(tmp_path / "c", "other")


def test_writer_refuses_values_that_do_not_fit(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int16"):
        write_image_series(np.full((2, 2, 2), 40000.0), np.eye(4), tmp_path, "CT", uid_seed="x")
    assert not any(tmp_path.iterdir())  # nothing, not even the first slice


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("k_sign", [1.0, -1.0])
def test_known_voxel_maps_to_known_patient_point_everywhere(tmp_path: Path, k_sign: float) -> None:
    """A voxel's value and patient coordinate agree in DICOM, Volume, NIfTI, ITK and MetaTensor."""
    import itk
    import torch

    values = ramp()
    order = list(range(6))[::-1]
    # Files named in scrambled order and InstanceNumber running backwards: only the positions may decide.
    names = {k: f"img_{(7 * k + 3) % 6}.dcm" for k in range(6)}
    write_image_series(values, lps_affine(k_sign), tmp_path / "ct", "CT", uid_seed="geo",
                       per_slice=lambda k, ds: setattr(ds, "InstanceNumber", order[k] + 1),
                       filename_pattern="{k}.tmpname")
    for k in range(6):
        os.replace(tmp_path / "ct" / f"{k}.tmpname", tmp_path / "ct" / names[k])
    series = dicom.read_series(tmp_path / "ct")
    vol = series.volume

    # The written voxel (i, j, kw) = (3, 2, 4): its DICOM file and its patient point by hand.
    i, j, kw = 3, 2, 4
    written = dicom.pydicom.dcmread(tmp_path / "ct" / names[kw])
    ipp = np.array([float(v) for v in written.ImagePositionPatient])
    expected_lps = ipp + i * SPACING[0] * ROW_LPS + j * SPACING[1] * COL_LPS
    expected_ras = expected_lps * [-1, -1, 1]
    value = values[i, j, kw]
    assert int(written.pixel_array[j, i]) - 1024 == value

    # The reader sorts along +normal, so a top-down write (k_sign=-1) comes back reversed.
    k = kw if k_sign > 0 else 5 - kw
    assert vol.array[i, j, k] == value
    np.testing.assert_allclose(vol.index_to_ras([i, j, k]), expected_ras, atol=1e-6)
    assert [p.name for p in series.files][k] == names[kw]

    nii_path = save_nifti(vol, tmp_path / "ct.nii.gz")
    nii = nib.load(str(nii_path))
    assert np.asarray(nii.dataobj)[i, j, k] == value
    np.testing.assert_allclose(nii.affine @ [i, j, k, 1], [*expected_ras, 1], atol=1e-4)
    np.testing.assert_allclose(nii.get_qform() @ [i, j, k, 1], [*expected_ras, 1], atol=1e-4)

    image = vol.to_itk()
    assert itk.array_view_from_image(image)[k, j, i] == value
    np.testing.assert_allclose(list(image.TransformIndexToPhysicalPoint([i, j, k])), expected_lps, atol=1e-6)

    mt = vol.to_metatensor()
    assert mt[0, i, j, k].item() == value
    np.testing.assert_allclose((mt.affine @ torch.tensor([i, j, k, 1.0], dtype=mt.affine.dtype))[:3].numpy(),
                               expected_ras, atol=1e-5)


def test_pet_per_instance_slopes_are_applied(tmp_path: Path) -> None:
    stored = np.stack([np.full((3, 2), 1000), np.full((3, 2), 1000), np.full((3, 2), -7)], axis=-1).astype(np.int16)
    write_image_series(stored, np.diag([-2.0, -2.0, 2.0, 1.0]), tmp_path, "PT", uid_seed="p", stored_values=True,
                       rescale_slopes=[2.5, 0.5, 3.0], header=pet_header())
    vol = dicom.read_series(tmp_path).volume
    assert vol.array.dtype == np.float32
    assert vol.array[:, :, 0].tolist() == [[2500.0] * 2] * 3
    assert vol.array[:, :, 1].tolist() == [[500.0] * 2] * 3
    assert vol.array[:, :, 2].tolist() == [[-21.0] * 2] * 3  # PET keeps negatives (no air clamp)


def test_ct_padding_and_below_air_become_air(tmp_path: Path) -> None:
    stored = np.zeros((4, 1, 2), dtype=np.int16)
    stored[:, 0, 0] = [-2000, -1100, 0, 1500]
    stored[:, 0, 1] = [24, 1000, 2000, -5]
    write_image_series(stored, np.eye(4), tmp_path / "a", "CT", uid_seed="ct", stored_values=True,
                       header={"PixelPaddingValue": -2000})
    hu = dicom.read_series(tmp_path / "a").volume.array
    # HU = stored - 1024; padding (-3024) and below-air values (-2124, -1029) become -1024, the rest is exact.
    assert hu[:, 0, 0].tolist() == [-1024.0, -1024.0, -1024.0, 476.0]
    assert hu[:, 0, 1].tolist() == [-1000.0, -24.0, 976.0, -1024.0]

    # A padding range (stored 1000..2000, given high-to-low) also catches values far above air.
    write_image_series(stored, np.eye(4), tmp_path / "b", "CT", uid_seed="ct2", stored_values=True,
                       header={"PixelPaddingValue": 2000, "PixelPaddingRangeLimit": 1000})
    hu = dicom.read_series(tmp_path / "b").volume.array
    assert hu[:, 0, 0].tolist() == [-1024.0, -1024.0, -1024.0, -1024.0]
    assert hu[:, 0, 1].tolist() == [-1000.0, -1024.0, -1024.0, -1024.0]


# ------------------------------------------------------------------------------------------------ discovery
def test_find_series_groups_and_skips_non_images(tmp_path: Path) -> None:
    write_image_series(ramp((3, 3, 3)), np.eye(4), tmp_path / "study" / "ct", "CT", uid_seed="d")
    write_image_series(ramp((2, 2, 2)), np.eye(4) * [4, 4, 4, 1], tmp_path / "study" / "deep" / "pet", "PT",
                       uid_seed="d", header=pet_header())
    (tmp_path / "study" / "notes.txt").write_text("not dicom")
    (tmp_path / "study" / "random.dcm").write_bytes(os.urandom(300))
    (tmp_path / "study" / "DICOMDIR").write_bytes(b"\0" * 128 + b"DICM")
    # A DICOM file without an image (e.g. a structured report) must be ignored.
    sr = Dataset()
    sr.SeriesInstanceUID = "1.2.3.4"
    sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"
    sr.SOPInstanceUID = "1.2.3.4.5"
    sr.Modality = "SR"
    sr.file_meta = pydicom.dataset.FileMetaDataset()
    sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dcmwrite(tmp_path / "study" / "report.dcm", sr, enforce_file_format=True)

    groups = dicom.find_series(tmp_path / "study")
    assert sorted(len(v) for v in groups.values()) == [2, 3]
    with pytest.raises(dicom.MultipleSeriesError, match="2 series found"):
        dicom.read_series(tmp_path / "study")
    pet = dicom.read_series(tmp_path / "study", modality="PT")
    assert pet.modality == "PT" and pet.volume.shape == (2, 2, 2)
    ct = dicom.read_series(tmp_path / "study", modality="CT")
    assert ct.frame_of_reference_uid == pet.frame_of_reference_uid
    assert "PixelData" not in ct.datasets[0]
    with pytest.raises(dicom.NoSeriesFoundError, match="Modality=MR"):
        dicom.read_series(tmp_path / "study", modality="MR")
    with pytest.raises(dicom.NoSeriesFoundError, match="not a directory"):
        dicom.read_series(tmp_path / "missing")


# ------------------------------------------------------------------------------------------------ bad geometry
def _write(tmp_path: Path, affine: np.ndarray | None = None, per_slice=None, shape=(3, 3, 4)) -> Path:  # noqa: ANN001
    folder = tmp_path / "s"
    write_image_series(ramp(shape), np.diag([-1.0, -1.0, 2.0, 1.0]) if affine is None else affine, folder, "CT",
                       uid_seed="bad", per_slice=per_slice)
    return folder


def test_gantry_tilt_rejected(tmp_path: Path) -> None:
    sheared = np.diag([-1.0, -1.0, 2.0, 1.0])
    sheared[1, 2] = 2.0 * math.tan(math.radians(15))  # k steps drift along y: a 15 degree tilt
    with pytest.raises(dicom.GantryTiltError, match=r"ImagePositionPatient \(0020,0032\).*tilt about 15.00 deg"):
        dicom.read_series(_write(tmp_path, sheared))


def test_gantry_tilt_tag_rejected(tmp_path: Path) -> None:
    folder = _write(tmp_path, per_slice=lambda k, ds: setattr(ds, "GantryDetectorTilt", 12.0))
    with pytest.raises(dicom.GantryTiltError, match=r"GantryDetectorTilt \(0018,1120\) = 12"):
        dicom.read_series(folder)


def test_missing_slice_is_non_uniform_spacing(tmp_path: Path) -> None:
    folder = _write(tmp_path, shape=(3, 3, 5))
    (folder / "CT_0002.dcm").unlink()
    with pytest.raises(dicom.NonUniformSpacingError,
                       match=r"CT_0003.dcm: slice gap 4 mm.*series' spacing 2.8 mm \(least-squares fit\).*missing"):
        dicom.read_series(folder)


def test_two_spacings_in_one_series_are_non_uniform_spacing(tmp_path: Path) -> None:
    # Ten gaps of 1.9 mm, then ten of 2.1 mm: each gap is within 5 % of the fitted 2 mm, but slice 10 lies about 0.52 mm
    # (a quarter of the spacing) below the fitted grid.
    heights = np.concatenate([[0.0], np.cumsum([1.9] * 10 + [2.1] * 10)])

    def drift(k: int, ds: Dataset) -> None:
        ds.ImagePositionPatient = [0.0, 0.0, float(heights[k])]

    with pytest.raises(dicom.NonUniformSpacingError,
                       match=r"CT_0010.dcm: ImagePositionPatient \(0020,0032\) lies -0.52\d* mm .* slice 10's place"):
        dicom.read_series(_write(tmp_path, per_slice=drift, shape=(3, 3, 21)))


def test_multi_bed_junction_jitter_is_accepted_on_the_fitted_grid_and_recorded(tmp_path: Path) -> None:
    # Three beds of 7 slices at 3.27 mm, each bed's positions from its own start (the second 0.05 mm late, the third
    # 0.08 mm early) rounded to 0.01 mm, as a GE Discovery ST writes them.
    starts = [0.0, 7 * 3.27 + 0.05, 14 * 3.27 - 0.08]
    heights = np.round([starts[k // 7] + (k % 7) * 3.27 for k in range(21)], 2)

    def jitter(k: int, ds: Dataset) -> None:
        ds.ImagePositionPatient = [0.0, 0.0, float(heights[k])]

    series = dicom.read_series(_write(tmp_path, per_slice=jitter, shape=(3, 3, 21)))
    # The affine is the least-squares line through the positions (computed here with numpy's lstsq).
    design = np.stack([np.ones(21), np.arange(21.0)], axis=1)
    (start, spacing), *_ = np.linalg.lstsq(design, heights, rcond=None)
    assert series.volume.spacing[2] == pytest.approx(spacing, abs=1e-9)
    k_axis_lps = (np.diag([-1.0, -1.0, 1.0]) @ series.volume.affine[:3, 3])[2]
    assert k_axis_lps == pytest.approx(start, abs=1e-9)
    deviation = np.max(np.abs(heights - (start + spacing * np.arange(21))))
    assert 0.03 < deviation < 0.1
    assert series.volume.meta["slice_position_max_deviation_mm"] == pytest.approx(deviation, abs=1e-9)


@pytest.mark.parametrize(
    ("tag", "vr", "raw", "message"),
    [
        (0x00181120, "DS", b"n/a ", r"GantryDetectorTilt \(0018,1120\) = 'n/a'; expected a finite number"),
        (0x00280008, "IS", b"one ", r"NumberOfFrames \(0028,0008\) = 'one'; expected an integer"),
        (0x00281053, "DS", b"x ", r"RescaleSlope \(0028,1053\) = 'x'; expected a finite number other than 0"),
    ],
)
def test_unreadable_numbers_name_the_file_and_tag(tmp_path: Path, tag: int, vr: str, raw: bytes, message: str) -> None:
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    def spoil(k: int, ds: Dataset) -> None:
        if k == 2:
            ds[Tag(tag)] = RawDataElement(Tag(tag), vr, len(raw), raw, 0, False, True)

    with pytest.raises(dicom.UnsupportedImageError, match="CT_0002.dcm: " + message):
        dicom.read_series(_write(tmp_path, per_slice=spoil))


def test_duplicate_positions_rejected(tmp_path: Path) -> None:
    def dup(k: int, ds: Dataset) -> None:
        if k == 2:
            ds.ImagePositionPatient = [0.0, 0.0, 2.0]  # slice 1's position

    with pytest.raises(dicom.DuplicatePositionError, match="CT_000[12].dcm"):
        dicom.read_series(_write(tmp_path, per_slice=dup))


def test_inconsistent_orientation_rejected(tmp_path: Path) -> None:
    def turn(k: int, ds: Dataset) -> None:
        if k == 3:
            ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]

    with pytest.raises(dicom.InconsistentOrientationError, match=r"CT_0003.dcm: ImageOrientationPatient"):
        dicom.read_series(_write(tmp_path, per_slice=turn))


def test_non_orthogonal_orientation_rejected(tmp_path: Path) -> None:
    folder = _write(tmp_path, per_slice=lambda k, ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0.2, 1, 0]))
    with pytest.raises(dicom.NonOrthogonalOrientationError, match=r"\(0020,0037\)"):
        dicom.read_series(folder)


def test_mixed_sizes_rejected(tmp_path: Path) -> None:
    folder = _write(tmp_path)
    other = tmp_path / "other"
    # Same series UID, a different image size, placed beyond the last slice.
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    affine[2, 3] = 8.0
    write_image_series(ramp((4, 3, 1)), affine, other, "CT", uid_seed="bad", filename_pattern="extra.dcm")
    os.replace(other / "extra.dcm", folder / "extra.dcm")
    with pytest.raises(dicom.MixedImageSizeError, match=r"Rows x Columns.*\(3, 3\), \(3, 4\)"):
        dicom.read_series(folder)


def test_missing_geometry_rejected(tmp_path: Path) -> None:
    folder = _write(tmp_path, per_slice=lambda k, ds: delattr(ds, "ImagePositionPatient") if k == 1 else None)
    with pytest.raises(dicom.MissingGeometryError, match=r"CT_0001.dcm: ImagePositionPatient \(0020,0032\) = None"):
        dicom.read_series(folder)


def test_single_slice_uses_slice_thickness(tmp_path: Path) -> None:
    folder = _write(tmp_path, shape=(3, 3, 1))
    vol = dicom.read_series(folder).volume
    np.testing.assert_allclose(vol.spacing, [1.0, 1.0, 2.0])


# ------------------------------------------------------------------------------------------------ atomic writers
def test_nifti_and_json_writers_are_atomic_and_reproducible(tmp_path: Path) -> None:
    from cipa_bundle.io.volume import Volume

    vol = Volume(ramp((3, 2, 2)).astype(np.float32), np.diag([-2.0, -2.0, 3.0, 1.0]))
    a = save_nifti(vol, tmp_path / "a.nii.gz")
    b = save_nifti(vol, tmp_path / "b.nii.gz")
    assert a.read_bytes() == b.read_bytes()  # gzip without a timestamp
    assert nib.load(str(a)).header.get_xyzt_units() == ("mm", "sec")
    assert save_nifti(vol, tmp_path / "c.nii").read_bytes()[344:348] == b"n+1\0"

    with pytest.raises(ValueError, match=r"\.nii"):
        save_nifti(vol, tmp_path / "d.png")
    with pytest.raises(ValueError):
        save_json({"x": float("nan")}, tmp_path / "nan.json")
    # The one sanitiser: NaN anywhere (numpy or Python, in dicts, lists, arrays) becomes null; keys become text.
    record = {np.int64(3): [np.float32("nan"), 1.5], "a": np.array([np.inf, 2.0]), "p": tmp_path / "q",
              "t": dt.date(2024, 5, 1)}
    assert json_ready(record) == {"3": [None, 1.5], "a": [None, 2.0], "p": str(tmp_path / "q"), "t": "2024-05-01"}
    assert json.loads(json_text(json_ready(record)))["a"] == [None, 2.0]
    with pytest.raises(ValueError):  # a bad sidecar stops the NIfTI too
        save_nifti_with_sidecar(vol, tmp_path / "pair.nii.gz", {"x": float("inf")})
    with pytest.raises(RuntimeError):
        with atomic_outputs([tmp_path / "x.json", tmp_path / "y.json"]) as (tx, ty):
            tx.write_text("{}")
            raise RuntimeError("failure half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nii.gz", "b.nii.gz", "c.nii"]

    nii, side = save_nifti_with_sidecar(vol, tmp_path / "pair.nii.gz", {"factor": np.float64(2.5)})
    assert side == sidecar_path(nii) == tmp_path / "pair.json"
    assert json.loads(side.read_text()) == {"factor": 2.5}


def test_code_strings_reads_one_value_and_several_alike(tmp_path: Path) -> None:
    # Read back from a file, pydicom gives one value as a plain str: iterating it would give letters, and a lone
    # "ATTN" or "LOCALIZER" would go unseen.
    ds = Dataset()
    ds.ImageType = "LOCALIZER"
    ds.CorrectedImage = ["decy", "ATTN "]
    path = tmp_path / "one.dcm"
    ds.save_as(path, implicit_vr=False, little_endian=True)
    back = pydicom.dcmread(path, force=True)  # a bare data set, no file meta
    assert isinstance(back.ImageType, str)
    assert dicom.code_strings(back, "ImageType") == ["LOCALIZER"] and dicom.is_localizer(back)
    assert dicom.code_strings(back, "CorrectedImage") == ["DECY", "ATTN"]
    assert dicom.code_strings(back, "PatientName") == [] and dicom.code_strings(Dataset(), "ImageType") == []
    back.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert not dicom.is_localizer(back)
