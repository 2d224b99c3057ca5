"""Run the bundle's inference workflow on one study (``cipa-bundle predict``), and the inferer the workflow uses.

``predict`` is the bundle, not a second implementation of it: it prepares the input
(:func:`~cipa_bundle.inference.inputs.prepare_input`), runs ``configs/inference.json`` through
``monai.bundle.ConfigWorkflow`` with overrides (the datalist, the output folder, the checkpoint and the network size
read from the checkpoint), and hands the saved mask to :func:`~cipa_bundle.inference.outputs.write_outputs`.
Everything between input and mask (orientation, normalisation, slice-wise inference, sigmoid, inversion, threshold,
post-processing) is therefore what ``python -m monai.bundle run --config_file configs/inference.json`` does too.

:class:`BodySliceInferer` is the workflow's ``inferer``: MONAI's ``SliceInferer`` that only runs the network on the
axial slices between the first and the last slice containing body (plus a margin). Slices outside that range, e.g.
the air above the head or below the feet of a CT that extends past the patient, get a ``background_logit`` whose
sigmoid is 0, so they are always background and cost nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from monai.bundle import ConfigWorkflow
from monai.inferers import SliceInferer
from monai.utils import convert_to_dst_type

from cipa_bundle.errors import CipaInputError
from cipa_bundle.inference.inputs import case_name, prepare_input
from cipa_bundle.inference.outputs import MASK_NIFTI, PROBABILITIES_NIFTI, write_outputs
from cipa_bundle.inference.postprocess import DEFAULT_BODY_THRESHOLD
from cipa_bundle.networks.weights import checkpoint_architecture
from cipa_bundle.preprocessing.transforms import NormalizeCIPAInput

__all__ = [
    "BodySliceInferer",
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


# ----------------------------------------------------------------------------------------------- inferer
class BodySliceInferer(SliceInferer):
    """``SliceInferer`` that skips the axial slices outside the body's head-foot range.

    A slice "contains body" when any voxel of its CT channel exceeds ``body_threshold``. The network runs on the
    contiguous range from the first to the last such slice, widened by ``margin`` slices on each side (a lesion is
    never outside the body, but its boundary slice may hold little tissue); the other slices receive
    ``background_logit``. If no slice contains body, every slice is run: nothing is skipped on a guess.

    Units: ``body_threshold`` is in windowed-CT units ([0, 1], 0.5 = -700 HU with the default window, the same
    value the post-processing's body mask uses); the inferer sees network inputs, so it maps the threshold through
    :class:`~cipa_bundle.preprocessing.transforms.NormalizeCIPAInput`. The default ``cval`` (padding of slices
    smaller than ``roi_size``) is likewise that transform applied to 0: padding looks like air and zero uptake.

    Args:
        roi_size: the network's ``(H, W)`` input size.
        sw_batch_size: slices per network call.
        spatial_dim: the axial axis among the three spatial axes of the ``(B, C, X, Y, Z)`` input (2 after
            ``Orientationd("PLS")``).
        body_channel: the CT channel of the input.
        body_threshold: see above.
        margin: slices added on each side of the body range.
        background_logit: logit written for skipped slices (sigmoid(-1e4) is exactly 0 in float32).
        cval: padding value; ``None`` = normalised 0.
        kwargs: other ``SlidingWindowInferer`` arguments (``overlap``, ``mode``, ``progress``, ``device``...).

    After each call, :attr:`last_stats` holds ``{"slices", "slices_run", "network_s", "selection"}``
    (``selection``: ``"body"``, or ``"all"`` when every slice ran). Subclasses choose other ranges by overriding
    :meth:`slice_range` (:class:`~cipa_bundle.inference.lung_range.LungSliceInferer`).
    """
    def __init__(
        self,
        roi_size: Sequence[int] | int,
        sw_batch_size: int = 1,
        spatial_dim: int = 2,
        body_channel: int = 0,
        body_threshold: float = DEFAULT_BODY_THRESHOLD,
        margin: int = 1,
        background_logit: float = -1e4,
        cval: float | None = None,
        **kwargs: Any,
    ) -> None:
        normalize = NormalizeCIPAInput()
        if cval is None:
            cval = float(normalize(torch.zeros(1))[0])
        super().__init__(spatial_dim, roi_size=roi_size, sw_batch_size=sw_batch_size, cval=cval, **kwargs)
        if margin < 0:
            raise ValueError(f"BodySliceInferer: margin must be >= 0, got {margin}")
        self.body_channel = int(body_channel)
        self.body_threshold = float(body_threshold)
        self.network_threshold = float(normalize(torch.tensor([float(body_threshold)]))[0])
        self.margin = int(margin)
        self.background_logit = float(background_logit)
        self.last_stats: dict[str, Any] = {}
        self.selection: dict[str, Any] = {}

    def body_range(self, inputs: torch.Tensor) -> tuple[int, int]:
        """``(first, stop)`` of the slices to run along the axial axis of ``(B, C, X, Y, Z)`` ``inputs``."""
        axis = self.spatial_dim + 2
        n = int(inputs.shape[axis])
        ct = inputs[:, self.body_channel : self.body_channel + 1]
        other = tuple(d for d in range(inputs.ndim) if d != axis)
        has_body = torch.amax((ct > self.network_threshold).to(torch.uint8), dim=other)
        hits = torch.nonzero(has_body).flatten()
        if hits.numel() == 0:
            return 0, n
        return max(int(hits[0]) - self.margin, 0), min(int(hits[-1]) + 1 + self.margin, n)

    def slice_range(self, inputs: torch.Tensor) -> tuple[int, int]:
        """``(first, stop)`` of the slices the network runs on; sets :attr:`selection` to say how it was chosen."""
        first, stop = self.body_range(inputs)
        every = (first, stop) == (0, int(inputs.shape[self.spatial_dim + 2]))
        self.selection = {"selection": "all" if every else "body"}
        return first, stop

    def __call__(  # type: ignore[override]
        self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        axis = self.spatial_dim + 2
        n = int(inputs.shape[axis])
        first, stop = self.slice_range(inputs)
        start = time.perf_counter()
        if (first, stop) == (0, n):
            out = super().__call__(inputs, network, *args, **kwargs)
        else:
            part = super().__call__(inputs.narrow(axis, first, stop - first), network, *args, **kwargs)
            if not isinstance(part, torch.Tensor):  # multi-output networks: fall back to the plain inferer
                out = super().__call__(inputs, network, *args, **kwargs)
                first, stop = 0, n
                self.selection = {"selection": "all"}
            else:
                part_t = part.as_tensor() if hasattr(part, "as_tensor") else part
                shape = list(part_t.shape)
                shape[axis] = n
                full = torch.full(shape, self.background_logit, dtype=part_t.dtype, device=part_t.device)
                full.narrow(axis, first, stop - first).copy_(part_t)
                out = convert_to_dst_type(full, inputs, dtype=full.dtype, device=full.device)[0]
        self.last_stats = {"slices": n, "slices_run": stop - first, "network_s": time.perf_counter() - start,
                           **self.selection}
        return out  # type: ignore[return-value]


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
