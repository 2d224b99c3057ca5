"""Run the bundle's inference workflow on one study (``cipa-bundle predict``).

``predict`` is the bundle, not a second implementation of it: it prepares the input
(:func:`~cipa_bundle.inference.inputs.prepare_input`), runs ``configs/inference.json`` through
``monai.bundle.ConfigWorkflow`` with overrides (the datalist, the output folder, the checkpoint and the network size
read from the checkpoint), and hands the saved mask to :func:`~cipa_bundle.inference.outputs.write_outputs`.
Everything between input and mask (orientation, normalisation, slice-wise inference, sigmoid, inversion, threshold,
post-processing) is therefore what ``python -m monai.bundle run --config_file configs/inference.json`` does too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow

from cipa_bundle.errors import CipaInputError
from cipa_bundle.inference.inputs import case_name, prepare_input
from cipa_bundle.inference.outputs import MASK_NIFTI, PROBABILITIES_NIFTI, write_outputs
from cipa_bundle.networks.weights import checkpoint_architecture

__all__ = [
    "MissingWeightsError",
    "bundle_root",
    "predict",
    "require_checkpoint",
]

#: How to obtain weights, quoted by every "no checkpoint" error.
_WEIGHTS_HELP = (
    "the bundle ships without weights. Get them by importing the released official checkpoint "
    "('cipa-bundle import-official CIPA.pth models/model.pt'), by training "
    "('python -m monai.bundle run training --config_file configs/train.json'), or for a small CPU model by running "
    "'cipa-bundle demo'; or pass --checkpoint PATH"
)


class MissingWeightsError(CipaInputError):
    """No model weights where the bundle looks for them."""


# ----------------------------------------------------------------------------------------------- weights
def bundle_root() -> Path:
    """The bundle folder: the parent of the ``cipa_bundle`` package (it holds ``configs/`` and ``models/``)."""
    return Path(__file__).resolve().parents[2]


def require_checkpoint(path: str | os.PathLike[str]) -> Path:
    """``path`` if it is a file, else :class:`MissingWeightsError` explaining how to get weights."""
    checkpoint = Path(path)
    if not checkpoint.is_file():
        raise MissingWeightsError(f"model weights {checkpoint} not found: {_WEIGHTS_HELP}")
    return checkpoint


# ----------------------------------------------------------------------------------------------- predict
def _require_device(device: str) -> None:
    """Refuse a device string torch cannot parse, or a CUDA device where this torch has no usable CUDA."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise CipaInputError(f"device {device!r}: {err}; expected e.g. cpu or cuda:0") from err
    if parsed.type == "cuda" and not torch.cuda.is_available():
        build = f"torch {torch.__version__}" + ("" if torch.version.cuda else ", a CPU-only build")
        raise CipaInputError(f"device {device!r}: CUDA is not available here ({build}); expected cpu")


def _device_name(device: Any) -> str:
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _architecture(checkpoint: Path, given: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's architecture; explicit arguments must agree with it."""
    found = checkpoint_architecture(checkpoint)
    for key, value in given.items():
        if value is None:
            continue
        value = list(value) if isinstance(value, (list, tuple)) else int(value)
        relevant = found[key][:3] if key == "decoder_depths" else found[key]
        if (value[:3] if key == "decoder_depths" else value) != relevant:
            raise CipaInputError(
                f"--{key} {value} disagrees with checkpoint {checkpoint}, which holds {key} = {found[key]}; "
                "leave it out to use the checkpoint's value"
            )
        found[key] = value
    return found


def predict(
    input: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    *,
    pet: str | os.PathLike[str] | None = None,
    img_size: int | None = None,
    network_width: int | None = None,
    encoder_depths: Sequence[int] | None = None,
    decoder_depths: Sequence[int] | None = None,
    sw_batch_size: int | None = None,
    probabilities: bool = False,
    device: str | None = None,
    register: str = "none",
    suv_kind: str = "bw",
    ct_series: str | None = None,
    pet_series: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    keep_intermediate: bool = False,
    progress: bool = True,
    all_slices: bool = False,
    rtstruct: bool = False,
    report_extra: Mapping[str, Any] | None = None,
    ct_window_hu: Sequence[float] | None = None,
) -> dict[str, Path]:
    """Segment lung tumours in one PET-CT study and write the mask, DICOM SEG, figures and report.

    Args:
        input: a DICOM study folder, a CT + PET NIfTI pair (``"ct,pet"``, a 2-sequence, or ``pet=``), a folder
            holding such a pair, or a fused 2-channel ``image.nii.gz`` (see :func:`prepare_input`).
        out_dir: output folder (created): ``mask.nii.gz``, ``seg.dcm`` (DICOM input), ``overlay_axial.png``,
            ``mip_coronal.png``, ``report.json`` and, with ``probabilities``, ``probabilities.nii.gz``.
        checkpoint: CIPA state_dict; default ``<bundle>/models/model.pt``.
        pet: the PET (SUV) NIfTI when ``input`` is a CT NIfTI.
        img_size, network_width, encoder_depths, decoder_depths: the network; default read from the checkpoint
            (given values must agree with it).
        sw_batch_size: slices per network call (config default otherwise).
        probabilities: also save the sigmoid probabilities.
        device: torch device, e.g. ``"cpu"`` or ``"cuda:0"``; default the config's (CUDA when available).
        register: DICOM input: ``"none"`` or ``"rigid"`` PET->CT registration.
        suv_kind: DICOM input: ``"bw"``, ``"lbm"`` or ``"bsa"``.
        ct_series: DICOM input: SeriesInstanceUID of the CT series, where the study holds several.
        pet_series: DICOM input: SeriesInstanceUID of the PET series, where the study holds several.
        overrides: more ``inference.json`` ids, e.g. ``{"min_lesion_ml": 0.5}``.
        config_file: inference config; default ``<bundle>/configs/inference.json``.
        keep_intermediate: keep the converted inputs in ``out_dir/intermediate`` (else a temporary folder, removed).
        progress: show progress bars.
        all_slices: run the network on every body slice; by default only the lungs' axial range plus 2 cm each way
            runs (:class:`~cipa_bundle.inference.lung_range.LungSliceInferer`), the rest is background.
        rtstruct: DICOM input: also write ``rtstruct.dcm``, the mask's contours as an RTSTRUCT referencing the CT
            (for radiotherapy systems, which read RTSTRUCT rather than SEG).
        report_extra: more ``report.json`` keys about where the input came from (e.g. the DICOMweb study).
        ct_window_hu: the CT window ``(low, high)`` in HU the model was trained with (default: the bundle's lung
            window); see :func:`~cipa_bundle.inference.inputs.prepare_input`.

    Returns:
        ``{"mask": path, ...}``: every file written.

    Raises:
        MissingWeightsError: no checkpoint (the message says how to get one).
        CipaInputError: a bad input, checkpoint or argument.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if device is not None:
        _require_device(device)
    root = bundle_root()
    config = Path(config_file) if config_file is not None else root / "configs" / "inference.json"
    if not config.is_file():
        raise CipaInputError(f"inference config {config} not found; expected the bundle's configs/inference.json "
                             "(pass config_file= when the package is installed without the bundle folder)")
    weights = require_checkpoint(checkpoint if checkpoint is not None else root / "models" / "model.pt")
    arch = _architecture(weights, {"img_size": img_size, "network_width": network_width,
                                   "encoder_depths": encoder_depths, "decoder_depths": decoder_depths})

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = out / "intermediate" if keep_intermediate else Path(tempfile.mkdtemp(prefix=".cipa-work-", dir=out))
    try:
        prepared = prepare_input(input, work / "input", pet=pet, register=register, suv_kind=suv_kind,
                                 ct_series=ct_series, pet_series=pet_series, progress=progress,
                                 ct_window_hu=ct_window_hu)
        timings["prepare"] = time.perf_counter() - start
        if rtstruct and not prepared.ct_datasets:
            raise CipaInputError(
                f"predict: rtstruct=True needs a DICOM study as input (an RTSTRUCT references the CT instances); "
                f"{input} is a {prepared.kind} input"
            )

        mark = time.perf_counter()
        workflow_out = work / "workflow"
        settings: dict[str, Any] = {
            "bundle_root": str(config.resolve().parents[1]),
            "datalist": [{"image": str(prepared.image)}],
            "output_dir": str(workflow_out),
            "checkpoint": str(weights),
            "save_probabilities": bool(probabilities),
            "progress": bool(progress),
            "all_slices": bool(all_slices),
            **arch,
        }
        if device is not None:
            settings["device"] = f"$torch.device({str(device)!r})"
        if sw_batch_size is not None:
            settings["sw_batch_size"] = int(sw_batch_size)
        settings.update(dict(overrides or {}))
        configs_dir = config.parent
        workflow = ConfigWorkflow(
            config_file=str(config),
            meta_file=str(configs_dir / "metadata.json") if (configs_dir / "metadata.json").is_file() else None,
            logging_file=str(configs_dir / "logging.conf") if (configs_dir / "logging.conf").is_file() else False,
            workflow_type="infer",
            **settings,
        )
        workflow.initialize()
        workflow.run()
        workflow.finalize()
        timings["inference"] = time.perf_counter() - mark

        case_dir = workflow_out / case_name(prepared.image)
        written: dict[str, Path] = {"mask": out / MASK_NIFTI}
        os.replace(case_dir / MASK_NIFTI, written["mask"])
        if probabilities:
            written["probabilities"] = out / PROBABILITIES_NIFTI
            os.replace(case_dir / PROBABILITIES_NIFTI, written["probabilities"])

        parsed = workflow.parser.get_parsed_content
        extra = {
            "model": {"checkpoint": str(weights), **arch},
            "inference": {**parsed("inferer").last_stats, "sw_batch_size": parsed("sw_batch_size"),
                          "config": str(config)},
            "postprocessing": {key: parsed(key) for key in
                               ("threshold", "min_lesion_ml", "min_body_fraction", "body_threshold")},
            **dict(report_extra or {}),
        }
        written.update(write_outputs(prepared, written["mask"], out, device=_device_name(parsed("device")),
                                     timings=timings, extra=extra, also_written=[p.name for p in written.values()],
                                     rtstruct=rtstruct))
    finally:
        if not keep_intermediate:
            shutil.rmtree(work, ignore_errors=True)
    return written
