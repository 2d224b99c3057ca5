"""DICOM RT Structure Set (RTSTRUCT) input and output: planar contours <-> a binary mask on a CT grid.

Radiotherapy planning systems and most annotation tools (MIM, Eclipse, RayStation, 3D Slicer) exchange tumour
outlines as RTSTRUCT: per ROI, a list of closed polygons in patient millimetres (LPS), one or more per CT slice.
This module turns one ROI into a voxel mask on the CT grid (:func:`read_rtstruct_mask`) and a mask into an
RTSTRUCT that references the CT it was drawn on (:func:`write_rtstruct`).

Guarantees:

* **Voxel-centre rule.** A voxel belongs to the ROI when its *centre* lies inside the contour (point in polygon),
  not when the polygon covers some or most of its area. MIRP (which made the IBSI reference masks) uses the same
  rule: on the 8 IBSI STS patients the masks read here equal MIRP's voxel for voxel. A centre exactly on a contour
  counts as inside that contour (scikit-image's rule; so on a hole's edge it is outside); real contours almost
  never pass exactly through a centre.
* **Even-odd rule.** Several contours of one ROI on one slice are combined by XOR (parity): a contour inside another
  is a hole, an island inside that hole is filled again. This is how planning systems store holes (DICOM has no
  separate "hole" flag) and it does not depend on the orientation in which contours were drawn.
* **Geometry checks.** Every contour must lie on one CT slice plane: each point within 10 % of the slice spacing of
  the nearest slice centre along the slice normal (the same 10 % the DICOM reader allows for slice positions, see
  :mod:`cipa_bundle.io.dicom`). A contour between slices, tilted across slices or beyond the first/last slice is
  refused, naming its number and position; the ROI's frame of reference must be the CT's.
* **Round trip.** :func:`write_rtstruct` traces each slice with marching squares at level 0.5 on the zero-padded
  slice. Those contours run through the midpoints between voxel centres and never through a centre, so
  rasterising them again with the voxel-centre and even-odd rules gives back the mask exactly (up to the 1e-4 mm
  rounding of the written coordinates, far from any centre).
* **All-or-nothing output** through :func:`~cipa_bundle.io.atomic.atomic_outputs`.

Axis conventions: masks are ``(I, J, K)`` = [column, row, slice] as in :class:`~cipa_bundle.io.volume.Volume`, with
``k`` in the order of the CT headers (:attr:`DicomSeries.datasets`); ContourData is LPS millimetres
``x1\\y1\\z1\\x2\\...``, while ``Volume.affine`` maps indices to RAS, so points pass through ``LPS_TO_RAS`` first.

Choice of library: scikit-image. ``skimage.draw.polygon`` tests voxel centres (what the rule above needs) and
``skimage.measure.find_contours`` gives closed sub-voxel contours; it is maintained, numpy-native and light.
rt-utils was not used: it needs opencv-python (a large binary with GUI libraries) and its ``cv2.fillPoly`` rounds
vertices to whole pixels and fills every pixel the edges touch, so boundary voxels whose centre is outside the
contour are marked. highdicom has no RTSTRUCT support.
The dataset itself is built with pydicom.
"""

from __future__ import annotations

import copy
import datetime as _dt
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import format_number_as_ds

from cipa_bundle import __version__
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.source_ct import TYPE2_PATIENT_STUDY, binary_mask_on_ct, check_source_ct, referenced_image
from cipa_bundle.io.volume import LPS_TO_RAS

if TYPE_CHECKING:
    from cipa_bundle.io.dicom import DicomSeries

__all__ = [
    "RTSTRUCT_SOP_CLASS_UID",
    "RtStructError",
    "list_rois",
    "read_rtstruct_mask",
    "write_rtstruct",
]

#: RT Structure Set Storage SOP Class UID.
RTSTRUCT_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.481.3"

# What RTSTRUCT writers (MIM among them, as in the IBSI STS files) put in RTReferencedStudySequence's
# ReferencedSOPClassUID: Detached Study Management, retired but still what planning systems expect there.
_STUDY_REFERENCE_SOP_CLASS_UID = "1.2.840.10008.3.1.2.3.1"

# A contour point may sit at most this fraction of the slice spacing from the slice centre along the normal.
_SLICE_TOL_FRACTION = 0.1

# Written coordinates are rounded to this many decimals of a millimetre: 1e-4 mm is far below any voxel, and the
# shortest representation stays well inside the 16 characters DS allows.
_DS_DECIMALS = 4

# Type-3 attributes copied when the CT has them, so that viewers group the RTSTRUCT with its study.
_OPTIONAL_COPIED = ("StudyDescription", "PatientAge", "PatientWeight", "PatientSize")


class RtStructError(CipaInputError):
    """An RTSTRUCT file, ROI or contour that cannot be turned into a mask on the given CT (or a mask that cannot be
    written as one)."""


# ---------------------------------------------------------------------------------------------------- reading
def _load(path: Path) -> Dataset:
    """Read ``path`` and check that it is an RT Structure Set.

    Raises:
        RtStructError: unreadable, or Modality / SOPClassUID not those of an RTSTRUCT.
    """
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError) as err:
        raise RtStructError(f"{path}: not a readable DICOM file ({err}); expected an RTSTRUCT") from err
    modality = str(ds.get("Modality", ""))
    sop_class = str(ds.get("SOPClassUID", ""))
    if modality != "RTSTRUCT" or sop_class != RTSTRUCT_SOP_CLASS_UID:
        raise RtStructError(
            f"{path}: Modality (0008,0060) is {modality!r} and SOPClassUID (0008,0016) is {sop_class!r}; expected "
            f"'RTSTRUCT' and {RTSTRUCT_SOP_CLASS_UID} (RT Structure Set Storage)"
        )
    return ds


def _roi_items(ds: Dataset) -> list[Dataset]:
    """The StructureSetROISequence (3006,0020) items in file order (empty when the sequence is absent)."""
    return list(ds.get("StructureSetROISequence", None) or [])


def list_rois(rtstruct_path: str | os.PathLike[str]) -> list[str]:
    """ROI names of an RTSTRUCT, in the order of its StructureSetROISequence (3006,0020).

    Args:
        rtstruct_path: the RTSTRUCT file.

    Returns:
        The ROIName (3006,0026) of every ROI (``""`` for an ROI without a name); empty if the file defines no ROI.

    Raises:
        RtStructError: the file is not a readable RTSTRUCT.
    """
    ds = _load(Path(rtstruct_path))
    return [str(item.get("ROIName", "")) for item in _roi_items(ds)]


def _select_roi(path: Path, ds: Dataset, roi: str | None) -> Dataset:
    """The StructureSetROISequence item named ``roi`` (or the only one when ``roi`` is None)."""
    items = _roi_items(ds)
    names = [str(item.get("ROIName", "")) for item in items]
    if not items:
        raise RtStructError(
            f"{path}: StructureSetROISequence (3006,0020) holds no ROI; expected at least one ROI to rasterise"
        )
    if roi is None:
        if len(items) > 1:
            raise RtStructError(
                f"{path}: StructureSetROISequence (3006,0020) holds {len(items)} ROIs {names}; expected one, or "
                "choose one with --roi NAME (roi=NAME)"
            )
        return items[0]
    matches = [item for item, name in zip(items, names, strict=True) if name == roi]
    if not matches:
        raise RtStructError(
            f"{path}: no ROI named {roi!r} in StructureSetROISequence (3006,0020); the ROIs are {names}"
        )
    if len(matches) > 1:
        numbers = [str(item.get("ROINumber", "?")) for item in matches]
        raise RtStructError(
            f"{path}: ROIName (3006,0026) {roi!r} names {len(matches)} ROIs (ROINumber {', '.join(numbers)}); "
            "expected a unique name"
        )
    return matches[0]


def _check_frame_of_reference(path: Path, ds: Dataset, roi_item: Dataset, roi_name: str, ct_uid: str) -> None:
    """Refuse an ROI drawn in another frame of reference than the CT's (its coordinates would mean nothing there)."""
    roi_uid = str(roi_item.get("ReferencedFrameOfReferenceUID", "") or "")
    where = f"ReferencedFrameOfReferenceUID (3006,0024) of ROI {roi_name!r}"
    if not roi_uid:
        # Type 1, but some exporters leave it out; the structure set's own list of frames is the fallback.
        listed = {
            str(item.get("FrameOfReferenceUID", ""))
            for item in ds.get("ReferencedFrameOfReferenceSequence", None) or []
        } - {""}
        if len(listed) > 1:
            raise RtStructError(
                f"{path}: ROI {roi_name!r} has no ReferencedFrameOfReferenceUID (3006,0024) and "
                f"ReferencedFrameOfReferenceSequence (3006,0010) lists {len(listed)} frames {sorted(listed)}; expected "
                "one, so that the ROI's frame of reference is known"
            )
        if listed:
            roi_uid = listed.pop()
            where = "FrameOfReferenceUID in ReferencedFrameOfReferenceSequence (3006,0010)"
    if not roi_uid or not ct_uid:
        warnings.warn(
            f"{path}: ROI {roi_name!r}: the frame of reference cannot be checked (RTSTRUCT {roi_uid or 'none'}, CT "
            f"{ct_uid or 'none'}); the contours are placed by their LPS coordinates alone",
            stacklevel=3,
        )
        return
    if roi_uid != ct_uid:
        raise RtStructError(
            f"{path}: {where} is {roi_uid}, but the CT's FrameOfReferenceUID (0020,0052) is {ct_uid}; expected the "
            "same frame of reference (contours of another scan cannot be placed on this CT)"
        )


def _roi_number(path: Path, roi_item: Dataset, roi_name: str) -> int:
    """ROINumber (3006,0022) of an ROI, parsed."""
    try:
        return int(roi_item.ROINumber)
    except (AttributeError, TypeError, ValueError) as err:
        raise RtStructError(
            f"{path}: ROI {roi_name!r} has no readable ROINumber (3006,0022) ({err}); expected an integer that its "
            "ROIContourSequence item refers to"
        ) from err


def _referenced_roi_number(item: Dataset) -> int | None:
    """ReferencedROINumber (3006,0084) of an ROIContourSequence item, or None when absent or unreadable (such an
    item cannot belong to any ROI)."""
    try:
        return int(item.ReferencedROINumber)
    except (AttributeError, TypeError, ValueError):
        return None


def _slice_positions(ct: DicomSeries) -> tuple[np.ndarray, np.ndarray, float]:
    """The slice normal (unit, LPS), each slice's position along it (mm, ``k`` order) and the slice spacing (mm).

    Positions come from each header's ImagePositionPatient when the headers match the volume, so a contour drawn on
    a slice that sits slightly off the reader's fitted uniform grid (multi-bed jitter) is matched to that slice.
    """
    lps = LPS_TO_RAS @ ct.volume.affine
    step = lps[:3, 2]
    spacing = float(np.linalg.norm(step))
    normal = step / spacing
    n_slices = ct.volume.shape[2]
    if len(ct.datasets) == n_slices and all("ImagePositionPatient" in d for d in ct.datasets):
        ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in ct.datasets])
        positions = ipp @ normal
    else:
        positions = (lps[:3, 3] + np.arange(n_slices)[:, None] * step) @ normal
    return normal, positions, spacing


def _contour_label(item: Dataset, index: int) -> str:
    """How messages name a contour: its ContourNumber (3006,0048) when present, always its 1-based position."""
    number = item.get("ContourNumber", None)
    return f"contour #{index}" + (f" (ContourNumber {number})" if number not in (None, "") else "")


def _ds_values(item: Dataset, tag: int) -> np.ndarray:
    """The values of a multi-valued DS element as float64.

    A large structure set holds hundreds of thousands of coordinates, and pydicom's per-value DSfloat conversion
    takes seconds for them; numpy parses the raw backslash-separated bytes at once when the element is still raw.
    """
    element = item.get_item(tag)
    if isinstance(element, RawDataElement) and isinstance(element.value, bytes):
        text = element.value.strip(b" \0")
        return np.array(text.split(b"\\"), dtype=np.bytes_).astype(np.float64) if text else np.zeros(0)
    values = item[tag].value
    if values is None or values == "":
        return np.zeros(0)
    if isinstance(values, MultiValue):
        return np.array([float(v) for v in values], dtype=np.float64)
    return np.array([float(values)], dtype=np.float64)


def _contour_points(path: Path, item: Dataset, label: str, roi_name: str) -> np.ndarray:
    """ContourData (3006,0050) of one contour as ``(N, 3)`` LPS mm, checked."""
    if "ContourData" not in item:
        raise RtStructError(f"{path}: ROI {roi_name!r} {label}: ContourData (3006,0050) is missing; expected x\\y\\z "
                            "triplets in mm")
    try:
        values = _ds_values(item, 0x30060050)
    except (TypeError, ValueError) as err:
        raise RtStructError(
            f"{path}: ROI {roi_name!r} {label}: ContourData (3006,0050) holds a non-numeric value ({err}); expected "
            "decimal strings"
        ) from err
    if values.size == 0 or values.size % 3 != 0:
        raise RtStructError(
            f"{path}: ROI {roi_name!r} {label}: ContourData (3006,0050) holds {values.size} values; expected a "
            "non-zero multiple of 3 (x\\y\\z triplets)"
        )
    if not np.all(np.isfinite(values)):
        raise RtStructError(f"{path}: ROI {roi_name!r} {label}: ContourData (3006,0050) holds NaN or infinite values")
    points = values.reshape(-1, 3)
    declared = item.get("NumberOfContourPoints", None)
    if declared not in (None, "") and int(declared) != len(points):
        raise RtStructError(
            f"{path}: ROI {roi_name!r} {label}: NumberOfContourPoints (3006,0046) is {int(declared)} but ContourData "
            f"(3006,0050) holds {len(points)} points; expected them to agree (truncated or corrupt contour?)"
        )
    return points


def _contour_slice(
    path: Path,
    points_lps: np.ndarray,
    normal: np.ndarray,
    positions: np.ndarray,
    spacing: float,
    label: str,
    roi_name: str,
) -> int:
    """The index ``k`` of the CT slice a contour lies on, refusing contours off every slice plane."""
    along = points_lps @ normal
    tolerance = _SLICE_TOL_FRACTION * spacing
    k = int(np.argmin(np.abs(positions - along.mean())))
    lo, hi = float(positions.min()), float(positions.max())
    where = (
        f"lies at {along.min():.3f}..{along.max():.3f} mm along the slice normal (z)"
        if np.ptp(along) > 1e-6
        else f"lies at z = {along[0]:.3f} mm along the slice normal"
    )
    if along.max() < lo - tolerance or along.min() > hi + tolerance:
        raise RtStructError(
            f"{path}: ROI {roi_name!r} {label} {where}, outside the CT's slices ({lo:.3f}..{hi:.3f} mm); expected "
            "contours within the CT's slice range (is this RTSTRUCT drawn on another, longer scan?)"
        )
    off = np.abs(along - positions[k])
    if off.max() > tolerance:
        raise RtStructError(
            f"{path}: ROI {roi_name!r} {label} {where}; expected every point within {tolerance:.3f} mm "
            f"({_SLICE_TOL_FRACTION:.0%} of the {spacing:.3f} mm slice spacing) of one CT slice plane, the nearest "
            f"being slice k={k} at z = {positions[k]:.3f} mm (off by up to {off.max():.3f} mm)"
        )
    return k


def _polygon_area(i: np.ndarray, j: np.ndarray) -> float:
    """Unsigned shoelace area of a closed polygon in index units."""
    return 0.5 * abs(float(np.dot(i, np.roll(j, -1)) - np.dot(j, np.roll(i, -1))))


def read_rtstruct_mask(
    rtstruct_path: str | os.PathLike[str],
    ct: DicomSeries,
    roi: str | None = None,
) -> np.ndarray:
    """Rasterise one ROI of an RTSTRUCT onto the voxel grid of a CT series.

    Rules (see the module docstring): a voxel is inside when its centre is inside the contour; contours on one slice
    combine by XOR (even-odd); every contour must lie on one CT slice plane (10 % of the spacing). Contours that are
    not areas (POINT, OPEN_PLANAR, OPEN_NONPLANAR) and degenerate ones (fewer than 3 points, zero area) are skipped
    with a warning. Parts of a contour outside the CT's field of view are cut off (with a warning). Which CT images
    the contours reference (ContourImageSequence) is not used: placement is by coordinates, so an ROI drawn on
    another series of the same frame of reference (e.g. the PET) is rasterised correctly on the CT.

    Args:
        rtstruct_path: the RTSTRUCT file.
        ct: the CT series (:func:`cipa_bundle.io.dicom.read_series`); the mask takes ``ct.volume``'s grid.
        roi: ROIName to read; may be left out when the file has exactly one ROI.

    Returns:
        ``uint8`` ``(I, J, K)`` = [column, row, slice] mask of 0/1, on the grid and in the axis order of
        ``ct.volume``. An ROI with no contours gives an all-zero mask (and a warning).

    Raises:
        RtStructError: (a :class:`CipaInputError`) the file is not an RTSTRUCT; it has no ROI; several ROIs and
            ``roi`` is None; no ROI of that name; the ROI's frame of reference is not the CT's; a contour with
            unreadable ContourData, between or tilted across slices, or beyond the CT's slice range; or an ROI
            whose contours are all unusable (no closed planar contour).
    """
    from skimage.draw import polygon

    path = Path(rtstruct_path)
    ds = _load(path)
    roi_item = _select_roi(path, ds, roi)
    roi_name = str(roi_item.get("ROIName", ""))
    _check_frame_of_reference(path, ds, roi_item, roi_name, str(ct.frame_of_reference_uid or ""))
    number = _roi_number(path, roi_item, roi_name)

    shape = ct.volume.shape
    mask = np.zeros(shape, dtype=bool)
    contour_items = [
        item for item in ds.get("ROIContourSequence", None) or [] if _referenced_roi_number(item) == number
    ]
    contours = [c for item in contour_items for c in (item.get("ContourSequence", None) or [])]
    if not contours:
        warnings.warn(
            f"{path}: ROI {roi_name!r} (ROINumber {number}) has no contour in ROIContourSequence (3006,0039); "
            "returning an empty mask",
            stacklevel=2,
        )
        return mask.astype(np.uint8)

    normal, positions, spacing = _slice_positions(ct)
    ras_to_index = np.linalg.inv(ct.volume.affine)
    skipped: Counter[str] = Counter()
    used = 0
    clipped = 0
    for index, item in enumerate(contours, start=1):
        label = _contour_label(item, index)
        kind = str(item.get("ContourGeometricType", "")).strip()
        if kind != "CLOSED_PLANAR":
            # POINT and OPEN_* contours mark locations or lines, not areas: nothing to fill.
            skipped[kind or "(missing ContourGeometricType)"] += 1
            continue
        points = _contour_points(path, item, label, roi_name)
        k = _contour_slice(path, points, normal, positions, spacing, label, roi_name)
        homogeneous = np.c_[points, np.ones(len(points))] @ LPS_TO_RAS.T
        ijk = homogeneous @ ras_to_index.T
        ci, cj = ijk[:, 0], ijk[:, 1]
        if len(points) < 3 or _polygon_area(ci, cj) < 1e-9:
            skipped["degenerate CLOSED_PLANAR (fewer than 3 points or zero area)"] += 1
            continue
        # Voxel centres are at integer indices, so the grid's outer edge is at -0.5 and size - 0.5.
        low_edge, high_edge = -0.5 - 1e-3, np.array(shape[:2]) - 0.5 + 1e-3
        if min(ci.min(), cj.min()) < low_edge or ci.max() > high_edge[0] or cj.max() > high_edge[1]:
            clipped += 1
        rr, cc = polygon(ci, cj, shape=shape[:2])
        inside = np.zeros(shape[:2], dtype=bool)
        inside[rr, cc] = True
        # XOR rather than OR: a contour within another cuts a hole (even-odd rule).
        mask[:, :, k] ^= inside
        used += 1

    if skipped:
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items()))
        if used == 0:
            raise RtStructError(
                f"{path}: ROI {roi_name!r}: none of its {len(contours)} contours is usable ({summary}); expected "
                "ContourGeometricType (3006,0042) CLOSED_PLANAR contours enclosing an area"
            )
        warnings.warn(f"{path}: ROI {roi_name!r}: skipped {summary} contour(s); they enclose no area", stacklevel=2)
    if clipped:
        warnings.warn(
            f"{path}: ROI {roi_name!r}: {clipped} contour(s) extend beyond the CT's {shape[0]}x{shape[1]} field of "
            "view; the part outside is lost",
            stacklevel=2,
        )
    return mask.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- writing
def _trace_slice(plane: np.ndarray) -> list[np.ndarray]:
    """Closed contours around the ``True`` voxels of one ``(I, J)`` slice, as ``(N, 2)`` continuous (i, j) indices.

    Each contour is open-ended (first point not repeated, as DICOM's CLOSED_PLANAR implies the closing edge) and
    keeps only its corners: vertices on a straight run add nothing to the polygon.
    """
    from skimage.measure import find_contours

    # The zero border closes contours of voxels on the slice edge; it shifts indices by one, undone below.
    padded = np.pad(plane, 1).astype(np.float64)
    traced = []
    for contour in find_contours(padded, 0.5):
        points = contour - 1.0
        if len(points) > 1 and np.allclose(points[0], points[-1]):
            points = points[:-1]
        before = np.roll(points, 1, axis=0)
        after = np.roll(points, -1, axis=0)
        turn = (points[:, 0] - before[:, 0]) * (after[:, 1] - points[:, 1]) - (points[:, 1] - before[:, 1]) * (
            after[:, 0] - points[:, 0]
        )
        corners = points[np.abs(turn) > 1e-9]
        if len(corners) >= 3:
            traced.append(corners)
    return traced


def _ds_strings(values: np.ndarray) -> list[str]:
    """Decimal strings for DS values, rounded to ``_DS_DECIMALS`` and never longer than DS's 16 characters."""
    out = []
    for value in np.round(values.astype(np.float64), _DS_DECIMALS):
        # repr is the shortest string that reads back as the same float, e.g. "-12.5" for -12.5000.
        text = repr(float(value)).removesuffix(".0")
        if text == "-0":
            text = "0"
        out.append(text if len(text) <= 16 else format_number_as_ds(float(value)))
    return out


def write_rtstruct(
    mask_ijk: np.ndarray,
    source_ct_datasets: Sequence[Dataset],
    out_path: str | os.PathLike[str],
    *,
    roi_name: str = "tumor",
    series_description: str = "CIPA tumor contours",
    series_number: int = 902,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    structure_set_label: str = "CIPA",
    roi_color: tuple[int, int, int] = (255, 0, 0),
    content_datetime: _dt.datetime | None = None,
) -> Path:
    """Write a binary mask as an RTSTRUCT with one ROI, drawn on and referencing a CT series.

    Each slice's mask is traced with marching squares (level 0.5, zero-padded) into closed contours through the
    midpoints between voxel centres; holes become separate contours, which readers combine by the even-odd rule.
    Points are written in LPS mm at the slice's own ImagePositionPatient, rounded to 1e-4 mm. The ROI is coded
    ROIGenerationAlgorithm ``AUTOMATIC``, RTROIInterpretedType ``GTV``, with ApprovalStatus ``UNAPPROVED`` (the
    output of a research model, not a reviewed plan). An all-zero mask gives a valid RTSTRUCT whose ROI has no
    contours (ContourSequence is optional in the ROI Contour module).

    Args:
        mask_ijk: ``(I, J, K)`` = (Columns, Rows, number of slices) binary mask (bool or integers 0/1), indexed
            [column, row, slice] with ``k`` in the order of ``source_ct_datasets``.
        source_ct_datasets: the CT slice headers (pixel data not needed), one per ``k``: ``DicomSeries.datasets``.
        out_path: the ``.dcm`` file to write (parent folders are created).
        roi_name: ROIName (3006,0026).
        series_description: SeriesDescription of the new RTSTRUCT series.
        series_number: SeriesNumber of the new series (902; the DICOM SEG writer uses 901).
        instance_number: InstanceNumber.
        series_instance_uid: SeriesInstanceUID; a new random UID by default.
        sop_instance_uid: SOPInstanceUID; a new random UID by default.
        structure_set_label: StructureSetLabel (3006,0002), at most 16 characters.
        roi_color: ROIDisplayColor (3006,002A) as (R, G, B), 0-255.
        content_datetime: StructureSetDate/Time, SeriesDate/Time and InstanceCreationDate/Time; now by default
            (pass a fixed value for reproducible output).

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`; the file appears only once complete.

    Raises:
        RtStructError: (a :class:`CipaInputError`) a mask of the wrong shape or with values other than 0/1, or CT
            headers that cannot be referenced (empty list, missing tags, slices of several series or geometries), or
            a roi_name / structure_set_label too long for its DICOM value representation.
    """
    check_source_ct(source_ct_datasets, "an RTSTRUCT", RtStructError)
    first = source_ct_datasets[0]
    mask = binary_mask_on_ct(mask_ijk, source_ct_datasets, RtStructError)
    if not roi_name or len(roi_name) > 64 or "\\" in roi_name:
        raise RtStructError(
            f"roi_name {roi_name!r}: expected 1 to 64 characters without a backslash (VR LO of ROIName (3006,0026))"
        )
    if len(structure_set_label) > 16:
        raise RtStructError(
            f"structure_set_label {structure_set_label!r} has {len(structure_set_label)} characters; expected at "
            "most 16 (VR SH of StructureSetLabel (3006,0002))"
        )

    when = content_datetime or _dt.datetime.now()
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    sop_uid = sop_instance_uid or generate_uid()
    frame_uid = str(first.FrameOfReferenceUID)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTSTRUCT_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(out_path), {}, file_meta=meta, preamble=b"\0" * 128)

    # SOP Common. UTF-8, since names copied from the CT were decoded from whatever character set it used.
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = RTSTRUCT_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
    # Patient and General Study: copied so that the RTSTRUCT joins the CT's study.
    # Elements are copied whole, value unchanged: a non-conforming value (the IBSI CTs' 17-18 character StudyID
    # in a 16-character SH) must still match the CT's, and pydicom already warned once when decoding it.
    for keyword in TYPE2_PATIENT_STUDY + _OPTIONAL_COPIED:
        if keyword in first:
            ds.add(copy.deepcopy(first[keyword]))
        elif keyword in TYPE2_PATIENT_STUDY:
            setattr(ds, keyword, "")
    ds.StudyInstanceUID = first.StudyInstanceUID
    # RT Series
    ds.Modality = "RTSTRUCT"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.OperatorsName = ""
    # General Equipment
    ds.Manufacturer = "cipa_bundle"
    ds.ManufacturerModelName = "CIPA"
    ds.SoftwareVersions = f"cipa_bundle {__version__}"
    # Frame of Reference: the CT's (contours are in its patient coordinates).
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = first.get("PositionReferenceIndicator", "") or ""

    # Structure Set
    ds.StructureSetLabel = structure_set_label
    ds.StructureSetName = f"CIPA {roi_name}"[:64]
    ds.StructureSetDate, ds.StructureSetTime = date, time
    ds.InstanceNumber = int(instance_number)
    series_ref = Dataset()
    series_ref.SeriesInstanceUID = first.SeriesInstanceUID
    series_ref.ContourImageSequence = DicomSequence([referenced_image(s) for s in source_ct_datasets])
    study_ref = Dataset()
    study_ref.ReferencedSOPClassUID = _STUDY_REFERENCE_SOP_CLASS_UID
    study_ref.ReferencedSOPInstanceUID = first.StudyInstanceUID
    study_ref.RTReferencedSeriesSequence = DicomSequence([series_ref])
    frame_ref = Dataset()
    frame_ref.FrameOfReferenceUID = frame_uid
    frame_ref.RTReferencedStudySequence = DicomSequence([study_ref])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame_ref])
    roi_def = Dataset()
    roi_def.ROINumber = 1
    roi_def.ReferencedFrameOfReferenceUID = frame_uid
    roi_def.ROIName = roi_name
    roi_def.ROIGenerationAlgorithm = "AUTOMATIC"
    roi_def.ROIGenerationDescription = f"CIPA (cipa_bundle {__version__})"[:64]
    ds.StructureSetROISequence = DicomSequence([roi_def])

    # ROI Contour: the slice's own ImagePositionPatient puts the points exactly in its plane.
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    # IOP's first vector runs along a row (increasing column index i), the second down a column (index j);
    # PixelSpacing is (between rows, between columns) = (j step, i step).
    step_i = iop[:3] * column_spacing
    step_j = iop[3:] * row_spacing
    contour_items = []
    for k, source in enumerate(source_ct_datasets):
        if not mask[:, :, k].any():
            continue
        origin = np.array([float(v) for v in source.ImagePositionPatient])
        for points_ij in _trace_slice(mask[:, :, k]):
            lps = origin + points_ij[:, :1] * step_i + points_ij[:, 1:] * step_j
            contour = Dataset()
            contour.ContourImageSequence = DicomSequence([referenced_image(source)])
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = len(lps)
            contour.ContourNumber = len(contour_items) + 1
            contour.ContourData = _ds_strings(lps.ravel())
            contour_items.append(contour)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = 1
    roi_contour.ROIDisplayColor = [int(c) for c in roi_color]
    if contour_items:
        roi_contour.ContourSequence = DicomSequence(contour_items)
    ds.ROIContourSequence = DicomSequence([roi_contour])

    # RT ROI Observations
    observation = Dataset()
    observation.ObservationNumber = 1
    observation.ReferencedROINumber = 1
    observation.RTROIInterpretedType = "GTV"
    observation.ROIInterpreter = ""
    ds.RTROIObservationsSequence = DicomSequence([observation])
    # Approval: machine output nobody has reviewed yet.
    ds.ApprovalStatus = "UNAPPROVED"

    out = Path(out_path)
    with atomic_outputs([out]) as (tmp,):
        ds.save_as(tmp, enforce_file_format=True)
    return out
