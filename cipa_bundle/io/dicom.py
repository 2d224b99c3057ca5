"""Read a DICOM image series (CT or PET, one single-frame file per slice) into a :class:`~cipa_bundle.io.volume.Volume`.

What this module guarantees, and why:

* **Discovery.** :func:`find_series` walks a folder recursively and keeps every file pydicom can parse that carries
  an image (``Rows``/``Columns`` and a SeriesInstanceUID), grouped by SeriesInstanceUID. ``DICOMDIR`` files,
  non-DICOM files and hidden files (names starting with ``.``, e.g. half-written temporaries) are skipped.
* **Slice order** comes from geometry, never from InstanceNumber: slices are sorted by the projection of
  ImagePositionPatient (IPP) onto the slice normal ``n = row x col`` of ImageOrientationPatient (IOP).
* **Geometry** comes from IOP, IPP and PixelSpacing; the slice spacing comes from the sorted positions (not from
  SliceThickness, which may overlap or be missing). DICOM patient space is LPS; the returned affine is RAS, the
  :class:`Volume` convention.
* **Localizers** (scouts: ImageType (0008,0008) contains LOCALIZER) are projections, not slices of the volume. Some
  exports put the scout into the CT series itself; :func:`read_series` sets such instances aside (listed in
  ``DicomSeries.set_aside``) and refuses a series that holds nothing else.
* **Refused geometry**, each with its own error class: missing geometry tags, multi-frame files, non-unit or
  non-orthogonal IOP, IOP that differs between slices, mixed Rows/Columns or PixelSpacing, duplicate slice positions,
  gantry tilt (slice positions drifting sideways, or a non-zero GantryDetectorTilt), non-uniform slice spacing.
* **Intensities**: the modality LUT (RescaleSlope/RescaleIntercept, or a Modality LUT Sequence) is applied **per
  instance**, because GE and Siemens PET change the slope on every slice. CT becomes HU with padding
  (PixelPaddingValue, PixelPaddingRangeLimit) and anything below -1024 HU set to air (-1024).

Tolerances (documented here, used below):

* IOP: each cosine vector must have norm ``1 +- 1e-3`` and the two must have ``|r . c| <= 1e-3`` (DS values are
  rounded to 16 characters, and some scanners write 6 decimals); slices may differ by at most ``1e-4`` per cosine.
* Duplicate positions: two slices closer than ``1e-3`` mm along the normal.
* Gantry tilt: between neighbouring slices the in-plane drift of IPP must be at most
  ``1e-3 x gap + 1e-3`` mm (about 0.06 degrees), and GantryDetectorTilt (0018,1120) must be 0 within 1e-3 degrees.
* Uniform spacing: a uniform grid is fitted to the sorted slice positions by least squares (its spacing and origin
  become the affine's), and every slice must lie within 10 % of the spacing of its grid position
  (``_GRID_TOL_FRACTION``); every gap must also be within twice that of the fitted spacing, so that the message
  names the gap where one is wrong. Why 10 %: multi-bed PET computes each bed's slice positions from that bed's own
  start and rounds them, so a real GE Discovery ST series with 3.27 mm slices jitters by 0.02-0.08 mm at its bed
  junctions (0.6-2.4 % of the spacing; up to 0.1 mm at 3-4 mm is normal), which the former 1 % rule refused. A
  missing slice moves the slices on one side of it by a whole spacing (gap error 100 %, residual at least about a
  quarter of the spacing), a duplicate position is refused separately, and two spacings in one series leave a
  residual that grows with the slice count; all stay far above 10 %. At 10 % a voxel is placed at most a tenth of
  a slice from where the data put it. The largest deviation is recorded (``Volume.meta
  ["slice_position_max_deviation_mm"]``, and ``provenance.json``).
* Numeric tags that cannot be parsed (NumberOfFrames, GantryDetectorTilt, RescaleSlope, PixelPaddingValue, ...)
  raise an error naming the file and the tag.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.multiframe import frame_datasets, frame_number, is_multiframe, source_object
from cipa_bundle.io.volume import LPS_TO_RAS, Volume

__all__ = [
    "AIR_HU",
    "DicomSeries",
    "DicomSeriesError",
    "DuplicatePositionError",
    "GantryTiltError",
    "InconsistentOrientationError",
    "MissingGeometryError",
    "MixedImageSizeError",
    "MultipleSeriesError",
    "NoSeriesFoundError",
    "NonOrthogonalOrientationError",
    "NonUniformSpacingError",
    "UnsupportedImageError",
    "code_strings",
    "find_series",
    "is_localizer",
    "read_series",
    "SliceGeometry",
    "sort_and_measure",
]

#: HU of air; CT padding and anything below it become this value.
AIR_HU = -1024.0

_IOP_NORM_TOL = 1e-3
_IOP_ORTHO_TOL = 1e-3
_IOP_CONSISTENT_TOL = 1e-4
_DUPLICATE_TOL_MM = 1e-3
_TILT_REL_TOL = 1e-3
_TILT_ABS_TOL_MM = 1e-3
_GANTRY_TILT_TOL_DEG = 1e-3
#: Largest distance of a slice from its place on the fitted uniform grid, as a fraction of the spacing (see above).
_GRID_TOL_FRACTION = 0.1
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


# ---------------------------------------------------------------------------------------------------- errors
class DicomSeriesError(CipaInputError):
    """A folder or series that cannot be read as one regular image volume."""


class NoSeriesFoundError(DicomSeriesError):
    """No DICOM image series (of the requested modality / UID) under the given folder."""


class MultipleSeriesError(DicomSeriesError):
    """More than one series matches and the caller did not say which one to read."""


class MissingGeometryError(DicomSeriesError):
    """An instance lacks (or has an unreadable) ImagePositionPatient, ImageOrientationPatient or PixelSpacing."""


class UnsupportedImageError(DicomSeriesError):
    """Multi-frame or otherwise unsupported image storage (only single-frame, single-sample images are read)."""


class NonOrthogonalOrientationError(DicomSeriesError):
    """ImageOrientationPatient cosines are not unit length or not orthogonal."""


class InconsistentOrientationError(DicomSeriesError):
    """ImageOrientationPatient differs between instances of the series."""


class MixedImageSizeError(DicomSeriesError):
    """Rows, Columns or PixelSpacing differ between instances of the series."""


class DuplicatePositionError(DicomSeriesError):
    """Two instances sit at the same position along the slice normal."""


class GantryTiltError(DicomSeriesError):
    """Slices are sheared (gantry tilt): positions drift within the image plane, so the grid is not orthogonal."""


class NonUniformSpacingError(DicomSeriesError):
    """Slice gaps differ by more than the documented tolerance (often a missing slice)."""


# ---------------------------------------------------------------------------------------------------- result
@dataclass
class DicomSeries:
    """One DICOM image series read into a volume.

    Attributes:
        volume: float32 ``(I, J, K)`` = [column, row, slice] values after the per-instance modality LUT (HU for CT,
            the PET ``Units`` for PET), with a voxel-to-RAS affine; ``k`` increases along ``row x col`` of IOP.
        datasets: the instance headers in ``k`` order (PixelData dropped unless asked to keep it).
        files: the instance files in ``k`` order.
        modality: Modality (0008,0060), e.g. ``"CT"`` or ``"PT"``.
        series_uid: SeriesInstanceUID.
        study_uid: StudyInstanceUID (empty if absent).
        frame_of_reference_uid: FrameOfReferenceUID (empty if absent).
        set_aside: files of the series that are not part of the volume (localizers), in path order.
        sources: where each ``k`` came from, for messages: the file, or ``"<file> frame <n>"`` for a frame of a
            multi-frame object (whose views, in ``datasets``, all name that one file in ``files``).
    """

    volume: Volume
    datasets: list[Dataset]
    files: list[Path]
    modality: str
    series_uid: str
    study_uid: str
    frame_of_reference_uid: str
    set_aside: list[Path] = field(default_factory=list)
    sources: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- discovery
def _iter_files(folder: Path) -> Iterable[Path]:
    """Every regular, non-hidden file under ``folder`` in a stable (sorted) order."""
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and name.upper() != "DICOMDIR":
                yield Path(root) / name


def _read_header(path: Path) -> Dataset | None:
    """The header of an image instance, or ``None`` if ``path`` is not a readable DICOM image."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001
        # pydicom raises many different errors on random bytes; a stray file must never stop the scan of a folder.
        return None
    meta = getattr(ds, "file_meta", None)
    if meta is not None and str(meta.get("MediaStorageSOPClassUID", "")) == _DICOMDIR_SOP_CLASS:
        return None
    if "Rows" not in ds or "Columns" not in ds or not ds.get("SeriesInstanceUID"):
        return None
    return ds


def code_strings(ds: Dataset, keyword: str) -> list[str]:
    """The values of a multi-valued code string such as ImageType or CorrectedImage, upper-case, ``[]`` if absent.

    pydicom returns one value as a plain ``str`` and several as a list; iterating the ``str`` would give letters.
    """
    value = ds.get(keyword)
    if value is None or value == "":
        return []
    values = [value] if isinstance(value, (str, bytes)) else list(value)
    return [str(v).strip().upper() for v in values]


def is_localizer(ds: Dataset) -> bool:
    """Whether ImageType (0008,0008) marks ``ds`` as a localizer (scout): a projection, not a slice of a volume."""
    return "LOCALIZER" in code_strings(ds, "ImageType")


def find_series(folder: str | os.PathLike[str]) -> dict[str, list[Path]]:
    """Find every DICOM image series under ``folder`` (recursive).

    Args:
        folder: a directory.

    Returns:
        ``{SeriesInstanceUID: [files]}``, files in path order (not yet in slice order), series in order of first file.

    Raises:
        NoSeriesFoundError: ``folder`` is not a directory.
    """
    root = Path(folder)
    if not root.is_dir():
        raise NoSeriesFoundError(f"{root}: not a directory (expected a folder holding a DICOM series)")
    groups: dict[str, list[Path]] = {}
    for path in _iter_files(root):
        ds = _read_header(path)
        if ds is not None:
            groups.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return groups


def _select_series(
    folder: Path, modality: str | None, series_uid: str | None
) -> list[Path]:
    """The files of the one series in ``folder`` matching ``modality`` / ``series_uid``."""
    groups = find_series(folder)
    if series_uid is not None:
        if series_uid not in groups:
            raise NoSeriesFoundError(
                f"{folder}: no series with SeriesInstanceUID={series_uid!r}; found {sorted(groups)}"
            )
        return groups[series_uid]
    candidates: list[tuple[str, str, list[Path]]] = []
    for uid, files in groups.items():
        mod = str(pydicom.dcmread(files[0], stop_before_pixels=True).get("Modality", ""))
        if modality is None or mod == modality:
            candidates.append((uid, mod, files))
    if not candidates:
        wanted = f" with Modality={modality}" if modality else ""
        found = ", ".join(
            f"{uid} (Modality={pydicom.dcmread(f[0], stop_before_pixels=True).get('Modality', '?')})"
            for uid, f in groups.items()
        )
        raise NoSeriesFoundError(
            f"{folder}: no DICOM image series{wanted} found" + (f"; found {found}" if found else "")
        )
    if len(candidates) > 1:
        listing = "; ".join(f"{uid} (Modality={mod}, {len(files)} files)" for uid, mod, files in candidates)
        raise MultipleSeriesError(
            f"{folder}: {len(candidates)} series found ({listing}); expected one, pass series_uid= to choose"
        )
    return candidates[0][2]


# ---------------------------------------------------------------------------------------------------- geometry
def _floats(ds: Dataset, keyword: str, tag: str, count: int, path: Path) -> np.ndarray:
    """``count`` floats from a multi-valued DS tag, or :class:`MissingGeometryError` naming file, tag and value."""
    value = ds.get(keyword)
    try:
        values = np.array([float(v) for v in value], dtype=np.float64) if value is not None else None
    except (TypeError, ValueError):
        values = None
    if values is None or values.shape != (count,) or not np.all(np.isfinite(values)):
        raise MissingGeometryError(
            f"{path}: {keyword} {tag} = {value!r}; expected {count} finite numbers"
        )
    return values


def _number(
    ds: Dataset, keyword: str, tag: str, path: Path, *, integer: bool = False, expected: str | None = None
) -> float | int | None:
    """A numeric tag's value (``None`` when absent or empty), or an UnsupportedImageError naming the file and tag.

    Args:
        ds: the instance.
        keyword: pydicom keyword of the tag.
        tag: the tag as ``(gggg,eeee)``, for the message.
        path: the instance's file, for the message.
        integer: parse as an integer (IS, US) instead of a finite float (DS).
        expected: what the message says was expected, when not simply a number.
    """
    value = ds.get(keyword)
    if value is None or str(value).strip() == "":
        return None
    try:
        number = int(value) if integer else float(value)
    except (TypeError, ValueError, OverflowError):
        number = None
    if number is None or (not integer and not math.isfinite(number)):
        wanted = expected or ("an integer" if integer else "a finite number")
        raise UnsupportedImageError(f"{path}: {keyword} {tag} = {str(value)!r}; expected {wanted}")
    return number


class SliceGeometry(NamedTuple):
    """Where the slices of a series go: ``order`` (indices into the headers, in ``k`` order), the ``(4, 4)``
    voxel-to-RAS ``affine`` (mm) of the fitted uniform grid, and the largest distance of a slice from its grid
    position along the normal (``max_deviation_mm``)."""

    order: list[int]
    affine: np.ndarray
    max_deviation_mm: float


def sort_and_measure(datasets: Sequence[Dataset], files: Sequence[Path]) -> SliceGeometry:
    """Order instances along the slice normal and fit the voxel-to-RAS affine, checking the grid is regular.

    Args:
        datasets: instance headers (any order).
        files: their paths, for error messages.

    Returns:
        The :class:`SliceGeometry`.

    Raises:
        MissingGeometryError, UnsupportedImageError, NonOrthogonalOrientationError, InconsistentOrientationError,
        MixedImageSizeError, DuplicatePositionError, GantryTiltError, NonUniformSpacingError.
    """
    paths = [Path(p) for p in files]
    first = paths[0]
    iops = [_floats(ds, "ImageOrientationPatient", "(0020,0037)", 6, p) for ds, p in zip(datasets, paths)]
    ipps = [_floats(ds, "ImagePositionPatient", "(0020,0032)", 3, p) for ds, p in zip(datasets, paths)]
    spacings = [_floats(ds, "PixelSpacing", "(0028,0030)", 2, p) for ds, p in zip(datasets, paths)]

    for ds, p in zip(datasets, paths):
        frames = _number(ds, "NumberOfFrames", "(0028,0008)", p, integer=True)
        if frames is not None and frames > 1:
            raise UnsupportedImageError(f"{p}: NumberOfFrames (0028,0008) = {frames}; expected single-frame images")
        samples = _number(ds, "SamplesPerPixel", "(0028,0002)", p, integer=True)
        if samples not in (None, 1):
            raise UnsupportedImageError(f"{p}: SamplesPerPixel (0028,0002) = {samples}; expected 1 (greyscale)")
        tilt = _number(ds, "GantryDetectorTilt", "(0018,1120)", p)
        if tilt is not None and abs(tilt) > _GANTRY_TILT_TOL_DEG:
            raise GantryTiltError(
                f"{p}: GantryDetectorTilt (0018,1120) = {tilt}; expected 0 (tilted acquisitions are not resampled)"
            )

    iop0 = iops[0]
    row, col = iop0[:3], iop0[3:]
    norms = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    dot = float(row @ col)
    if abs(norms[0] - 1) > _IOP_NORM_TOL or abs(norms[1] - 1) > _IOP_NORM_TOL or abs(dot) > _IOP_ORTHO_TOL:
        raise NonOrthogonalOrientationError(
            f"{first}: ImageOrientationPatient (0020,0037) = {iop0.tolist()} has cosine norms {norms} and dot product "
            f"{dot:.3g}; expected two orthogonal unit vectors"
        )
    for iop, p in zip(iops, paths):
        if np.max(np.abs(iop - iop0)) > _IOP_CONSISTENT_TOL:
            raise InconsistentOrientationError(
                f"{p}: ImageOrientationPatient (0020,0037) = {iop.tolist()} differs from {first}'s {iop0.tolist()}; "
                "expected one orientation for the whole series"
            )
    sizes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(sizes) > 1:
        raise MixedImageSizeError(
            f"{first.parent}: Rows x Columns (0028,0010)/(0028,0011) take {len(sizes)} values {sorted(sizes)}; "
            "expected one image size for the series"
        )
    for sp, p in zip(spacings, paths):
        if np.max(np.abs(sp - spacings[0])) > 1e-4 or np.any(sp <= 0):
            raise MixedImageSizeError(
                f"{p}: PixelSpacing (0028,0030) = {sp.tolist()}; expected positive values equal to {first}'s "
                f"{spacings[0].tolist()}"
            )

    # Re-orthonormalise so the affine is exactly orthogonal despite 16-character DS rounding.
    row = row / np.linalg.norm(row)
    col = col - (col @ row) * row
    col = col / np.linalg.norm(col)
    normal = np.cross(row, col)
    heights = np.array([ipp @ normal for ipp in ipps])
    order = [int(i) for i in np.argsort(heights, kind="stable")]
    sorted_heights = heights[order]
    sorted_ipps = [ipps[i] for i in order]

    row_spacing, col_spacing = float(spacings[0][0]), float(spacings[0][1])
    if len(order) == 1:
        thickness = (
            _number(datasets[0], "SpacingBetweenSlices", "(0018,0088)", first)
            or _number(datasets[0], "SliceThickness", "(0018,0050)", first)
            or 1.0
        )
        slice_spacing = abs(thickness)
        max_deviation, origin = 0.0, sorted_ipps[0]
    else:
        gaps = np.diff(sorted_heights)
        for n, gap in enumerate(gaps):
            if gap < _DUPLICATE_TOL_MM:
                a, b = paths[order[n]], paths[order[n + 1]]
                raise DuplicatePositionError(
                    f"{b}: ImagePositionPatient (0020,0032) = {sorted_ipps[n + 1].tolist()} lies {gap:.3g} mm from "
                    f"{a}'s along the slice normal; expected distinct slice positions"
                )
            drift = sorted_ipps[n + 1] - sorted_ipps[n] - gap * normal
            if np.linalg.norm(drift) > _TILT_REL_TOL * gap + _TILT_ABS_TOL_MM:
                angle = float(np.degrees(np.arctan2(np.linalg.norm(drift), gap)))
                raise GantryTiltError(
                    f"{paths[order[n + 1]]}: ImagePositionPatient (0020,0032) = {sorted_ipps[n + 1].tolist()} drifts "
                    f"{np.linalg.norm(drift):.3g} mm within the image plane from the previous slice (tilt about "
                    f"{angle:.2f} deg); expected slices stacked along the IOP normal (no gantry tilt)"
                )
        index = np.arange(len(order), dtype=np.float64)
        slice_spacing, start = (float(v) for v in np.polyfit(index, sorted_heights, 1))
        tol = _GRID_TOL_FRACTION * slice_spacing
        # A wrong gap (a missing slice) is named first: it is what the user can look for.
        worst = int(np.argmax(np.abs(gaps - slice_spacing)))
        if abs(gaps[worst] - slice_spacing) > 2 * tol:
            raise NonUniformSpacingError(
                f"{paths[order[worst + 1]]}: slice gap {gaps[worst]:.4g} mm (ImagePositionPatient (0020,0032)) "
                f"differs from the series' spacing {slice_spacing:.4g} mm (least-squares fit) by more than "
                f"{2 * tol:.3g} mm; expected uniform slice spacing (is a slice missing?)"
            )
        residuals = sorted_heights - (start + slice_spacing * index)
        worst = int(np.argmax(np.abs(residuals)))
        if abs(residuals[worst]) > tol:
            raise NonUniformSpacingError(
                f"{paths[order[worst]]}: ImagePositionPatient (0020,0032) lies {residuals[worst]:+.4g} mm along the "
                f"slice normal from slice {worst}'s place on the fitted uniform grid of {slice_spacing:.4g} mm "
                f"spacing (more than {tol:.3g} mm, a tenth of the spacing); expected uniform slice spacing (two "
                "spacings in one series?)"
            )
        max_deviation = float(np.max(np.abs(residuals)))
        origin = sorted_ipps[0] + (start - sorted_heights[0]) * normal

    lps = np.eye(4)
    lps[:3, 0] = row * col_spacing  # i runs along a row, i.e. across columns
    lps[:3, 1] = col * row_spacing
    lps[:3, 2] = normal * slice_spacing
    lps[:3, 3] = origin
    return SliceGeometry(order, LPS_TO_RAS @ lps, max_deviation)


# ---------------------------------------------------------------------------------------------------- pixels
def _rescale(ds: Dataset, keyword: str, tag: str, default: float, path: Path) -> float:
    """RescaleSlope/RescaleIntercept as a float (``default`` when absent or empty)."""
    expected = "a finite number" + (" other than 0" if keyword == "RescaleSlope" else "")
    number = _number(ds, keyword, tag, path, expected=expected)
    if number is None:
        return default
    if keyword == "RescaleSlope" and number == 0:
        raise UnsupportedImageError(f"{path}: {keyword} {tag} = {str(ds.get(keyword))!r}; expected {expected}")
    return float(number)


def _modality_values(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """``(stored, values)`` as ``(Rows, Columns)`` arrays: raw stored integers and the modality-LUT output."""
    try:
        stored = ds.pixel_array
    except Exception as err:  # pydicom raises many types for broken/compressed pixel data
        raise UnsupportedImageError(
            f"{path}: PixelData (7FE0,0010) cannot be decoded ({err}); expected uncompressed pixels or a compression "
            "that an installed decoder reads (the cipa-bundle dependencies read RLE, JPEG Lossless, JPEG-LS and "
            "JPEG 2000)"
        ) from err
    if stored.ndim != 2:
        raise UnsupportedImageError(f"{path}: pixel array has shape {stored.shape}; expected one 2-D frame")
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        return stored, np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    slope = _rescale(ds, "RescaleSlope", "(0028,1053)", 1.0, path)
    intercept = _rescale(ds, "RescaleIntercept", "(0028,1052)", 0.0, path)
    return stored, stored.astype(np.float64) * slope + intercept


def _ct_air(stored: np.ndarray, hu: np.ndarray, ds: Dataset, path: Path) -> np.ndarray:
    """Set CT padding (PixelPaddingValue..PixelPaddingRangeLimit, in stored units) and HU below air to air."""
    out = np.maximum(hu, AIR_HU)
    pad = _number(ds, "PixelPaddingValue", "(0028,0120)", path, integer=True)
    if pad is not None:
        limit = _number(ds, "PixelPaddingRangeLimit", "(0028,0121)", path, integer=True)
        lo, hi = (pad, pad) if limit is None else (min(pad, limit), max(pad, limit))
        out[(stored >= lo) & (stored <= hi)] = AIR_HU
    return out


def read_series(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    *,
    modality: str | None = None,
    series_uid: str | None = None,
    keep_pixel_data: bool = False,
) -> DicomSeries:
    """Read one DICOM image series into a float32 :class:`Volume` with a RAS affine.

    Args:
        source: a folder (searched recursively; it must hold exactly one series matching ``modality`` /
            ``series_uid``) or an explicit list of instance files of one series.
        modality: keep only series with this Modality (e.g. ``"CT"``, ``"PT"``).
        series_uid: read this SeriesInstanceUID.
        keep_pixel_data: keep PixelData in the returned headers (dropped by default to save memory).

    Returns:
        The :class:`DicomSeries`. For CT the values are HU with padding and anything below -1024 set to -1024; for
        other modalities they are ``stored x RescaleSlope + RescaleIntercept`` of each instance. Localizer
        instances are left out (``DicomSeries.set_aside``).

    Raises:
        DicomSeriesError: (a subclass of ``CipaInputError``) for any of the problems listed in the module docstring.
    """
    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        files = _select_series(folder, modality, series_uid)
    else:
        files = [Path(p) for p in source]
        if not files:
            raise NoSeriesFoundError("empty file list; expected the files of one DICOM series")
    datasets: list[Dataset] = []
    for path in files:
        try:
            datasets.append(pydicom.dcmread(path))
        except (InvalidDicomError, OSError) as err:
            raise NoSeriesFoundError(f"{path}: not a readable DICOM file ({err})") from err
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(uids) > 1:
        raise MultipleSeriesError(f"{files[0].parent}: files belong to {len(uids)} series {sorted(uids)}; expected one")
    modalities = {str(ds.get("Modality", "")) for ds in datasets}
    if len(modalities) > 1:
        raise MultipleSeriesError(
            f"{files[0].parent}: Modality (0008,0060) takes values {sorted(modalities)}; expected one"
        )
    mod = modalities.pop()
    if modality is not None and mod != modality:
        raise NoSeriesFoundError(f"{files[0]}: Modality (0008,0060) = {mod!r}; expected {modality!r}")
    # A multi-frame object becomes one single-frame view per frame, so that everything below applies unchanged.
    labels: list[Path] = []
    if any(is_multiframe(ds) for ds in datasets):
        views: list[Dataset] = []
        view_files: list[Path] = []
        for ds, path in zip(datasets, files):
            frames = frame_datasets(ds, path) if is_multiframe(ds) else [ds]
            views.extend(frames)
            view_files.extend([path] * len(frames))
            labels.extend(
                Path(f"{path} frame {frame_number(v)}") if frame_number(v) else path for v in frames
            )
        datasets, files = views, view_files
    else:
        labels = list(files)
    scouts = [is_localizer(ds) for ds in datasets]
    if all(scouts):
        raise UnsupportedImageError(
            f"{files[0].parent}: every instance is a localizer (ImageType (0008,0008) contains LOCALIZER, e.g. "
            f"{files[0].name}); expected the slices of a volume"
        )
    set_aside = list(dict.fromkeys(path for path, scout in zip(files, scouts) if scout))
    datasets = [ds for ds, scout in zip(datasets, scouts) if not scout]
    files = [path for path, scout in zip(files, scouts) if not scout]
    labels = [label for label, scout in zip(labels, scouts) if not scout]

    order, affine, max_deviation = sort_and_measure(datasets, labels)
    datasets = [datasets[i] for i in order]
    files = [files[i] for i in order]
    labels = [labels[i] for i in order]
    rows, cols = int(datasets[0].Rows), int(datasets[0].Columns)
    array = np.empty((cols, rows, len(datasets)), dtype=np.float32)
    for k, (ds, path) in enumerate(zip(datasets, labels)):
        stored, values = _modality_values(ds, path)
        if mod == "CT":
            values = _ct_air(stored, values, ds, path)
        array[:, :, k] = values.T  # DICOM pixel rows are j, columns are i
        if not keep_pixel_data and "PixelData" in ds:
            del ds.PixelData
        multiframe = source_object(ds)
        if not keep_pixel_data and multiframe is not None and "PixelData" in multiframe:
            del multiframe.PixelData

    first = datasets[0]
    meta: dict[str, Any] = {
        "modality": mod,
        "series_uid": str(first.get("SeriesInstanceUID", "")),
        "study_uid": str(first.get("StudyInstanceUID", "")),
        "frame_of_reference_uid": str(first.get("FrameOfReferenceUID", "")),
        "units": "HU" if mod == "CT" else str(first.get("Units", "")),
        "source_dir": str(files[0].parent),
        "slice_position_max_deviation_mm": max_deviation,
    }
    return DicomSeries(
        volume=Volume(array, affine, meta),
        datasets=datasets,
        files=files,
        modality=mod,
        series_uid=meta["series_uid"],
        study_uid=meta["study_uid"],
        frame_of_reference_uid=meta["frame_of_reference_uid"],
        set_aside=set_aside,
        sources=labels,
    )
