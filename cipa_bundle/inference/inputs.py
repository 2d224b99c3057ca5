"""What ``predict`` accepts, turned into the one input the bundle's inference workflow reads: a fused image.

The inference workflow (``configs/inference.json``) reads ``{"image": <image.nii.gz>}`` items: a float32
``(I, J, K, 2)`` NIfTI on the CT grid, channel 0 the windowed CT and channel 1 the scaled SUV, both in [0, 1]
(``convert``'s ``image.nii.gz``). :func:`prepare_input` builds that file from any of three inputs:

=========================  ===========================================================================================
input                      what happens
=========================  ===========================================================================================
DICOM study folder         :func:`~cipa_bundle.preprocessing.convert.convert_study` (SUV, PET -> CT resampling); the CT
                           slice headers are kept, in slice order, for the DICOM SEG.
CT + PET NIfTI pair        CT in HU, PET in SUV (any grid): the PET is resampled onto the CT
                           (:func:`~cipa_bundle.preprocessing.registration.resample_to_reference`, linear, 0 outside
                           its field of view), then windowed / scaled with ``WindowCT`` and ``ScaleSUV``. Given as
                           ``(ct, pet)``, as ``"ct.nii.gz,pet.nii.gz"``, with ``pet=``, or as a folder holding
                           ``ct.nii.gz`` + ``suv.nii.gz`` or autoPET's ``CTres.nii.gz`` + ``SUV.nii.gz``.
fused ``image.nii.gz``     used as it is. ``ct.nii.gz``, ``suv_ct.nii.gz`` and ``provenance.json`` beside it (a
                           ``convert`` output folder) supply HU and SUV for the report; without them SUV statistics
                           are left empty and the figures show the [0, 1] channels.
=========================  ===========================================================================================

Anything else is refused with a :class:`~cipa_bundle.errors.CipaInputError` naming the path, what was found and
what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np
import pydicom
import torch

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.dicom import sort_and_measure
from cipa_bundle.io.nifti import grid_mismatch, is_nifti_path, nifti_bytes, nifti_header, sidecar_path, strip_nifti_suffix
from cipa_bundle.io.volume import Volume
from cipa_bundle.preprocessing.convert import convert_study, recorded_ct_window
from cipa_bundle.preprocessing.registration import resample_to_reference
from cipa_bundle.preprocessing.transforms import DEFAULT_CT_WINDOW_HU, DEFAULT_SUV_MAX, ScaleSUV, WindowCT, ct_window_from

__all__ = ["PreparedInput", "check_datalist", "prepare_input", "case_name", "FUSED_IMAGE", "SUV_ON_CT"]

#: File name of the fused network input, as ``convert`` writes it.
FUSED_IMAGE = "image.nii.gz"
#: File name of the SUV resampled onto the CT grid.
SUV_ON_CT = "suv_ct.nii.gz"

_PAIR_NAMES = (("ct.nii.gz", "suv.nii.gz"), ("CTres.nii.gz", "SUV.nii.gz"))
_EXPECTED = (
    "expected a DICOM study folder (one CT and one PET series), a CT and PET NIfTI pair ('ct.nii.gz,pet.nii.gz' or "
    "--pet), a folder with ct.nii.gz + suv.nii.gz or CTres.nii.gz + SUV.nii.gz, or a fused 2-channel image.nii.gz"
)
#: Tolerance on the [0, 1] range of a fused image (float rounding of the window / scale).
_UNIT_TOL = 1e-3
#: A CT in HU has air somewhere (around the patient, in the lungs); a minimum above this is not HU.
_MAX_AIR_HU = -500.0
#: SUV above this is taken as a PET still in activity units (Bq/ml): no tissue reaches SUV 1000.
_MAX_PLAUSIBLE_SUV = 1000.0


@dataclass
class PreparedInput:
    """One study, ready for the inference workflow.

    Attributes:
        kind: ``"dicom"``, ``"nifti_pair"`` or ``"fused"``.
        source: the input as given.
        case: a name for the study (folder or file stem).
        image: the fused ``(I, J, K, 2)`` [windowed CT, scaled SUV] NIfTI on the CT grid.
        ct: CT in HU on the same grid, or ``None`` (fused input without a ``convert`` folder around it).
        suv: SUV on the same grid, or ``None``.
        provenance: how SUV and the fused image were made (``convert``'s provenance.json, an SUV sidecar...).
        ct_datasets: CT slice headers in ``k`` order (DICOM input only), for the DICOM SEG.
    """
    kind: Literal["dicom", "nifti_pair", "fused"]
    source: str
    case: str
    image: Path
    ct: Path | None = None
    suv: Path | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    ct_datasets: list[Any] | None = None


def case_name(image_path: str | os.PathLike[str]) -> str:
    """The case name of a fused image: its folder for ``<case>/image.nii.gz``, else the file name without extension.

    The inference workflow saves ``<output_dir>/<case_name>/mask.nii.gz``.
    """
    path = Path(image_path)
    name = strip_nifti_suffix(path.name)
    if name == strip_nifti_suffix(FUSED_IMAGE) and path.parent.name:
        return path.parent.name
    return name


def check_datalist(items: Any, dataset_dir: str | os.PathLike[str] = "") -> list[dict[str, Any]]:
    """Check the inference workflow's datalist, ``[{"image": path}, ...]``, before anything runs.

    Called from the workflow's ``run`` (not from the dataset), so that ``check_properties()`` on the default
    config, which instantiates the dataset, works without data.

    Args:
        items: the ``datalist`` config id.
        dataset_dir: the ``dataset_dir`` config id, named in the error when nothing was found there.

    Returns:
        ``items``, unchanged.

    Raises:
        CipaInputError: an empty list, an item that is not ``{"image": path}``, or an image that does not exist.
    """
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise CipaInputError(f"datalist is {items!r}; expected a list of {{'image': '<path to image.nii.gz>'}}")
    for n, item in enumerate(items):
        path = item.get("image") if isinstance(item, Mapping) else None
        if not isinstance(path, (str, os.PathLike)):
            raise CipaInputError(f"datalist item {n} is {item!r}; expected {{'image': '<path to image.nii.gz>'}}")
        if not Path(path).is_file():
            raise CipaInputError(f"datalist item {n}: image {path} does not exist; expected a fused image.nii.gz")
    if not items:
        raise CipaInputError(
            f"no inference input: dataset_dir {os.fspath(dataset_dir)!r} holds no */{FUSED_IMAGE} (cipa-bundle "
            f"convert output folders); expected --dataset_dir DIR, or --datalist \"[{{'image': 'PATH/image.nii.gz'}}]\""
        )
    return list(items)


# --------------------------------------------------------------------------------------------------- helpers
def _load_volume(path: Path, what: str):
    """``path`` as a :class:`Volume` (data read as float32), or a CipaInputError naming it."""


    if not path.is_file():
        raise CipaInputError(f"{what} {path} does not exist; {_EXPECTED}")
    if not is_nifti_path(path):
        raise CipaInputError(f"{what} {path} is not a NIfTI file (.nii / .nii.gz); {_EXPECTED}")
    try:
        img = nib.load(os.fspath(path))
        array = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as err:  # noqa: BLE001 - nibabel raises many types on damaged files
        raise CipaInputError(f"{what} {path}: not a readable NIfTI ({err})") from err
    return Volume(array, img.affine)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CipaInputError(f"{path}: not readable JSON ({err})") from err


def _check_fused(path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape check and [0, 1] range check of a fused image; returns its spatial shape and affine."""

    try:
        img = nib.load(os.fspath(path))
    except Exception as err:  # noqa: BLE001
        raise CipaInputError(f"{path}: not a readable NIfTI ({err})") from err
    shape = tuple(int(s) for s in img.shape)
    fused = (len(shape) == 4 and shape[3] == 2) or (len(shape) == 5 and shape[3] == 1 and shape[4] == 2)
    if not fused:
        hint = ""
        if len(shape) == 3:
            hint = " (a single volume: pass the PET too, as 'ct.nii.gz,pet.nii.gz' or with --pet)"
        raise CipaInputError(
            f"{path}: image shape {shape}; expected a fused 2-channel (I, J, K, 2) image [windowed CT, scaled SUV]"
            f"{hint}; {_EXPECTED}"
        )
    data = np.asarray(img.dataobj, dtype=np.float32)
    low, high = float(np.nanmin(data)), float(np.nanmax(data))
    if low < -_UNIT_TOL or high > 1 + _UNIT_TOL or not np.isfinite(data).all():
        raise CipaInputError(
            f"{path}: fused image values span [{low:g}, {high:g}]; expected windowed CT and scaled SUV in [0, 1] "
            "(cipa-bundle convert output); raw HU / SUV belong in a CT + PET pair"
        )
    return (shape[0], shape[1], shape[2]), np.asarray(img.affine, dtype=np.float64)


def _same_grid(path: Path, shape: tuple[int, ...], affine: np.ndarray, what: str, case: str) -> None:
    sibling_shape, sibling_affine = nifti_header(path, case)
    problem = grid_mismatch(sibling_shape, sibling_affine, shape, affine)
    if problem is not None:
        raise CipaInputError(
            f"{path}: the {what} is not on the grid of the fused image beside it ({what} vs fused image: {problem})"
        )


# --------------------------------------------------------------------------------------------------- the three kinds
def _prepare_fused(path: Path, source: str, ct_window_hu: tuple[float, float] | None) -> PreparedInput:
    shape, affine = _check_fused(path)
    folder = path.parent
    ct = folder / "ct.nii.gz" if (folder / "ct.nii.gz").is_file() else None
    suv = folder / SUV_ON_CT if (folder / SUV_ON_CT).is_file() else None
    for sibling, what in ((ct, "CT"), (suv, "SUV on the CT grid")):
        if sibling is not None:
            _same_grid(sibling, shape, affine, what, case_name(path))
    provenance = _read_json(folder / "provenance.json") if (folder / "provenance.json").is_file() else {}
    if ct_window_hu is not None:
        # The CT channel of a fused image is already windowed: only a matching record lets the request stand.
        applied = recorded_ct_window(provenance)
        if applied != tuple(ct_window_hu):
            found = f"was windowed with {list(applied)} HU" if applied else "has no provenance.json recording its window"
            raise CipaInputError(
                f"input {path}: ct_window_hu={list(ct_window_hu)} was asked for, but this fused image {found}; "
                "convert the study again with that window, or leave ct_window_hu out"
            )
    return PreparedInput("fused", source, case_name(path), path, ct, suv, provenance)


def _prepare_pair(ct_path: Path, pet_path: Path, work_dir: Path, source: str,
                  ct_window_hu: tuple[float, float]) -> PreparedInput:
    ct = _load_volume(ct_path, "CT")
    pet = _load_volume(pet_path, "PET")
    for volume, path, what in ((ct, ct_path, "CT"), (pet, pet_path, "PET")):
        if volume.array.ndim != 3:
            raise CipaInputError(f"{what} {path}: shape {volume.array.shape}; expected one 3-D volume")
    if float(ct.array.min()) > _MAX_AIR_HU:
        raise CipaInputError(
            f"CT {ct_path}: values span [{ct.array.min():g}, {ct.array.max():g}]; expected Hounsfield units, with "
            f"air (about -1000 HU, at least below {_MAX_AIR_HU:g}) around the body and in the lungs"
        )
    pet_max = float(np.nanmax(pet.array))
    if pet_max > _MAX_PLAUSIBLE_SUV:
        raise CipaInputError(
            f"PET {pet_path}: values reach {pet_max:g}; expected SUV (g/ml). This looks like activity concentration "
            "(Bq/ml): convert the PET DICOM with 'cipa-bundle suv' or predict on the DICOM study folder"
        )
    suv_ct = resample_to_reference(pet, ct, "linear", 0.0)
    ct_unit = WindowCT(*ct_window_hu)(torch.as_tensor(ct.array))
    pet_unit = ScaleSUV(DEFAULT_SUV_MAX)(torch.as_tensor(suv_ct.array))
    image = Volume(np.stack([np.asarray(ct_unit), np.asarray(pet_unit)], axis=-1).astype(np.float32), ct.affine)

    sidecar = sidecar_path(pet_path)
    provenance: dict[str, Any] = {
        "input": "CT and PET NIfTI pair",
        "ct": os.fspath(ct_path),
        "pet": os.fspath(pet_path),
        "suv": _read_json(sidecar) if sidecar.is_file() else "PET supplied as SUV NIfTI; conversion not recorded",
        "resampling": {"library": "itk", "interpolation": "linear", "fill_value": 0.0,
                       "direction": "PET onto the CT grid, in physical (patient) space"},
        "image": {"channels": ["ct", "pet"], "ct_window_hu": list(ct_window_hu), "suv_max": DEFAULT_SUV_MAX},
    }
    out_image, out_suv = work_dir / FUSED_IMAGE, work_dir / SUV_ON_CT
    payloads = [nifti_bytes(image, gz=True), nifti_bytes(Volume(suv_ct.array.astype(np.float32), ct.affine), gz=True)]
    with atomic_outputs([out_image, out_suv]) as temps:
        for temp, payload in zip(temps, payloads):
            temp.write_bytes(payload)
    stem = case_name(ct_path)
    case = ct_path.parent.name if stem.lower() in ("ct", "ctres") and ct_path.parent.name else stem
    return PreparedInput("nifti_pair", source, case, out_image, ct_path, out_suv, provenance)


def _prepare_dicom(study: Path, work_dir: Path, source: str, register: str, suv_kind: str,
                   progress: bool, ct_series: str | None, pet_series: str | None,
                   ct_window_hu: tuple[float, float]) -> PreparedInput:
    paths = convert_study(study, work_dir, register, suv_kind, progress=progress, ct_series=ct_series,
                          pet_series=pet_series, ct_window_hu=ct_window_hu)
    provenance = _read_json(paths["provenance"])
    # The SEG needs the headers of the CT instances the volume was made of, in its slice order, which the
    # provenance lists (localizers set aside); headers alone are enough (no pixel data).
    ct_files = [study / name for name in provenance["ct"]["files"]]
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in ct_files]
    order, affine, _ = sort_and_measure(headers, ct_files)
    ct_affine = nib.load(os.fspath(paths["ct"])).affine
    if order != list(range(len(headers))) or not np.allclose(affine, ct_affine, atol=1e-3, rtol=0):  # pragma: no cover
        raise RuntimeError(f"CT slice order of {study} disagrees with {paths['ct']}")  # guards the reader contract
    return PreparedInput("dicom", source, study.name, paths["image"], paths["ct"], paths["suv_ct"], provenance, headers)


def prepare_input(
    input: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    work_dir: str | os.PathLike[str],
    *,
    pet: str | os.PathLike[str] | None = None,
    register: str = "none",
    suv_kind: str = "bw",
    ct_series: str | None = None,
    pet_series: str | None = None,
    progress: bool = True,
    ct_window_hu: Sequence[float] | None = None,
) -> PreparedInput:
    """Turn a DICOM study, a CT + PET NIfTI pair or a fused image into the workflow's fused ``image.nii.gz``.

    Args:
        input: a DICOM study folder; a CT NIfTI (with ``pet``), a ``(ct, pet)`` pair or ``"ct,pet"``; a folder with
            ``ct.nii.gz`` + ``suv.nii.gz`` or ``CTres.nii.gz`` + ``SUV.nii.gz``; or a fused 2-channel NIfTI (or a
            ``convert`` output folder holding ``image.nii.gz``).
        work_dir: where converted files are written (created). A fused input is used in place.
        pet: the PET (SUV) NIfTI when ``input`` is the CT.
        register: DICOM only (other inputs with a value other than the default are refused, as for the three
            options below): ``"none"`` or ``"rigid"`` (see ``convert``).
        suv_kind: DICOM only: ``"bw"``, ``"lbm"`` or ``"bsa"``.
        ct_series: DICOM only: SeriesInstanceUID of the CT series, where the study holds several.
        pet_series: DICOM only: SeriesInstanceUID of the PET series, where the study holds several.
        progress: show ``convert``'s progress bar.
        ct_window_hu: ``(low, high)`` HU mapped to [0, 1] in the CT channel; ``None`` is the bundle's lung window
            (``DEFAULT_CT_WINDOW_HU``). It must be the window the model was trained with. A fused image is already
            windowed, so it is accepted only when its ``provenance.json`` records this window.

    Returns:
        The :class:`PreparedInput`.

    Raises:
        CipaInputError: a path that does not exist, a file that is none of the accepted kinds, a fused image with
            the wrong shape or range, a CT that is not in HU, a PET that is not in SUV, or a DICOM study that
            ``convert`` refuses.
    """
    source = str(input) if isinstance(input, (str, os.PathLike)) else ",".join(map(str, input))
    work = Path(work_dir)
    requested = None if ct_window_hu is None else ct_window_from(ct_window_hu)
    window = requested or DEFAULT_CT_WINDOW_HU
    dicom_options = {"register": (register, "none"), "suv_kind": (suv_kind, "bw"), "ct_series": (ct_series, None),
                     "pet_series": (pet_series, None)}

    def not_dicom(what: str) -> None:
        # These options only act on a DICOM study; ignoring them silently would hide, e.g., a registration that
        # the user asked for and did not get.
        given = [f"{name}={value!r}" for name, (value, default) in dicom_options.items() if value != default]
        if given:
            raise CipaInputError(f"input {source!r} is {what}; {', '.join(given)} apply to DICOM studies only")

    pair: tuple[Path, Path] | None = None
    if pet is not None:
        if not isinstance(input, (str, os.PathLike)):
            raise CipaInputError(f"input {source!r} with pet={pet!r}: expected a single CT path when pet is given")
        pair = (Path(input), Path(pet))
    elif not isinstance(input, (str, os.PathLike)):
        items = list(input)
        if len(items) != 2:
            raise CipaInputError(f"input {source!r} holds {len(items)} paths; expected a (CT, PET) pair")
        pair = (Path(items[0]), Path(items[1]))
    elif "," in os.fspath(input) and not Path(input).exists():
        parts = [p.strip() for p in os.fspath(input).split(",")]
        if len(parts) != 2:
            raise CipaInputError(f"input {source!r} holds {len(parts)} comma-separated paths; expected 'CT,PET'")
        pair = (Path(parts[0]), Path(parts[1]))

    if pair is not None:
        not_dicom("a CT + PET NIfTI pair")
        work.mkdir(parents=True, exist_ok=True)
        return _prepare_pair(pair[0], pair[1], work, source, window)

    path = Path(input)  # type: ignore[arg-type]
    if not path.exists():
        raise CipaInputError(f"input {path} does not exist; {_EXPECTED}")
    if path.is_file():
        if not is_nifti_path(path):
            raise CipaInputError(
                f"input {path} is a file but not a NIfTI (.nii / .nii.gz); {_EXPECTED} (for DICOM, pass the folder)"
            )
        not_dicom("a NIfTI file")
        return _prepare_fused(path, source, requested)
    if (path / FUSED_IMAGE).is_file():
        not_dicom("a converted image folder")
        return _prepare_fused(path / FUSED_IMAGE, source, requested)
    for ct_name, pet_name in _PAIR_NAMES:
        if (path / ct_name).is_file() and (path / pet_name).is_file():
            not_dicom("a CT + PET NIfTI folder")
            work.mkdir(parents=True, exist_ok=True)
            return _prepare_pair(path / ct_name, path / pet_name, work, source, window)
    work.mkdir(parents=True, exist_ok=True)
    return _prepare_dicom(path, work, source, register, suv_kind, progress, ct_series, pet_series, window)
