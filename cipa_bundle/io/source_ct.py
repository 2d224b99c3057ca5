"""The CT slices a derived object (DICOM SEG, RTSTRUCT) references: the checks and references both writers share.

A derived object is only useful when it names the CT it was drawn on: viewers and planning systems place it by the
CT's frame of reference and instance UIDs. Both writers therefore check the CT headers up front, with one error
that names the slice and the tag, and reference a slice the same way, whether it is a single-frame instance or a
frame of a multi-frame object (:mod:`cipa_bundle.io.multiframe`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydicom.dataset import Dataset

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.multiframe import frame_number

__all__ = [
    "REQUIRED_SOURCE",
    "TYPE2_PATIENT_STUDY",
    "binary_mask_on_ct",
    "check_source_ct",
    "referenced_image",
    "source_name",
]

#: Type-2 patient/study attributes a derived object copies from its CT. DICOM only requires them to be present
#: (possibly empty), but anonymisers and some writers drop them; an empty value is the standard's answer.
TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

#: CT attributes without which a derived object cannot state where it lies or what it references.
REQUIRED_SOURCE = (
    "SOPInstanceUID",
    "SOPClassUID",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "FrameOfReferenceUID",
    "Rows",
    "Columns",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
)


def source_name(ds: Dataset, k: int) -> str:
    """How an error message names a CT slice: its file (and frame) when known, else its position in the list."""
    filename = getattr(ds, "filename", None)
    frame = frame_number(ds)
    where = f"{filename} frame {frame}" if filename and frame else filename
    return f"{where} (slice k={k})" if where else f"source_ct_datasets[{k}]"


def check_source_ct(
    source_ct_datasets: Sequence[Dataset], product: str, error: type[CipaInputError] = CipaInputError
) -> tuple[int, int]:
    """Check that the CT headers describe one series that a derived object can reference; return ``(rows, columns)``.

    Args:
        source_ct_datasets: the CT slice headers in ``k`` order (``DicomSeries.datasets``).
        product: what is being written, for the message (``"a DICOM SEG"``, ``"an RTSTRUCT"``).
        error: the exception class to raise.

    Raises:
        ``error``: an empty list; a missing or empty :data:`REQUIRED_SOURCE` tag; slices that differ in series,
        frame of reference, matrix size, orientation or pixel spacing; or the same slice (SOPInstanceUID and frame
        number) twice.
    """
    if len(source_ct_datasets) == 0:
        raise error(f"source_ct_datasets is empty: {product} needs the CT series it was derived from")
    first = source_ct_datasets[0]
    for k, ds in enumerate(source_ct_datasets):
        for keyword in REQUIRED_SOURCE:
            if keyword not in ds or ds[keyword].value in (None, ""):
                raise error(f"{source_name(ds, k)}: tag {keyword} is missing; {product} needs it to reference the CT")
        for keyword in ("SeriesInstanceUID", "FrameOfReferenceUID", "Rows", "Columns"):
            if ds[keyword].value != first[keyword].value:
                raise error(
                    f"{source_name(ds, k)}: tag {keyword} is {ds[keyword].value!r}, expected "
                    f"{first[keyword].value!r} as in the first slice (all slices must come from one CT series)"
                )
        for keyword in ("ImageOrientationPatient", "PixelSpacing"):
            if not np.allclose([float(v) for v in ds[keyword].value], [float(v) for v in first[keyword].value],
                               atol=1e-4):
                raise error(
                    f"{source_name(ds, k)}: tag {keyword} is {list(ds[keyword].value)}, expected "
                    f"{list(first[keyword].value)} as in the first slice"
                )
    # Frames of one multi-frame CT share its SOPInstanceUID; the frame number tells them apart.
    slices = [(str(ds.SOPInstanceUID), frame_number(ds)) for ds in source_ct_datasets]
    if len(set(slices)) != len(slices):
        raise error("source_ct_datasets: tag SOPInstanceUID (and frame number) repeats; expected one dataset per CT "
                    "slice")
    return int(first.Rows), int(first.Columns)


def binary_mask_on_ct(
    mask_ijk: np.ndarray, source_ct_datasets: Sequence[Dataset], error: type[CipaInputError] = CipaInputError
) -> np.ndarray:
    """The mask as a bool ``(I, J, K)`` array on the CT's grid, refusing a wrong shape or values other than 0/1.

    Args:
        mask_ijk: ``(I, J, K)`` = (Columns, Rows, number of slices), indexed [column, row, slice] with ``k`` in the
            order of ``source_ct_datasets`` (checked with :func:`check_source_ct` first).
        source_ct_datasets: the CT slice headers in ``k`` order.
        error: the exception class to raise.
    """
    first = source_ct_datasets[0]
    mask = np.asarray(mask_ijk)
    expected = (int(first.Columns), int(first.Rows), len(source_ct_datasets))
    if mask.shape != expected:
        raise error(
            f"mask_ijk has shape {mask.shape}, expected (Columns, Rows, slices) = {expected} from the CT series "
            f"{first.SeriesInstanceUID}"
        )
    if mask.dtype != np.bool_:
        values = np.unique(mask)
        if not np.all(np.isin(values, (0, 1))):
            raise error(
                f"mask_ijk holds values {values[:6].tolist()}{'...' if values.size > 6 else ''}, expected a binary "
                "mask of 0 and 1 (threshold probabilities first)"
            )
    return mask.astype(bool)


def referenced_image(ds: Dataset) -> Dataset:
    """An image-reference item (ReferencedSOPClassUID, ReferencedSOPInstanceUID, and ReferencedFrameNumber for a
    frame of a multi-frame CT) pointing at one CT slice."""
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    frame = frame_number(ds)
    if frame is not None:
        item.ReferencedFrameNumber = frame
    return item
