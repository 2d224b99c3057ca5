"""Write a 3-D image as a real DICOM Part-10 image series (CT Image Storage or PET Image Storage) with pydicom.

This is the project's one DICOM *image* writer. The tests use it to build hand-worked SUV cases, and the synthetic
phantom uses it to write its CT and PET studies. Everything a reader needs for geometry and intensity is written
consistently from the inputs:

* geometry: ``ImageOrientationPatient``, ``ImagePositionPatient``, ``PixelSpacing``, ``SliceThickness`` and
  ``SliceLocation`` all come from the voxel-to-RAS ``affine`` (converted to DICOM's LPS patient space);
* intensity: ``stored = round((value - RescaleIntercept) / RescaleSlope)`` per slice, stored as signed 16-bit;
* identity: every UID is derived with :func:`pydicom.uid.generate_uid` from caller-supplied strings, and every
  date/time comes from the caller (or a fixed default), so the same inputs always give the same bytes.

Typical use (a PET series whose slices each get their own slope, as GE and Siemens write them)::

    paths = write_image_series(
        suv_bqml_ijk, affine, "study/pet", "PT", uid_seed="case-001",
        header=pet_header(weight_kg=70, dose_bq=3.7e8, half_life_s=6586.2,
                          injection=datetime(2024, 1, 1, 9, 0, 0)),
    )

Files are first written under temporary names in ``out_dir`` and renamed only when the whole series has been
written, so a failure never leaves a half-written series behind.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, PositronEmissionTomographyImageStorage, generate_uid
from pydicom.valuerep import DSfloat

from cipa_bundle.io.volume import LPS_TO_RAS

__all__ = [
    "DEFAULT_SERIES_DATETIME",
    "IMPLEMENTATION_CLASS_UID",
    "derive_uid",
    "format_da",
    "format_dt",
    "format_tm",
    "pet_header",
    "write_image_series",
]

#: Date and time used for Study/Series/Acquisition/Content when the caller gives none (keeps bytes reproducible).
DEFAULT_SERIES_DATETIME = _dt.datetime(2024, 1, 1, 10, 0, 0)

#: Our own implementation UID, so the written bytes do not change with the installed pydicom version.
IMPLEMENTATION_CLASS_UID = generate_uid(entropy_srcs=["cipa_bundle", "dicom_writer", "implementation"])
_IMPLEMENTATION_VERSION_NAME = "CIPA_BUNDLE_1"

_SOP_CLASS = {"CT": CTImageStorage, "PT": PositronEmissionTomographyImageStorage}
_INT16_MIN, _INT16_MAX = -32768, 32767

# A DICOM IOP must hold two orthonormal direction cosines; this bounds what we accept from a float affine.
_ORTHO_TOL = 1e-4


def derive_uid(*parts: str) -> str:
    """A deterministic DICOM UID (under pydicom's root) derived from ``parts`` (same parts -> same UID)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def format_da(value: _dt.date | _dt.datetime) -> str:
    """DICOM DA ``YYYYMMDD``."""
    return value.strftime("%Y%m%d")


def format_tm(value: _dt.datetime | _dt.time) -> str:
    """DICOM TM ``HHMMSS`` or ``HHMMSS.ffffff`` when there are microseconds."""
    text = value.strftime("%H%M%S")
    return f"{text}.{value.microsecond:06d}" if value.microsecond else text


def format_dt(value: _dt.datetime) -> str:
    """DICOM DT ``YYYYMMDDHHMMSS[.ffffff]`` (no UTC offset: all times of a study share one clock)."""
    return format_da(value) + format_tm(value)


def _ds(value: float) -> DSfloat:
    """A DS value that always fits DICOM's 16-character limit (pydicom's auto-formatting)."""
    return DSfloat(float(value), auto_format=True)


def pet_header(
    *,
    weight_kg: float | None = 70.0,
    dose_bq: float | None = 3.7e8,
    half_life_s: float | None = 6586.2,
    injection: _dt.datetime | None = _dt.datetime(2024, 1, 1, 9, 0, 0),
    injection_time_only: bool = False,
    radiopharmaceutical: str = "Fluorodeoxyglucose F^18^",
    units: str = "BQML",
    decay_correction: str = "START",
    corrected_image: Sequence[str] = ("ATTN", "DECY", "SCAT", "DTIM", "RAN", "NORM"),
    height_m: float | None = None,
    sex: str | None = None,
) -> Dataset:
    """The SUV-relevant PET header tags, as a dataset to pass as ``header=`` to :func:`write_image_series`.

    Any argument set to ``None`` leaves its tag out, which is how the tests build the error cases.

    Args:
        weight_kg: PatientWeight (0010,1030) in kg.
        dose_bq: RadionuclideTotalDose (0018,1074) in Bq (injected activity, not decay corrected).
        half_life_s: RadionuclideHalfLife (0018,1075) in s (F-18: 6586.2).
        injection: injection date and time; written as RadiopharmaceuticalStartDateTime (0018,1078) and
            RadiopharmaceuticalStartTime (0018,1072).
        injection_time_only: write only the dateless RadiopharmaceuticalStartTime, as 59% of real series do.
        radiopharmaceutical: Radiopharmaceutical (0018,0031).
        units: Units (0054,1001), e.g. ``BQML``, ``CNTS``, ``GML``.
        decay_correction: DecayCorrection (0054,1102): ``START``, ``ADMIN`` or ``NONE``.
        corrected_image: CorrectedImage (0028,0051) values.
        height_m: PatientSize (0010,1020) in metres (needed for SUL and SUVbsa).
        sex: PatientSex (0010,0040): ``M``, ``F`` or ``O``.

    Returns:
        A dataset with the patient, radiopharmaceutical and PET-series tags above.
    """
    ds = Dataset()
    if weight_kg is not None:
        ds.PatientWeight = _ds(weight_kg)
    if height_m is not None:
        ds.PatientSize = _ds(height_m)
    if sex is not None:
        ds.PatientSex = sex
    item = Dataset()
    item.Radiopharmaceutical = radiopharmaceutical
    if dose_bq is not None:
        item.RadionuclideTotalDose = _ds(dose_bq)
    if half_life_s is not None:
        item.RadionuclideHalfLife = _ds(half_life_s)
    if injection is not None:
        item.RadiopharmaceuticalStartTime = format_tm(injection)
        if not injection_time_only:
            item.RadiopharmaceuticalStartDateTime = format_dt(injection)
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([item])
    ds.Units = units
    ds.DecayCorrection = decay_correction
    ds.CorrectedImage = list(corrected_image)
    return ds


def _geometry(
    affine: np.ndarray, shape: tuple[int, int, int]
) -> tuple[list[float], list[float], list[np.ndarray], float]:
    """IOP (6 cosines), PixelSpacing [row, col] (mm), per-slice IPP (LPS mm) and slice spacing (mm) from an affine."""
    lps = LPS_TO_RAS @ np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine has a zero-length axis: column norms {spacing.tolist()}")
    row_dir = lps[:3, 0] / spacing[0]  # direction of increasing column index i
    col_dir = lps[:3, 1] / spacing[1]  # direction of increasing row index j
    if abs(float(row_dir @ col_dir)) > _ORTHO_TOL:
        raise ValueError(
            f"affine i and j axes are not orthogonal (cosine {row_dir @ col_dir:.3g}); DICOM cannot store it"
        )
    iop = [float(v) for v in np.concatenate([row_dir, col_dir])]
    positions = [lps[:3, :3] @ np.array([0.0, 0.0, float(k)]) + lps[:3, 3] for k in range(shape[2])]
    # PixelSpacing is (spacing between rows, spacing between columns) = (j spacing, i spacing).
    return iop, [float(spacing[1]), float(spacing[0])], positions, float(spacing[2])


def _quantise(values: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """``round((values - intercept) / slope)`` as int16, refusing values that would wrap."""
    stored = np.rint((values.astype(np.float64) - intercept) / slope)
    if stored.size and (stored.min() < _INT16_MIN or stored.max() > _INT16_MAX):
        raise ValueError(
            f"values {values.min()}..{values.max()} do not fit int16 with slope {slope} and intercept {intercept}"
        )
    return stored.astype(np.int16)


def _auto_slope(slice_values: np.ndarray) -> float:
    """Per-slice PET slope so the slice's largest |value| maps to 32767 (what GE/Siemens do); 1 for an empty slice."""
    peak = float(np.max(np.abs(slice_values))) if slice_values.size else 0.0
    return float(_ds(peak / _INT16_MAX)) if peak > 0 else 1.0


def write_image_series(
    array_ijk: np.ndarray,
    affine: np.ndarray,
    out_dir: str | os.PathLike[str],
    modality: Literal["CT", "PT"],
    *,
    uid_seed: str,
    study_uid: str | None = None,
    series_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int | None = None,
    series_description: str | None = None,
    series_datetime: _dt.datetime = DEFAULT_SERIES_DATETIME,
    patient_id: str = "CIPA-PHANTOM",
    patient_name: str = "CIPA^PHANTOM",
    stored_values: bool = False,
    rescale_slopes: Sequence[float] | None = None,
    rescale_slope: float = 1.0,
    rescale_intercept: float | None = None,
    header: Dataset | Mapping[str, Any] | None = None,
    per_slice: Callable[[int, Dataset], None] | None = None,
    filename_pattern: str = "{modality}_{k:04d}.dcm",
) -> list[Path]:
    """Write ``array_ijk`` as one DICOM image series, one single-frame file per slice ``k``.

    Args:
        array_ijk: ``(I, J, K)`` voxel values indexed [column, row, slice]. Real-world values (HU for CT, e.g. Bq/ml
            for PET) unless ``stored_values`` is true, in which case they are the integers to store.
        affine: ``(4, 4)`` voxel-to-RAS mm matrix (the :class:`~cipa_bundle.io.volume.Volume` convention). Its ``i``
            and ``j`` axes must be orthogonal; the ``k`` axis may be oblique to them (to write a gantry tilt).
        out_dir: folder to write into (created if missing).
        modality: ``"CT"`` (CT Image Storage) or ``"PT"`` (PET Image Storage).
        uid_seed: string from which every UID not given explicitly is derived. Two series written with the same
            seed share StudyInstanceUID and FrameOfReferenceUID (as CT and PET of one hybrid scan do) but get
            different SeriesInstanceUIDs (the seed is combined with modality and series number).
        study_uid: StudyInstanceUID override.
        series_uid: SeriesInstanceUID override.
        frame_of_reference_uid: FrameOfReferenceUID override.
        series_number: SeriesNumber; default 1 for CT and 2 for PT.
        series_description: SeriesDescription; default ``"CIPA phantom CT"`` / ``"CIPA phantom PET"``.
        series_datetime: written as Study, Series, Acquisition and Content date/time (override any of them through
            ``header`` or ``per_slice``). Default :data:`DEFAULT_SERIES_DATETIME`.
        patient_id: PatientID.
        patient_name: PatientName.
        stored_values: ``array_ijk`` already holds the stored integers (must fit int16).
        rescale_slopes: per-slice RescaleSlope, length ``K`` (PET). Default for PT: a slope per slice chosen so the
            slice maximum maps to 32767. Ignored for CT.
        rescale_slope: the single CT RescaleSlope (default 1).
        rescale_intercept: RescaleIntercept; default -1024 for CT and 0 for PT.
        header: tags applied to every slice after the defaults (a pydicom ``Dataset`` or a ``{keyword: value}``
            mapping), e.g. :func:`pet_header`'s output, a PixelPaddingValue or private tags.
        per_slice: ``callback(k, dataset)`` called last for every slice, to change per-slice tags (acquisition time
            per bed, InstanceNumber order, a broken tag for an error test...). It may delete tags, or set a
            ``pydicom.dataelem.RawDataElement`` to store bytes that are not a valid value of the tag's VR.
        filename_pattern: file name, formatted with ``modality`` and ``k``.

    Every slice gets the patient, study, series, frame-of-reference, equipment, image-plane and pixel modules.
    PT slices also get SeriesType ``STATIC\\IMAGE``, ImageIndex, NumberOfSlices, Units ``BQML``, DecayCorrection
    ``START``, CorrectedImage ``ATTN\\DECY``, FrameReferenceTime 0 and ActualFrameDuration 120000 ms, which
    ``header`` and ``per_slice`` may override. Pixels are signed 16-bit, explicit VR little endian.

    Returns:
        The written file paths, in ``k`` order.

    Raises:
        ValueError: bad arguments (shape, modality, non-orthogonal i/j axes, values that do not fit int16).
    """
    if modality not in _SOP_CLASS:
        raise ValueError(f"modality must be 'CT' or 'PT', got {modality!r}")
    array_ijk = np.asarray(array_ijk)
    if array_ijk.ndim != 3:
        raise ValueError(f"array_ijk must be 3-D (I, J, K), got shape {array_ijk.shape}")
    n_i, n_j, n_k = (int(s) for s in array_ijk.shape)
    iop, pixel_spacing, positions, slice_spacing = _geometry(affine, (n_i, n_j, n_k))
    normal = np.cross(np.asarray(iop[:3]), np.asarray(iop[3:]))

    is_pet = modality == "PT"
    intercept = float(rescale_intercept) if rescale_intercept is not None else (0.0 if is_pet else -1024.0)
    if is_pet:
        if rescale_slopes is not None:
            slopes = [float(_ds(s)) for s in rescale_slopes]
            if len(slopes) != n_k:
                raise ValueError(f"rescale_slopes has {len(slopes)} values, expected one per slice ({n_k})")
        elif stored_values:
            slopes = [1.0] * n_k
        else:
            slopes = [_auto_slope(array_ijk[:, :, k] - intercept) for k in range(n_k)]
    else:
        slopes = [float(_ds(rescale_slope))] * n_k
    if any(s == 0 or not np.isfinite(s) for s in slopes):
        raise ValueError(f"rescale slopes must be finite and non-zero, got {slopes}")

    if series_number is None:
        series_number = 2 if is_pet else 1
    study_uid = study_uid or derive_uid(uid_seed, "study")
    frame_of_reference_uid = frame_of_reference_uid or derive_uid(uid_seed, "frame-of-reference")
    series_uid = series_uid or derive_uid(uid_seed, modality, str(series_number), "series")
    description = series_description or f"CIPA phantom {'PET' if is_pet else 'CT'}"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    finals: list[Path] = []
    temps: list[Path] = []
    try:
        for k in range(n_k):
            plane = array_ijk[:, :, k]
            if stored_values:
                if not np.issubdtype(plane.dtype, np.integer) or (
                    plane.size and (plane.min() < _INT16_MIN or plane.max() > _INT16_MAX)
                ):
                    raise ValueError("stored_values=True needs integer values within int16")
                stored = plane.astype(np.int16)
            else:
                stored = _quantise(plane, slopes[k], intercept)
            sop_uid = derive_uid(series_uid, "instance", str(k))
            ds = _slice_dataset(
                modality=modality,
                sop_uid=sop_uid,
                study_uid=study_uid,
                series_uid=series_uid,
                frame_of_reference_uid=frame_of_reference_uid,
                series_number=int(series_number),
                description=description,
                when=series_datetime,
                patient_id=patient_id,
                patient_name=patient_name,
                k=k,
                n_k=n_k,
                iop=iop,
                ipp=positions[k],
                normal=normal,
                pixel_spacing=pixel_spacing,
                slice_spacing=slice_spacing,
                slope=slopes[k],
                intercept=intercept,
                # DICOM pixel rows are j and columns are i, so the (I, J) plane is transposed.
                pixels=np.ascontiguousarray(stored.T),
            )
            if header is not None:
                _apply_header(ds, header)
            if per_slice is not None:
                per_slice(k, ds)
            final = out / filename_pattern.format(modality=modality, k=k)
            temp = final.with_name(f".{final.name}.tmp{os.getpid()}")
            temps.append(temp)
            pydicom.dcmwrite(temp, ds, enforce_file_format=True)
            finals.append(final)
        for temp, final in zip(temps, finals):
            os.replace(temp, final)
    except BaseException:
        for temp in temps:
            temp.unlink(missing_ok=True)
        raise
    return finals


def _apply_header(ds: Dataset, header: Dataset | Mapping[str, Any]) -> None:
    """Copy ``header`` into ``ds`` (deep copies, so sequences are not shared between slices)."""
    import copy

    if isinstance(header, Dataset):
        # elements() does not convert raw values, so deliberately malformed test values survive the copy.
        for elem in header.elements():
            ds[elem.tag] = copy.deepcopy(elem)
    else:
        for keyword, value in header.items():
            setattr(ds, keyword, copy.deepcopy(value))


def _slice_dataset(
    *,
    modality: str,
    sop_uid: str,
    study_uid: str,
    series_uid: str,
    frame_of_reference_uid: str,
    series_number: int,
    description: str,
    when: _dt.datetime,
    patient_id: str,
    patient_name: str,
    k: int,
    n_k: int,
    iop: list[float],
    ipp: np.ndarray,
    normal: np.ndarray,
    pixel_spacing: list[float],
    slice_spacing: float,
    slope: float,
    intercept: float,
    pixels: np.ndarray,
) -> Dataset:
    """One slice's dataset with file meta, patient/study/series/equipment/image-plane/pixel modules filled in."""
    sop_class = _SOP_CLASS[modality]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION_NAME

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    date, time = format_da(when), format_tm(when)
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
    ds.Modality = modality
    ds.Manufacturer = "CIPA bundle"
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.InstanceNumber = k + 1
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.PatientPosition = "HFS"
    ds.ImageOrientationPatient = [_ds(v) for v in iop]
    ds.ImagePositionPatient = [_ds(v) for v in ipp]
    ds.SliceLocation = _ds(float(np.dot(ipp, normal)))
    ds.PixelSpacing = [_ds(v) for v in pixel_spacing]
    ds.SliceThickness = _ds(slice_spacing)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = _ds(intercept)
    ds.RescaleSlope = _ds(slope)
    if modality == "CT":
        ds.RescaleType = "HU"
        ds.KVP = _ds(120)
    else:
        ds.SeriesType = ["STATIC", "IMAGE"]
        ds.ImageIndex = k + 1
        ds.NumberOfSlices = n_k
        ds.Units = "BQML"
        ds.DecayCorrection = "START"
        ds.CorrectedImage = ["ATTN", "DECY"]
        ds.FrameReferenceTime = _ds(0)
        ds.ActualFrameDuration = 120000
    ds.PixelData = pixels.astype("<i2").tobytes()
    return ds
