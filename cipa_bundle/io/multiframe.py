"""Enhanced and Legacy Converted Enhanced CT/PET objects (one multi-frame file per series), seen as single frames.

Newer scanners and PACS exports store a whole series as one multi-frame instance. Its per-slice attributes do not sit
at the top level of the dataset but in **functional groups**: every frame's attributes are the union of the
Shared Functional Groups Sequence (5200,9229) item and that frame's item of the Per-Frame Functional Groups
Sequence (5200,9230), each group being a sequence whose single item holds the attributes:

=============================================  ==================================================================
functional group                               attributes it carries
=============================================  ==================================================================
Plane Position (Patient) (0020,9113)           ImagePositionPatient
Plane Orientation (Patient) (0020,9116)        ImageOrientationPatient
Pixel Measures (0028,9110)                     PixelSpacing, SliceThickness, SpacingBetweenSlices
Pixel Value Transformation (0028,9145)         RescaleSlope, RescaleIntercept, RescaleType (per frame for PET)
Frame Content (0020,9111)                      FrameAcquisitionDateTime, FrameAcquisitionDuration
CT / PET Frame Type (0018,9329) / (0018,9751)  FrameType (the frame's ImageType)
Unassigned Shared / Per-Frame Converted        whatever a legacy conversion could not place elsewhere: for PET
Attributes (0020,9170) / (0020,9171)           Units, DecayCorrection, CorrectedImage, the radiopharmaceutical,
                                               vendor private timing and Philips scale factors, DecayFactor
=============================================  ==================================================================

:func:`frame_datasets` turns such an object into one **single-frame view** per frame: the top-level attributes,
overlaid by the shared groups' attributes, overlaid by that frame's, plus the frame's pixels. The names a classic
series uses are filled in from their functional-group equivalents where the view lacks them
(FrameAcquisitionDateTime becomes AcquisitionDateTime, FrameAcquisitionDuration becomes ActualFrameDuration,
FrameType becomes ImageType).

Why views rather than a second reader: the single-frame reader's geometry checks (orientation, duplicates, tilt,
the uniform-grid fit), its per-instance modality LUT and every SUV rule (E1-E17) then apply to a multi-frame object
unchanged, so one object gives exactly the NIfTI that its single-frame series gives, and is refused for exactly the
same reasons. highdicom's volume API (``highdicom.Image.get_volume``) reads geometry and pixels but not the SUV
inputs and would bypass those checks; pydicom decodes the pixel data (any transfer syntax it or GDCM reads).

A view is only an in-memory dataset: it shares the object's SOPInstanceUID, :func:`frame_number` gives its 1-based
frame number and :func:`source_object` the object itself, which writers of derived objects (DICOM SEG, RTSTRUCT)
need to reference the frame.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from cipa_bundle.errors import CipaInputError

__all__ = [
    "FRAME_NUMBER_ATTRIBUTE",
    "MULTIFRAME_IMAGE_STORAGE",
    "SOURCE_OBJECT_ATTRIBUTE",
    "frame_datasets",
    "frame_headers",
    "frame_number",
    "is_multiframe",
    "source_object",
]

#: SOP classes of the multi-frame CT and PET objects this module reads.
MULTIFRAME_IMAGE_STORAGE = {
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
}

#: Python attributes (not DICOM elements: they are never written) holding a view's 1-based frame number and the
#: multi-frame object it was taken from.
FRAME_NUMBER_ATTRIBUTE = "cipa_frame_number"
SOURCE_OBJECT_ATTRIBUTE = "cipa_source_object"

# Top-level elements a view must not inherit: the functional groups themselves (flattened instead) and the
# object's pixel data and frame count (replaced by the frame's).
_NOT_INHERITED = {
    0x52009229,  # SharedFunctionalGroupsSequence
    0x52009230,  # PerFrameFunctionalGroupsSequence
    0x7FE00010,  # PixelData
    0x00280008,  # NumberOfFrames
}

# Classic single-frame names filled in from their functional-group equivalents: (classic keyword, group keyword).
_CLASSIC_NAMES = (
    ("AcquisitionDateTime", "FrameAcquisitionDateTime"),
    ("ActualFrameDuration", "FrameAcquisitionDuration"),
    ("ImageType", "FrameType"),
)


def is_multiframe(ds: Dataset) -> bool:
    """Whether ``ds`` stores several frames, or belongs to one of the multi-frame SOP classes read here."""
    if str(ds.get("SOPClassUID", "")) in MULTIFRAME_IMAGE_STORAGE:
        return True
    try:
        return int(ds.get("NumberOfFrames", 1) or 1) > 1
    except (TypeError, ValueError):
        return False


def frame_number(ds: Dataset) -> int | None:
    """The 1-based frame number of a view made by :func:`frame_datasets`; ``None`` for a single-frame instance."""
    return getattr(ds, FRAME_NUMBER_ATTRIBUTE, None)


def source_object(ds: Dataset) -> Dataset | None:
    """The multi-frame object a view was taken from (its pixel data may have been dropped); ``None`` otherwise."""
    return getattr(ds, SOURCE_OBJECT_ATTRIBUTE, None)


def _group_attributes(group_item: Dataset) -> list:
    """The attributes inside one functional-groups item: every element of every macro sequence's first item."""
    elements = []
    for macro in group_item:
        if macro.VR == "SQ" and len(macro.value) > 0:
            elements.extend(macro.value[0])
    return elements


def frame_headers(ds: Dataset, path: str | Path) -> list[Dataset]:
    """The single-frame views of a multi-frame object, without pixel data (see :func:`frame_datasets`).

    Works on a header read with ``stop_before_pixels=True``.

    Raises:
        CipaInputError: an unsupported SOP class with several frames, or a Per-Frame Functional Groups Sequence
            that is missing or disagrees with NumberOfFrames; each message names the file and the tag.
    """
    path = Path(path)
    sop_class = str(ds.get("SOPClassUID", ""))
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as err:
        raise CipaInputError(
            f"{path}: NumberOfFrames (0028,0008) = {ds.get('NumberOfFrames')!r}; expected a positive integer"
        ) from err
    if sop_class not in MULTIFRAME_IMAGE_STORAGE:
        readable = ", ".join(f"{name} ({uid})" for uid, name in MULTIFRAME_IMAGE_STORAGE.items())
        raise CipaInputError(
            f"{path}: SOPClassUID (0008,0016) = {sop_class!r} with NumberOfFrames (0028,0008) = {n_frames}; "
            f"expected single-frame images or one of {readable}"
        )
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is None or len(per_frame) != n_frames:
        found = "absent" if per_frame is None else f"{len(per_frame)} items"
        raise CipaInputError(
            f"{path}: PerFrameFunctionalGroupsSequence (5200,9230) is {found}; expected one item per frame "
            f"(NumberOfFrames (0028,0008) = {n_frames})"
        )
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = _group_attributes(shared_seq[0]) if shared_seq else []
    top = [elem for elem in ds if elem.tag not in _NOT_INHERITED]
    views = []
    for n in range(n_frames):
        view = Dataset()
        for elem in top + shared + _group_attributes(per_frame[n]):
            view[elem.tag] = elem
        for classic, grouped in _CLASSIC_NAMES:
            if classic not in view and grouped in view:
                value = view[grouped].value
                # FrameAcquisitionDuration is FD (ms), ActualFrameDuration IS (ms).
                setattr(view, classic, str(int(round(float(value)))) if classic == "ActualFrameDuration" else value)
        view.filename = str(path)
        setattr(view, FRAME_NUMBER_ATTRIBUTE, n + 1)
        setattr(view, SOURCE_OBJECT_ATTRIBUTE, ds)
        views.append(view)
    return views


def frame_datasets(ds: Dataset, path: str | Path) -> list[Dataset]:
    """Split a multi-frame CT or PET object into single-frame views, one per frame, in frame order.

    Args:
        ds: the object, with its pixel data.
        path: its file, for error messages and each view's ``filename``.

    Returns:
        ``NumberOfFrames`` datasets. View ``n`` (0-based) holds frame ``n + 1``'s pixels as uncompressed
        ``(Rows, Columns)`` PixelData and every attribute that applies to that frame (see the module docstring);
        :func:`frame_number` gives ``n + 1``.

    Raises:
        CipaInputError: as :func:`frame_headers`, or pixel data that cannot be decoded; each message names the
            file and the tag.
    """
    views = frame_headers(ds, path)
    try:
        pixels = np.asarray(ds.pixel_array)
    except Exception as err:  # pydicom raises many types for broken or undecodable pixel data
        raise CipaInputError(
            f"{path}: PixelData (7FE0,0010) of {len(views)} frames cannot be decoded ({err}); expected uncompressed "
            "pixels or a compression an installed decoder reads"
        ) from err
    if len(views) == 1:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] != len(views):
        raise CipaInputError(
            f"{path}: pixel data has shape {pixels.shape}; expected {len(views)} greyscale frames of "
            f"Rows x Columns = {ds.get('Rows')} x {ds.get('Columns')}"
        )
    # Decoded frames are native-endian integers; each view declares the matching uncompressed encoding.
    pixels = pixels.astype(pixels.dtype.newbyteorder("<"), copy=False)
    for view, frame in zip(views, pixels):
        view.file_meta = FileMetaDataset()
        view.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        view.BitsAllocated = frame.dtype.itemsize * 8
        view.PixelRepresentation = 1 if frame.dtype.kind == "i" else 0
        view.PixelData = frame.tobytes()
    return views
