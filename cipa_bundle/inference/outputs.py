"""Everything inference writes: the bundle's mask NIfTI (atomic ``SaveImaged``), and ``predict``'s clinical outputs.

Two layers:

1. **Inside the bundle workflow** (``configs/inference.json``): :class:`SaveCaseImaged` saves ``pred`` as
   ``<output_dir>/<case>/mask.nii.gz`` (or ``probabilities.nii.gz``), where ``<case>`` is
   :func:`~cipa_bundle.inference.inputs.case_name` of the input (the ``convert`` folder name). It is a
   ``SaveImaged``, so MONAI Label drops it like any other saver, and it writes through :class:`AtomicNiftiWriter`:
   the file appears complete or not at all (:mod:`cipa_bundle.io.nifti`).
2. **After the workflow** (:func:`write_outputs`, used by ``predict``), on the CT grid of the prepared input:

   ==========================  ======================================================================================
   ``mask.nii.gz``             uint8 binary tumour mask (moved in from the workflow's output)
   ``probabilities.nii.gz``    float32 sigmoid probabilities, on request
   ``seg.dcm``                 DICOM SEG referencing the source CT series (DICOM input only)
   ``rtstruct.dcm``            RTSTRUCT of the mask's contours referencing the CT, on request (DICOM input only)
   ``overlay_axial.png``       axial slice of maximum tumour extent, PET on CT, mask contour
   ``mip_coronal.png``         coronal PET MIP with the projected contour
   ``report.json``             versions, device, timings, SUV provenance, tumour count, per-lesion volume (ml),
                               SUVmax, SUVmean and TLG (SUV from the SUV on the CT grid)
   ==========================  ======================================================================================
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.config import DtypeLike, KeysCollection
from monai.data import FolderLayoutBase, NibabelWriter
from monai.data.image_writer import ImageWriter
from monai.data.utils import to_affine_nd
from monai.transforms import SaveImaged
from monai.utils import convert_data_type

from cipa_bundle.errors import CipaInputError
from cipa_bundle.inference.inputs import PreparedInput, case_name
from cipa_bundle.io.nifti import is_nifti_path, save_nifti
from cipa_bundle.io.rtstruct import write_rtstruct
from cipa_bundle.io.seg import write_dicom_seg
from cipa_bundle.io.volume import Volume
from cipa_bundle.report.preview import write_overlays
from cipa_bundle.report.report_json import write_report
from cipa_bundle.report.statistics import lesion_statistics, voxel_volume_ml

__all__ = [
    "MASK_NIFTI",
    "PROBABILITIES_NIFTI",
    "RTSTRUCT_DICOM",
    "SEG_DICOM",
    "AtomicNiftiWriter",
    "CaseFolderLayout",
    "SaveCaseImaged",
    "write_outputs",
]

MASK_NIFTI = "mask.nii.gz"
PROBABILITIES_NIFTI = "probabilities.nii.gz"
SEG_DICOM = "seg.dcm"
RTSTRUCT_DICOM = "rtstruct.dcm"

#: Display window for a CT channel that is already windowed to [0, 1] (level, width): shows it as stored.
_UNIT_WINDOW = (0.5, 1.0)


# ----------------------------------------------------------------------------------------------- bundle saver
class AtomicNiftiWriter(NibabelWriter):
    """MONAI's ``NibabelWriter`` with an atomic, reproducible write (:func:`cipa_bundle.io.nifti.save_nifti`).

    ``nib.save`` writes in place, so an interrupted run leaves a truncated ``.nii.gz`` that looks like a result;
    this writer builds the whole file under a temporary name in the same folder and renames it.
    """
    def write(self, filename: str | os.PathLike[str], verbose: bool = False, **obj_kwargs: Any) -> None:
        """Write ``self.data_obj`` (channel-last, set by ``set_data_array``) with ``self.affine`` to ``filename``."""


        ImageWriter.write(self, filename, verbose=verbose)  # logging only
        array = np.asarray(ImageWriter.create_backend_obj(self.data_obj))
        if self.output_dtype is not None:
            array = array.astype(self.output_dtype, copy=False)
        affine = np.eye(4) if self.affine is None else convert_data_type(self.affine, np.ndarray)[0]
        save_nifti(Volume(array, to_affine_nd(r=3, affine=affine)), filename)


class CaseFolderLayout(FolderLayoutBase):
    """``<output_dir>/<subject>/<filename>``: one folder per case, fixed file names inside.

    Args:
        output_dir: the parent folder.
        filename: the file written in each case folder, e.g. ``mask.nii.gz``.
    """
    def __init__(self, output_dir: str | os.PathLike[str], filename: str) -> None:
        self.output_dir = Path(output_dir)
        self.name = filename

    def filename(self, subject: str = "case", **kwargs: Any) -> Path:  # type: ignore[override]
        folder = self.output_dir / subject
        folder.mkdir(parents=True, exist_ok=True)
        return folder / self.name


def _case_formatter(metadict: Mapping[str, Any] | None, saver: Any) -> dict[str, str]:
    """``SaveImage`` name formatter: the case of the source image (see :func:`case_name`)."""
    source = (metadict or {}).get("filename_or_obj") or f"case_{getattr(saver, '_data_index', 0)}"
    return {"subject": case_name(str(source))}


class SaveCaseImaged(SaveImaged):
    """``SaveImaged`` writing ``<output_dir>/<case>/<filename>`` atomically, in the image's own grid.

    Args:
        keys: keys to save (e.g. ``"pred"``), channel-first ``(1, I, J, K)`` MetaTensors after ``Invertd``.
        output_dir: parent folder of the case folders.
        filename: file name in each case folder (``.nii`` or ``.nii.gz``).
        output_dtype: stored dtype (uint8 for masks, float32 for probabilities).
        enabled: ``False`` makes the transform a no-op (lets a config switch an optional output with a plain
            ``@id``, which ``_disabled_`` cannot).
        print_log: log each file written.
    """
    def __init__(self, keys: KeysCollection, output_dir: str | os.PathLike[str], filename: str = MASK_NIFTI,
                 output_dtype: DtypeLike = np.uint8, enabled: bool = True, print_log: bool = False) -> None:
        if not is_nifti_path(filename):
            raise ValueError(f"SaveCaseImaged: filename {filename!r} must end in .nii or .nii.gz")
        super().__init__(
            keys,
            output_dir=output_dir,
            output_ext=".nii.gz" if filename.lower().endswith(".gz") else ".nii",
            output_dtype=output_dtype,
            resample=False,
            print_log=print_log,
            writer=AtomicNiftiWriter,
            output_name_formatter=_case_formatter,
            folder_layout=CaseFolderLayout(output_dir, filename),
        )
        self.enabled = bool(enabled)

    def __call__(self, data: Mapping[Any, Any]) -> dict[Any, Any]:
        if not self.enabled:
            return dict(data)
        return super().__call__(data)


# ----------------------------------------------------------------------------------------------- predict outputs
def _load(path: Path):
    img = nib.load(os.fspath(path))
    return Volume(np.asarray(img.dataobj), img.affine)


def write_outputs(
    prepared: PreparedInput,
    mask_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    device: str,
    timings: Mapping[str, float],
    extra: Mapping[str, Any] | None = None,
    also_written: Sequence[str] = (),
    rtstruct: bool = False,
) -> dict[str, Path]:
    """Write the DICOM SEG (DICOM input), the two PNG figures and ``report.json`` for one predicted mask.

    Args:
        prepared: the prepared input (its CT / SUV volumes and, for DICOM, the CT slice headers).
        mask_path: the binary ``(I, J, K)`` mask NIfTI on the CT grid (``out_dir/mask.nii.gz``).
        out_dir: output folder.
        device: the torch device inference ran on, for the report.
        timings: stage -> seconds so far; the time spent here is added as ``"outputs"``.
        extra: more report keys (input, model, post-processing settings...).
        also_written: names of other files the caller wrote into ``out_dir`` (listed in the report).
        rtstruct: also write ``rtstruct.dcm`` (DICOM input only).

    Returns:
        ``{"seg": path (DICOM only), "rtstruct": path (on request), "overlay_axial": path, "mip_coronal": path,
        "report": path}``.

    Raises:
        CipaInputError: a mask that is not on the grid of the prepared image.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    mask = _load(Path(mask_path))
    mask = Volume((np.asarray(mask.array) != 0).astype(np.uint8), mask.affine)
    image = _load(prepared.image)
    if mask.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-3, rtol=0):
        raise CipaInputError(
            f"mask {mask_path} has shape {mask.shape} and affine {np.round(mask.affine, 3).tolist()}; expected the "
            f"grid of {prepared.image}: shape {image.shape}, affine {np.round(image.affine, 3).tolist()}"
        )
    written: dict[str, Path] = {}
    if prepared.ct_datasets:
        written["seg"] = write_dicom_seg(mask.array, prepared.ct_datasets, out / SEG_DICOM)
        if rtstruct:
            written["rtstruct"] = write_rtstruct(mask.array, prepared.ct_datasets, out / RTSTRUCT_DICOM)
    elif rtstruct:
        raise CipaInputError(
            f"{prepared.source}: an RTSTRUCT needs the CT DICOM instances; the input is {prepared.kind}"
        )

    suv = _load(prepared.suv) if prepared.suv is not None else None
    if prepared.ct is not None:
        ct, ct_window = _load(prepared.ct), None
    else:  # fused input alone: show the windowed CT channel as stored
        ct, ct_window = Volume(np.asarray(image.array)[..., 0], image.affine), _UNIT_WINDOW
    pet = suv if suv is not None else Volume(np.asarray(image.array)[..., 1], image.affine)
    figures = write_overlays(out, ct, pet, mask, **({"ct_window": ct_window} if ct_window else {}))
    written["overlay_axial"] = figures["axial"]
    written["mip_coronal"] = figures["coronal_mip"]

    lesions = lesion_statistics(mask, suv)
    suv_provenance = prepared.provenance.get("suv") if prepared.provenance else None
    report_extra = {
        "input": {"kind": prepared.kind, "source": prepared.source, "case": prepared.case,
                  "suv_available": suv is not None},
        "axial_overlay_slice_index": figures["axial_slice_index"],
        "outputs": sorted({MASK_NIFTI, *also_written, *(p.name for p in written.values()), "report.json"}),
        "intended_use": "research only; not for clinical diagnosis",
        **dict(extra or {}),
    }
    all_timings = {**dict(timings), "outputs": time.perf_counter() - start}
    written["report"] = write_report(
        out, lesions, device=device, timings=all_timings, suv_provenance=suv_provenance,
        voxel_volume_ml=voxel_volume_ml(mask.affine), extra=report_extra,
    )
    return written
