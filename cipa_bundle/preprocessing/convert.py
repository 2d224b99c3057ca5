"""One PET-CT study folder (DICOM) -> the NIfTI files the CIPA bundle consumes (the ``cipa-bundle convert`` verb).

Steps, in order (nothing is written until all of them have succeeded):

1. find the study's one CT and one PET (Modality ``PT``) series, anywhere under ``study_dir``;
2. read the CT as HU (padding -> air) and the PET as SUV (:mod:`cipa_bundle.preprocessing.suv`: QIBA decay
   reference time, vendor paths, per-slice slopes, errors E1-E17);
3. check both share one FrameOfReferenceUID (E15), since PET->CT resampling trusts the patient coordinates;
4. optionally estimate a gated rigid correction (:func:`~cipa_bundle.preprocessing.registration.rigid_refine`);
5. resample the SUV onto the CT grid (ITK, linear, 0 outside the PET field of view);
6. build the 2-channel network image with :class:`~cipa_bundle.preprocessing.transforms.WindowCT` and
   :class:`~cipa_bundle.preprocessing.transforms.ScaleSUV`;
7. write every output under temporary names and rename them together (all or nothing).

Outputs in ``out_dir``:

=====================  ==============================================================================================
``ct.nii.gz``          CT in HU on its own grid; int16 when every HU is an integer (the usual slope 1), else float32
``suv.nii.gz``         SUV (g/ml for bw/lbm, cm2/ml for bsa) on the native PET grid, float32
``suv_ct.nii.gz``      the same SUV resampled onto the CT grid, float32 (0 outside the PET field of view)
``image.nii.gz``       float32 ``(I, J, K, 2)`` on the CT grid: channel 0 = windowed CT, channel 1 = scaled SUV, both in
                       [0, 1] (the float equivalent of PCLT20K's 8-bit PNGs divided by 255). The network's own
                       ``x * 3.2 - 1.6`` (:class:`~cipa_bundle.preprocessing.transforms.NormalizeCIPAInput`) is *not*
                       applied here; the bundle configs apply it. Note the official loader stacks [PET, CT]: the
                       configs, not this file, decide the order fed to the network.
``provenance.json``    SUV provenance, frame-of-reference check, registration result, source series UIDs, the
                       intensity parameters, package versions
=====================  ==============================================================================================

All NIfTI affines map voxel indices to RAS mm (the patient coordinates of the DICOM, with x and y negated).

**MONAI Label studies folder** (``studies_dir``, ``cipa-bundle convert ... --studies_dir DIR``). MONAI Label's
datastore lists the image files at the top level of one folder and finds final labels under ``labels/final`` with
the same file name, and a request or a training item carries exactly one image. The bundle's input contract for
MONAI Label is therefore the fused ``image.nii.gz`` itself (CT and SUV already co-registered; SUV needs the DICOM
headers, so the fusion happens here, once, offline). With ``studies_dir`` the same bytes are also written as
``<studies_dir>/<case_id>.nii.gz``, and a label on the CT grid (``label=``, or ``label.nii.gz`` already in
``out_dir``) as ``<studies_dir>/labels/final/<case_id>.nii.gz``, in the same all-or-nothing write as the other
outputs. A case that already exists there with different content is refused, never overwritten (it may hold an
annotator's corrected label).
"""

from __future__ import annotations

import gzip
import os
import re
import shutil
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from tqdm import tqdm

from cipa_bundle import __version__
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.dicom import code_strings, find_series, is_localizer, read_series
from cipa_bundle.io.multiframe import frame_headers, frame_number, is_multiframe
from cipa_bundle.io.nifti import json_text, nifti_bytes, nifti_header, require_3d_mask, require_same_grid
from cipa_bundle.io.rtstruct import list_rois, read_rtstruct_mask
from cipa_bundle.io.volume import Volume
from cipa_bundle.preprocessing.registration import check_frame_of_reference, resample_to_reference, rigid_refine
from cipa_bundle.preprocessing.suv import SUV_KINDS
from cipa_bundle.preprocessing.suv_series import pet_series_to_suv
from cipa_bundle.preprocessing.transforms import DEFAULT_CT_WINDOW_HU, DEFAULT_SUV_MAX, ScaleSUV, WindowCT, ct_window_from

__all__ = [
    "OUTPUT_FILES",
    "STUDIES_LABEL_DIR",
    "StudyLayoutError",
    "convert_study",
    "find_study_series",
    "studies_case_paths",
    "recorded_ct_window",
]

#: Files written by :func:`convert_study`, in writing order.
OUTPUT_FILES: tuple[str, ...] = ("ct.nii.gz", "suv.nii.gz", "suv_ct.nii.gz", "image.nii.gz", "provenance.json")

_REGISTER = ("none", "rigid")

#: Where MONAI Label's local datastore keeps final (approved) labels, relative to the studies folder.
STUDIES_LABEL_DIR = ("labels", "final")
#: The label ``convert_study`` picks up from ``out_dir`` when no ``label`` is given (the layout ``datalist studies``
#: reads).
_DEFAULT_LABEL = "label.nii.gz"
# MONAI Label turns a file name into an image id by removing the extension text wherever it occurs, so ".nii" inside
# an id would corrupt it; path separators would leave the flat folder the datastore lists.
_CASE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class StudyLayoutError(CipaInputError):
    """The study folder does not hold exactly one CT and one PET image series."""


@dataclass(frozen=True)
class _SeriesSummary:
    """What the series chooser needs from a series' headers (the first one; all of them only for a scout)."""

    uid: str
    modality: str
    description: str
    files: list[Path]
    localizer: bool  # every instance's ImageType (0008,0008) has LOCALIZER: scouts, not a volume
    attenuation_corrected: bool  # CorrectedImage (0028,0051) has ATTN

    def describe(self) -> str:
        kind = ", localizer" if self.localizer else ""
        kind += ", attenuation-corrected" if self.attenuation_corrected else ""
        name = f" '{self.description}'" if self.description else ""
        return f"{self.modality or '?'} series {self.uid}{name} ({len(self.files)} files{kind})"


def find_study_series(
    study_dir: str | os.PathLike[str], ct_series: str | None = None, pet_series: str | None = None
) -> tuple[list[Path], list[Path]]:
    """The files of the study's CT series and PET series.

    Without a choice the study must hold one CT volume and one PET series. Two kinds of extra series, common in
    scanner exports, are set aside on their own: CT localizers (series of scouts only: ImageType (0008,0008)
    contains LOCALIZER; a scout inside the CT series is set aside by the reader) and, when exactly one PET series
    is attenuation-corrected (CorrectedImage (0028,0051) contains ATTN), the PET series that are not
    (non-attenuation-corrected PET has no meaningful SUV). Anything else that is ambiguous is
    refused with a list of the series found, and ``ct_series`` / ``pet_series`` pick one by SeriesInstanceUID.

    Args:
        study_dir: folder searched recursively (e.g. ``<case>/dicom`` or ``<case>``).
        ct_series: SeriesInstanceUID of the CT series to use (default: chosen as above).
        pet_series: SeriesInstanceUID of the PET series to use (default: chosen as above).

    Returns:
        ``(ct_files, pet_files)`` (unsorted; the reader orders slices by position).

    Raises:
        StudyLayoutError: no CT or no PET series, several that the rules above cannot tell apart, or a chosen UID
            that is not a series of that modality in the folder (the message lists what was found).
        NoSeriesFoundError: ``study_dir`` is not a folder.
    """
    def header(path: Path) -> Any:
        # A multi-frame object answers with its first frame's attributes (CorrectedImage, ImageType may sit in its
        # functional groups).
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return frame_headers(ds, path)[0] if is_multiframe(ds) else ds

    root = Path(study_dir)
    summaries = []
    for uid, files in find_series(root).items():
        ds = header(files[0])
        # A scout may sit inside the CT series (read_series sets it aside there), so one localizer header does not
        # make a localizer series; the others are read only when the first one is a scout.
        localizer = is_localizer(ds) and all(is_localizer(header(f)) for f in files[1:])
        summaries.append(_SeriesSummary(
            uid, str(ds.get("Modality", "")), str(ds.get("SeriesDescription", "")).strip(), files, localizer,
            "ATTN" in code_strings(ds, "CorrectedImage"),
        ))
    found = "; ".join(s.describe() for s in summaries) or "no DICOM image series"

    def choose(modality: str, label: str, option: str, uid: str | None) -> list[Path]:
        series = [s for s in summaries if s.modality == modality]
        if uid is not None:
            chosen = [s for s in series if s.uid == str(uid)]
            if not chosen:
                raise StudyLayoutError(
                    f"{root}: {option}={uid} is not a {label} series (Modality (0008,0060) = {modality}) of this "
                    f"folder; found {found}"
                )
            return chosen[0].files
        candidates = [s for s in series if not (modality == "CT" and s.localizer)]
        if modality == "PT" and len(candidates) > 1:
            corrected = [s for s in candidates if s.attenuation_corrected]
            if len(corrected) == 1:
                candidates = corrected
        if len(candidates) == 1:
            return candidates[0].files
        if not candidates:
            what = f"no {label} series (Modality (0008,0060) = {modality})"
            what += " other than localizers" if series else ""
            raise StudyLayoutError(f"{root}: {what} found; found {found}; expected one CT and one PET series of the "
                                   "same PET/CT study")
        raise StudyLayoutError(
            f"{root}: {len(candidates)} {label} series (Modality (0008,0060) = {modality}) found: {found}; expected "
            f"exactly one: choose one with {option}=<SeriesInstanceUID> (--{option} on the command line) or move the "
            "others out of the study folder"
        )

    return choose("CT", "CT", "ct_series", ct_series), choose("PT", "PET", "pet_series", pet_series)


def _versions() -> dict[str, str]:
    versions = {"cipa_bundle": __version__}
    for name in ("itk", "pydicom", "numpy", "monai", "nibabel", "torch"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:  # pragma: no cover - all are dependencies
            versions[name] = "not installed"
    return versions


def studies_case_paths(studies_dir: str | os.PathLike[str], case_id: str) -> tuple[Path, Path]:
    """Where MONAI Label's local datastore expects one case.

    Returns:
        ``(<studies>/<id>.nii.gz, <studies>/labels/final/<id>.nii.gz)``: the image and its final label.

    Raises:
        CipaInputError: ``case_id`` is not a plain file-name stem (letters, digits, ``.``, ``_``, ``-``; not starting
            with ``.``, ``_`` or ``-``; no ``.nii`` inside).
    """
    if not _CASE_ID.fullmatch(case_id) or ".nii" in case_id.lower():
        raise CipaInputError(
            f"convert: case id {case_id!r} cannot name a MONAI Label study; expected letters, digits, '.', '_' or '-' "
            "(starting with a letter or digit, without '.nii'); pass --case_id"
        )
    root = Path(studies_dir)
    return root / f"{case_id}.nii.gz", root.joinpath(*STUDIES_LABEL_DIR, f"{case_id}.nii.gz")


def _check_label_grid(label: Path, ct_volume: Volume, image_path: Path, case: str) -> None:
    """Refuse a label that is not a 3-D mask on the CT grid (the grid of ``image.nii.gz``)."""

    shape, affine = nifti_header(label, case)
    require_3d_mask(case, label, shape)
    require_same_grid(case, (label, shape, affine), (image_path, tuple(ct_volume.shape), np.asarray(ct_volume.affine)))


def _gz_bytes(path: Path) -> bytes:
    """A NIfTI file as ``.nii.gz`` bytes: copied unchanged when already gzipped, else gzipped (zero timestamp)."""
    raw = path.read_bytes()
    return raw if raw[:2] == b"\x1f\x8b" else gzip.compress(raw, compresslevel=1, mtime=0)


def _same_gz_content(a: Path, b: Path, chunk: int = 1 << 20) -> bool:
    """Whether two ``.nii.gz`` files hold the same uncompressed bytes (streamed: clinical volumes are large)."""
    with gzip.open(a, "rb") as fa, gzip.open(b, "rb") as fb:
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if ca != cb:
                return False
            if not ca:
                return True


def _refuse_changed(final: Path, temp: Path, what: str) -> None:
    """Raise if ``final`` exists with content other than the freshly written ``temp`` (re-running is allowed).

    Args:
        final: the studies-folder file that would be replaced.
        temp: the new content, already written under its temporary name.
        what: what the new content is, for the message (e.g. ``"the fused image converted from <study>"``).
    """
    if not final.exists():
        return
    hint = "another study (or an edited label) has this case id: remove the file or choose another --case_id"
    try:
        same = _same_gz_content(final, temp)
    except (OSError, EOFError) as err:  # not gzip, truncated: certainly not what we would write
        raise CipaInputError(
            f"convert: {final} already exists and cannot be compared ({err}); expected no file or {what}; {hint}"
        ) from err
    if not same:
        raise CipaInputError(f"convert: {final} already exists with content other than {what}; {hint}")


def _ct_for_nifti(series: Any) -> Volume:
    """The CT volume in the dtype that stores its HU exactly: int16 when every slice's RescaleSlope and
    RescaleIntercept are integers (HU = integer stored values), else float32. Fortran-ordered, as NIfTI stores it."""
    def integral(ds: Any, keyword: str, default: float) -> bool:
        value = ds.get(keyword)
        number = default if value in (None, "") else float(value)
        return float(number).is_integer() and abs(number) < 32768

    exact = all(
        "ModalityLUTSequence" not in ds and integral(ds, "RescaleSlope", 1.0) and integral(ds, "RescaleIntercept", 0.0)
        for ds in series.datasets
    )
    array = series.volume.array
    if exact and array.size and array.min() >= -32768 and array.max() <= 32767:
        return Volume(np.array(array, dtype=np.int16, order="F"), series.volume.affine)
    return Volume(np.array(array, dtype=np.float32, order="F"), series.volume.affine)


def recorded_ct_window(provenance: Mapping[str, Any]) -> tuple[float, float] | None:
    """The CT window ``convert`` applied, from its ``provenance.json`` content (``image.ct_window_hu``); None where
    the record has none."""
    image = provenance.get("image")
    window = image.get("ct_window_hu") if isinstance(image, Mapping) else None
    return None if window is None else ct_window_from(window)


def convert_study(
    study_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    register: str = "none",
    suv_kind: str = "bw",
    *,
    allow_frame_mismatch: bool = False,
    ct_window_hu: tuple[float, float] = DEFAULT_CT_WINDOW_HU,
    suv_max: float = DEFAULT_SUV_MAX,
    seed: int = 0,
    progress: bool = True,
    studies_dir: str | os.PathLike[str] | None = None,
    case_id: str | None = None,
    label: str | os.PathLike[str] | None = None,
    ct_series: str | None = None,
    pet_series: str | None = None,
    label_rtstruct: str | os.PathLike[str] | None = None,
    roi: str | None = None,
) -> dict[str, Path]:
    """Convert a DICOM PET-CT study into ``ct``, ``suv``, ``suv_ct``, ``image`` NIfTIs and ``provenance.json``.

    Args:
        study_dir: folder holding one CT and one PET series (searched recursively).
        out_dir: output folder (created; existing outputs are replaced atomically).
        register: ``"none"`` (identity: hybrid PET/CT, same frame of reference) or ``"rigid"`` (gated rigid
            refinement; applied only if it passes the gate, see ``provenance.json["registration"]``).
        suv_kind: ``"bw"`` (SUVbw), ``"lbm"`` (SUL, Janmahasatian) or ``"bsa"`` (SUVbsa, Du Bois).
        allow_frame_mismatch: accept different FrameOfReferenceUIDs (resampling then trusts the patient
            coordinates as they are; combine with ``register="rigid"``).
        ct_window_hu: CT window mapped to [0, 1] in ``image.nii.gz``.
        suv_max: SUV mapped to 1 in ``image.nii.gz``.
        seed: registration sampling seed.
        progress: show a tqdm progress bar on stderr.
        studies_dir: also write the case into this MONAI Label studies folder (see the module docstring):
            ``<studies_dir>/<case_id>.nii.gz`` (the fused image) and, when a label is available,
            ``<studies_dir>/labels/final/<case_id>.nii.gz``.
        case_id: the case's name in ``studies_dir``; default the name of ``out_dir``.
        label: ``(I, J, K)`` tumour mask NIfTI on the CT grid, for ``studies_dir``; default ``out_dir/label.nii.gz``
            when that file exists. Copied unchanged (gzipped if it was a plain ``.nii``).
        ct_series: SeriesInstanceUID of the CT series, where the study holds several (see :func:`find_study_series`).
        pet_series: SeriesInstanceUID of the PET series, likewise.
        label_rtstruct: an RTSTRUCT of contours drawn on this CT (clinical GTVs, for example): its ROI is rasterised
            onto the CT grid (:func:`~cipa_bundle.io.rtstruct.read_rtstruct_mask`: voxel centres, even-odd rule) and
            written as ``out_dir/label.nii.gz``, which ``datalist studies`` and ``studies_dir`` then take.
        roi: the ROI (ROIName) to rasterise; needed when the RTSTRUCT holds several.

    Returns:
        ``{"ct": path, "suv": path, "suv_ct": path, "image": path, "provenance": path}``, plus ``"label"`` with
        ``label_rtstruct``, and ``"studies_image"`` and (with a label) ``"studies_label"`` when ``studies_dir`` is
        given.

    Raises:
        CipaInputError: bad arguments, a study without exactly one CT and one PET series, unreadable DICOM
            geometry, an SUV that cannot be trusted (E1-E17), mismatched frames of reference (E15), a label that is
            not on the CT grid, or a case already in ``studies_dir`` with different content. Nothing is written in
            that case.
    """
    if register not in _REGISTER:
        raise CipaInputError(f"convert: register={register!r} is not supported; expected one of {', '.join(_REGISTER)}")
    if suv_kind not in SUV_KINDS:
        raise CipaInputError(f"convert: kind={suv_kind!r} is not supported; expected one of {', '.join(SUV_KINDS)}")
    ct_window_hu = ct_window_from(ct_window_hu)
    study = Path(study_dir)
    out = Path(out_dir)
    studies: tuple[Path, Path] | None = None
    label_path: Path | None = None
    if label_rtstruct is not None and label is not None:
        raise CipaInputError("convert: label and label_rtstruct both name the label; expected one of them")
    if roi is not None and label_rtstruct is None:
        raise CipaInputError("convert: roi names an ROI of an RTSTRUCT; it needs label_rtstruct as well")
    if label_rtstruct is not None and not Path(label_rtstruct).is_file():
        raise CipaInputError(f"convert: label_rtstruct {label_rtstruct} does not exist; expected an RTSTRUCT file")
    if studies_dir is not None:
        # Resolve first: out_dir may be "." or end in "..", whose own name says nothing.
        case = case_id if case_id is not None else out.resolve().name
        studies = studies_case_paths(studies_dir, case)
        if label is not None:
            label_path = Path(label)
            if not label_path.is_file():
                raise CipaInputError(
                    f"convert: label {label_path} does not exist; expected a NIfTI mask on the CT grid"
                )
        elif label_rtstruct is not None or (out / _DEFAULT_LABEL).is_file():
            label_path = out / _DEFAULT_LABEL
    elif label is not None or case_id is not None:
        raise CipaInputError("convert: label and case_id name a MONAI Label study; they need studies_dir as well")
    steps = ["find series", "read CT", "read PET + SUV", "frame of reference", "register", "resample", "write"]
    bar = tqdm(total=len(steps), desc="convert", unit="step", disable=not progress, leave=False)

    def step(name: str) -> None:
        bar.set_postfix_str(name)

    try:
        step(steps[0])
        ct_files, pet_files = find_study_series(study, ct_series, pet_series)
        bar.update()
        step(steps[1])
        ct = read_series(ct_files, modality="CT")
        # Before the slow steps: a label on another grid, or contours that do not fit this CT, are plain input errors.
        rtstruct_label: np.ndarray | None = None
        if label_rtstruct is not None:
            rtstruct_label = read_rtstruct_mask(label_rtstruct, ct, roi)
            roi_name = roi if roi is not None else list_rois(label_rtstruct)[0]
        elif label_path is not None:
            _check_label_grid(label_path, ct.volume, out / "image.nii.gz", str(study))
        bar.update()
        step(steps[2])
        pet = read_series(pet_files, modality="PT")
        suv, suv_provenance = pet_series_to_suv(pet, suv_kind)  # type: ignore[arg-type]
        bar.update()
        step(steps[3])
        shared_uid = check_frame_of_reference(pet, ct, allow_mismatch=allow_frame_mismatch)
        bar.update()
        step(steps[4])
        registration: dict[str, Any] = {"method": register, "applied": False}
        transform = None
        if register == "rigid":
            result = rigid_refine(ct.volume, suv, seed=seed)
            registration.update(result.to_dict())
            registration["applied"] = result.accepted
            transform = result
        bar.update()
        step(steps[5])
        suv_ct = resample_to_reference(suv, ct.volume, "linear", 0.0, transform)
        # Fortran order with the channel slowest: each channel is one contiguous block, as NIfTI stores it, so
        # nothing is transposed again on writing.
        channels = np.empty((*ct.volume.shape, 2), dtype=np.float32, order="F")
        channels[..., 0] = np.asarray(WindowCT(*ct_window_hu)(torch.as_tensor(ct.volume.array)))
        channels[..., 1] = np.asarray(ScaleSUV(suv_max)(torch.as_tensor(suv_ct.array)))
        image = Volume(channels, ct.volume.affine)
        bar.update()

        step(steps[6])
        provenance = {
            "cipa_bundle_convert": 1,
            "study_dir": str(study),
            "suv_kind": suv_kind,
            "ct": _series_record(ct, study),
            "pet": _series_record(pet, study),
            "frame_of_reference": {
                "ct": ct.frame_of_reference_uid,
                "pet": pet.frame_of_reference_uid,
                "shared": shared_uid is not None,
                "mismatch_allowed": bool(allow_frame_mismatch),
            },
            "suv": suv_provenance.to_dict(),
            "registration": registration,
            "resampling": {"library": "itk", "interpolation": "linear", "fill_value": 0.0,
                           "direction": "PET onto the CT grid, in physical (patient) space"},
            "image": {
                "channels": ["ct", "pet"],
                "ct": f"clip((HU - {ct_window_hu[0]:g}) / ({ct_window_hu[1]:g} - {ct_window_hu[0]:g}), 0, 1)",
                "pet": f"clip(SUV / {suv_max:g}, 0, 1)",
                "ct_window_hu": list(ct_window_hu),
                "suv_max": suv_max,
                "network_normalisation_applied": False,
            },
            "outputs": list(OUTPUT_FILES) + ([_DEFAULT_LABEL] if rtstruct_label is not None else []),
            "label": None if rtstruct_label is None else {
                "rtstruct": str(label_rtstruct),
                "roi": roi_name,
                "voxels": int(np.count_nonzero(rtstruct_label)),
                "rasterisation": "even-odd rule at CT voxel centres (scikit-image), on the CT grid",
            },
            "monailabel_studies": None if studies is None else {
                "image": str(studies[0]), "label": str(studies[1]) if label_path is not None else None,
                "label_source": str(label_path) if label_path is not None else None,
            },
            "versions": _versions(),
        }
        text = json_text(provenance).encode("utf-8")  # serialise first: a bad value fails before any file exists
        payloads = [
            lambda: nifti_bytes(_ct_for_nifti(ct), gz=True),
            lambda: nifti_bytes(Volume(suv.array.astype(np.float32), suv.affine), gz=True),
            lambda: nifti_bytes(Volume(suv_ct.array.astype(np.float32), suv_ct.affine), gz=True),
            lambda: nifti_bytes(image, gz=True),
            lambda: text,
        ]
        finals = [out / name for name in OUTPUT_FILES]
        if rtstruct_label is not None:
            label_volume = Volume(rtstruct_label.astype(np.uint8), ct.volume.affine)
            payloads.append(lambda: nifti_bytes(label_volume, gz=True))
            finals.append(out / _DEFAULT_LABEL)
        extra: list[Path] = []  # the studies copies, renamed in the same all-or-nothing group
        if studies is not None:
            extra = [studies[0]] + ([studies[1]] if label_path is not None else [])

        def write(temp: Path, payload: Any) -> None:
            with open(temp, "wb") as fh:
                fh.write(payload())
                fh.flush()
                os.fsync(fh.fileno())

        with atomic_outputs(finals + extra) as temps:
            # gzip dominates the write step and zlib releases the GIL, so the files compress in parallel.
            with ThreadPoolExecutor(max_workers=max(1, min(len(finals), os.cpu_count() or 1))) as pool:
                for future in [pool.submit(write, t, p) for t, p in zip(temps, payloads)]:
                    future.result()
            if studies is not None:
                image_index = OUTPUT_FILES.index("image.nii.gz")
                shutil.copyfile(temps[image_index], temps[len(finals)])  # the same bytes, not a second encoding
                _refuse_changed(extra[0], temps[len(finals)], f"the fused image converted from {study}")
                if rtstruct_label is not None:
                    shutil.copyfile(temps[len(finals) - 1], temps[len(finals) + 1])
                    _refuse_changed(extra[1], temps[len(finals) + 1], f"the label from {label_rtstruct}")
                elif label_path is not None:
                    write(temps[len(finals) + 1], lambda: _gz_bytes(label_path))
                    _refuse_changed(extra[1], temps[len(finals) + 1], f"the label {label_path}")
        bar.update()
    finally:
        bar.close()
    written = dict(zip(("ct", "suv", "suv_ct", "image", "provenance", "label"), finals))
    written.update(zip(("studies_image", "studies_label"), extra))
    return written


def _series_record(series: Any, study: Path) -> dict[str, Any]:
    """Identity and geometry of one source series, for the provenance record (paths relative to ``study``)."""
    volume = series.volume
    return {
        "series_uid": series.series_uid,
        "study_uid": series.study_uid,
        "frame_of_reference_uid": series.frame_of_reference_uid,
        "modality": series.modality,
        "n_instances": len(set(series.files)),
        "folder": str(Path(series.files[0]).parent),
        # Slice k of the volume is files[k] (a multi-frame object's file once, then frames[k] in it); the DICOM SEG
        # of a prediction references these instances.
        "files": [os.path.relpath(f, study) for f in dict.fromkeys(series.files)],
        **({"frames": [frame_number(ds) for ds in series.datasets]} if frame_number(series.datasets[0]) else {}),
        "set_aside": [os.path.relpath(f, study) for f in series.set_aside],
        "shape": list(volume.shape),
        "spacing_mm": [float(s) for s in volume.spacing],
        "affine_ras": volume.affine.tolist(),
        # Slices sit on a least-squares uniform grid; multi-bed PET jitters at its bed junctions (io.dicom).
        "slice_position_max_deviation_mm": float(volume.meta.get("slice_position_max_deviation_mm", 0.0)),
    }
