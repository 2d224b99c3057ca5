"""DICOM SEG output: a binary tumour mask stored as a DICOM Segmentation that references its source CT series.

A PACS or viewer (3D Slicer, OHIF, MONAI Label) shows a SEG on top of the CT it was derived from only when the SEG
names that CT: its ``ReferencedSeriesSequence`` lists the CT series and each frame's ``DerivationImageSequence``
points at the CT slice (``ReferencedSOPInstanceUID``) it was derived from. highdicom writes both when it is given
the CT headers in the same order as the mask frames, so the one thing this module must get right is that order.

Axis conventions:

* the mask is indexed ``[i, j, k]`` = [column, row, slice] exactly like :class:`~cipa_bundle.io.volume.Volume`,
  with ``k`` in the order of ``source_ct_datasets`` (the order the DICOM reader sorted the slices in);
* highdicom (and DICOM pixel data) wants ``(frames, rows, columns)``, i.e. ``[k, j, i]``: one transpose,
  ``mask.transpose(2, 1, 0)``, done in :func:`write_dicom_seg` and undone in :func:`read_dicom_seg_mask`.

Frames without any tumour are left out (DICOM allows it and it keeps a 150-slice SEG small); the frame-to-slice
mapping is carried by each frame's source-image reference, never by frame order, so reading back is exact.
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.utils import optional_import
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.sr.codedict import codes

from cipa_bundle import __version__
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.multiframe import frame_number, source_object
from cipa_bundle.io.nifti import AFFINE_ATOL_MM
from cipa_bundle.io.source_ct import TYPE2_PATIENT_STUDY, binary_mask_on_ct, check_source_ct

__all__ = ["SEG_SOP_CLASS_UID", "write_dicom_seg", "read_dicom_seg_mask"]

# Optional, not for lack of a wheel: the MONAI Label environment imports the output modules with pydicom 2, under
# which highdicom (pydicom >= 3) does not import; only writing or reading a SEG needs it.
hd, _ = optional_import("highdicom")

#: Segmentation Storage SOP Class UID.
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def _multiframe_source(source_ct_datasets: Sequence[Dataset]) -> tuple[Dataset, list[int]] | None:
    """``(object, frame numbers in k order)`` when the CT slices are frames of one multi-frame CT, else ``None``.

    Raises:
        CipaInputError: the slices mix single-frame instances and frames, or frames of several objects.
    """
    objects = [source_object(ds) for ds in source_ct_datasets]
    if all(obj is None for obj in objects):
        return None
    if any(obj is None for obj in objects) or len({id(obj) for obj in objects}) != 1:
        raise CipaInputError(
            f"source_ct_datasets of series {source_ct_datasets[0].SeriesInstanceUID}: mix single-frame instances and "
            "frames of multi-frame objects, or frames of several objects; expected one or the other"
        )
    return objects[0], [int(frame_number(ds)) for ds in source_ct_datasets]  # type: ignore[arg-type]


#: How far ImageOrientationPatient may differ between a SEG frame and the CT slice it references (direction cosines);
#: positions use the project's grid tolerance, :data:`~cipa_bundle.io.nifti.AFFINE_ATOL_MM`.
_ORIENTATION_TOLERANCE = 1e-4


def _spatial_locations_stated(seg: Dataset) -> bool:
    """Whether every frame's source reference says SpatialLocationsPreserved (0028,135A) YES."""
    for item in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                if str(source.get("SpatialLocationsPreserved", "")).upper() != "YES":
                    return False
    return True


def _check_frames_sit_on_their_sources(seg: Dataset, source_ct_datasets: Sequence[Dataset], path: object) -> None:
    """Every SEG frame lies on the CT slice it references: same ImagePositionPatient and ImageOrientationPatient.

    Needed when the SEG leaves SpatialLocationsPreserved out, which it may (the attribute is optional). dcmqi, the
    writer of MONAI Label's DICOMweb datastore and of 3D Slicer, does; highdicom then refuses to place the frames by
    reference alone, and the positions have to show that the reference holds.

    Raises:
        CipaInputError: a frame without position or source reference, or one that lies elsewhere than its CT slice
            (the message names the frame, both positions and the CT instance).
    """
    where = {(str(ds.SOPInstanceUID), frame_number(ds)): ds for ds in source_ct_datasets}
    shared = seg.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    for index, item in enumerate(seg.get("PerFrameFunctionalGroupsSequence", []), start=1):
        try:
            source = item.DerivationImageSequence[0].SourceImageSequence[0]
            position = np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
            holder = item if "PlaneOrientationSequence" in item else shared
            orientation = np.asarray(holder.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
        except (AttributeError, IndexError, KeyError) as err:
            raise CipaInputError(
                f"{path}: frame {index} has no source reference or plane position/orientation ({err}); expected "
                "DerivationImageSequence/SourceImageSequence and PlanePositionSequence in every frame"
            ) from None
        referenced_frame = source.get("ReferencedFrameNumber")
        key = (str(source.ReferencedSOPInstanceUID), None if referenced_frame is None else int(referenced_frame))
        ct = where.get(key)
        if ct is None:
            raise CipaInputError(f"{path}: frame {index} references {key[0]} (frame {key[1]}), which is not a slice "
                                 "of the given CT series")
        ct_position = np.asarray(ct.ImagePositionPatient, dtype=float)
        ct_orientation = np.asarray(ct.ImageOrientationPatient, dtype=float)
        if (np.abs(position - ct_position).max() > AFFINE_ATOL_MM
                or np.abs(orientation - ct_orientation).max() > _ORIENTATION_TOLERANCE):
            raise CipaInputError(
                f"{path}: frame {index} lies at ImagePositionPatient {position.round(3).tolist()} mm, orientation "
                f"{orientation.round(4).tolist()}, but references CT instance {key[0]} at "
                f"{ct_position.round(3).tolist()} mm, orientation {ct_orientation.round(4).tolist()}; expected the "
                "frame on the slice it references (SpatialLocationsPreserved is not stated)"
            )


def _with_type2_attributes(ds: Dataset) -> Dataset:
    """``ds`` itself when it has every attribute highdicom copies, else a header-only copy with the gaps empty.

    The copy shares element objects with ``ds`` (cheap, no pixel data) but has its own element dictionary, so the
    caller's dataset is never modified.
    """
    if all(keyword in ds for keyword in TYPE2_PATIENT_STUDY):
        return ds
    patched = Dataset()
    for element in ds:
        if element.tag != 0x7FE00010:  # PixelData: highdicom needs only the header
            patched.add(element)
    if hasattr(ds, "file_meta"):
        patched.file_meta = ds.file_meta
    for keyword in TYPE2_PATIENT_STUDY:
        if keyword not in patched:
            setattr(patched, keyword, "")
    return patched


def write_dicom_seg(
    mask_ijk: np.ndarray,
    source_ct_datasets: Sequence[Dataset],
    out_path: str | os.PathLike[str],
    *,
    label_name: str = "tumor",
    series_description: str = "CIPA tumor segmentation",
    series_number: int = 901,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    algorithm_version: str | None = None,
    content_datetime: _dt.datetime | None = None,
    omit_empty_frames: bool = True,
) -> Path:
    """Write a binary DICOM SEG (one segment) derived from, and referencing, a CT series.

    The segment is coded as SNOMED CT "Morphologically Abnormal Structure" (49755003, the current meaning of the
    category formerly named "Morphologically Altered Structure") / "Neoplasm, Primary" (372087000) in the lung
    (39607008), algorithm type ``AUTOMATIC``, algorithm "CIPA" of family "Artificial Intelligence" with the bundle
    version. ``ContentQualification`` is ``RESEARCH``: this bundle is not a medical device.

    Args:
        mask_ijk: ``(I, J, K)`` = (Columns, Rows, number of slices) binary mask (bool or integers 0/1), indexed
            [column, row, slice] with ``k`` in the order of ``source_ct_datasets``.
        source_ct_datasets: the CT slice headers (pixel data not needed), one per ``k``. The reader's
            ``DicomSeries.datasets`` is exactly this.
        out_path: the ``.dcm`` file to write (parent folders are created).
        label_name: SegmentLabel shown by viewers.
        series_description: SeriesDescription of the new SEG series.
        series_number: SeriesNumber of the new SEG series.
        instance_number: InstanceNumber of the SEG object.
        series_instance_uid: SeriesInstanceUID of the SEG; a new random UID by default (each run is a new series).
        sop_instance_uid: SOPInstanceUID of the SEG; a new random UID by default.
        algorithm_version: AlgorithmVersion; the installed ``__version__`` by default.
        content_datetime: ContentDate/ContentTime and SeriesDate/SeriesTime; now by default (pass a fixed value
            for byte-reproducible output).
        omit_empty_frames: leave out slices with no tumour. An all-empty mask still gets one (empty) frame, since
            DICOM requires at least one.

    Returns:
        ``out_path`` as a :class:`~pathlib.Path`. The file appears only once complete (temporary name, then rename).

    Raises:
        CipaInputError: a mask of the wrong shape or with values other than 0/1, or CT headers that cannot be
            referenced (an empty list, a missing geometry or UID tag, or slices from several series).
    """
    rows, columns = check_source_ct(source_ct_datasets, "a DICOM SEG")
    mask = binary_mask_on_ct(mask_ijk, source_ct_datasets)
    # DICOM frames are (rows, columns) = (j, i) planes, stacked along k.
    frames = np.ascontiguousarray(mask.astype(np.uint8).transpose(2, 1, 0))
    if omit_empty_frames and not frames.any():
        # highdicom cannot write a SEG with zero frames; keep every (empty) frame rather than invent a subset.
        omit_empty_frames = False

    version = algorithm_version or __version__
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label=label_name,
        segmented_property_category=codes.cid7150.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.cid7159.NeoplasmPrimary,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="CIPA",
            family=codes.cid7162.ArtificialIntelligence,
            version=version,
            source="cipa_bundle (arXiv 2503.17261)",
        ),
        anatomic_regions=[codes.SCT.Lung],
    )
    multiframe = _multiframe_source(source_ct_datasets)
    if multiframe is None:
        source_images = [_with_type2_attributes(ds) for ds in source_ct_datasets]
    else:
        # A multi-frame source is referenced frame by frame: highdicom wants the mask in the object's frame order.
        ct_object, numbers = multiframe
        in_frame_order = np.zeros((int(ct_object.NumberOfFrames), rows, columns), dtype=np.uint8)
        in_frame_order[np.asarray(numbers) - 1] = frames
        frames, source_images = in_frame_order, [_with_type2_attributes(ct_object)]
    when = content_datetime or _dt.datetime.now()
    seg = hd.seg.Segmentation(
        source_images=source_images,
        pixel_array=frames,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=series_instance_uid or hd.UID(),
        series_number=int(series_number),
        sop_instance_uid=sop_instance_uid or hd.UID(),
        instance_number=int(instance_number),
        manufacturer="cipa_bundle",
        manufacturer_model_name="CIPA",
        software_versions=f"cipa_bundle {__version__}",
        device_serial_number="0",
        content_description=f"CIPA {label_name} segmentation"[:64],
        content_label="CIPA",
        omit_empty_frames=omit_empty_frames,
        series_description=series_description,
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        content_date=when.date(),
        content_time=when.time().replace(microsecond=0),
        series_date=when.date(),
        series_time=when.time().replace(microsecond=0),
    )
    out = Path(out_path)
    with atomic_outputs([out]) as (tmp,):
        seg.save_as(tmp, enforce_file_format=True)
    return out


def read_dicom_seg_mask(
    path: str | os.PathLike[str],
    source_ct_datasets: Sequence[Dataset],
    *,
    segment_number: int = 1,
) -> np.ndarray:
    """Read one segment of a DICOM SEG back onto the ``[i, j, k]`` grid of the CT series it references.

    Each SEG frame is placed on the CT slice whose SOPInstanceUID its source-image reference names, so the result
    does not depend on frame order and slices without a frame are empty. A SEG that leaves SpatialLocationsPreserved
    out (dcmqi's, as MONAI Label and 3D Slicer write) is read too, once every frame's ImagePositionPatient is found on
    the slice it references.

    Args:
        path: the SEG file.
        source_ct_datasets: the CT slice headers in ``k`` order (as given to :func:`write_dicom_seg`).
        segment_number: which segment to read (1-based, as in DICOM).

    Returns:
        ``(I, J, K)`` = (Columns, Rows, slices) ``uint8`` mask of 0/1.

    Raises:
        CipaInputError: the file is not a DICOM SEG, it has no such segment, its frames carry no per-frame source
            references, it references CT instances that are not in ``source_ct_datasets`` (a SEG of another
            series), or (SpatialLocationsPreserved not stated) a frame lies elsewhere than the slice it references.
    """
    rows, columns = check_source_ct(source_ct_datasets, "a DICOM SEG")
    try:
        seg = hd.seg.segread(path)
    except (OSError, InvalidDicomError, ValueError, AttributeError) as err:
        raise CipaInputError(f"{path}: not a readable DICOM Segmentation ({err})") from err
    if seg.SOPClassUID != SEG_SOP_CLASS_UID:
        raise CipaInputError(f"{path}: tag SOPClassUID is {seg.SOPClassUID}, expected {SEG_SOP_CLASS_UID} (SEG)")
    if segment_number not in seg.segment_numbers:
        raise CipaInputError(
            f"{path}: no segment number {segment_number}; the file has segments {list(seg.segment_numbers)}"
        )
    if (int(seg.Rows), int(seg.Columns)) != (rows, columns):
        raise CipaInputError(
            f"{path}: tags Rows/Columns are {seg.Rows}/{seg.Columns}, expected {rows}/{columns} as in the CT series"
        )

    wanted = [str(ds.SOPInstanceUID) for ds in source_ct_datasets]
    referenced = {str(uid) for _, _, uid in seg.get_source_image_uids()}
    unknown = referenced - set(wanted)
    if unknown:
        raise CipaInputError(
            f"{path}: references {len(unknown)} SOPInstanceUID(s) not in the given CT series "
            f"{source_ct_datasets[0].SeriesInstanceUID}, e.g. {sorted(unknown)[0]}; expected the series it was "
            "derived from"
        )
    if not referenced:
        raise CipaInputError(
            f"{path}: tag ReferencedSeriesSequence names no source image, expected the CT series "
            f"{source_ct_datasets[0].SeriesInstanceUID}"
        )
    # CT slices without a SEG frame are empty (write_dicom_seg drops empty frames); every instance the SEG refers
    # to was checked above to belong to this series, so a wrong series cannot silently read back as all zeros.
    multiframe = _multiframe_source(source_ct_datasets)
    # A SEG that does not state SpatialLocationsPreserved (dcmqi's) is placed by reference only once the frame
    # positions show that each frame lies on the slice it references.
    stated = _spatial_locations_stated(seg)
    if not stated:
        _check_frames_sit_on_their_sources(seg, source_ct_datasets, path)
    try:
        if multiframe is None:
            pixels = seg.get_pixels_by_source_instance(
                source_sop_instance_uids=wanted,
                segment_numbers=[segment_number],
                ignore_spatial_locations=not stated,
                assert_missing_frames_are_empty=True,
                dtype=np.uint8,
            )
        else:
            pixels = seg.get_pixels_by_source_frame(
                source_sop_instance_uid=wanted[0],
                source_frame_numbers=multiframe[1],
                segment_numbers=[segment_number],
                ignore_spatial_locations=not stated,
                assert_missing_frames_are_empty=True,
                dtype=np.uint8,
            )
    except (ValueError, RuntimeError, AttributeError) as err:
        raise CipaInputError(
            f"{path}: frames cannot be mapped to CT slices through their DerivationImageSequence/SourceImageSequence "
            f"references ({err}); expected one referenced CT SOPInstanceUID per frame"
        ) from err
    # (K, rows, columns, 1) -> (I, J, K)
    return np.ascontiguousarray(pixels[..., 0].transpose(2, 1, 0))
