"""Weight files: read a checkpoint without arbitrary unpickling, take its state_dict, and read back the CIPA
architecture it was saved from.

Every ``torch.load`` of model weights in the package goes through :func:`load_checkpoint`: the official
``CIPA.pth``, VMamba's ImageNet weights, and the bundle's own ``models/model.pt`` (a plain state_dict, or MONAI's
``{"model": state_dict, ...}`` checkpoint).
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from cipa_bundle.errors import CipaInputError

__all__ = ["checkpoint_architecture", "cipa_state_dict", "load_checkpoint", "state_dict_of"]

_ENCODER_BLOCK = re.compile(r"encoder\.stages\.(\d)\.blocks\.(\d+)\.")
_DECODER_BLOCK = re.compile(r"decoder\.stages\.(\d)\.blocks\.(\d+)\.")


def load_checkpoint(path: str | os.PathLike[str]) -> Mapping[str, object]:
    """``torch.load`` without arbitrary unpickling; the official checkpoints also pickle an argparse Namespace."""
    path = Path(path)
    if not path.is_file():
        raise CipaInputError(f"{path}: checkpoint file not found")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises several unpickling error types
        raise CipaInputError(
            f"{path}: cannot be read as a weights-only PyTorch checkpoint ({type(err).__name__}: {err}). "
            "Re-save just its state_dict, e.g. torch.save(torch.load(p, weights_only=False)['model'], 'model_only.pth'), "
            "in an environment you trust."
        ) from err
    if not isinstance(checkpoint, Mapping):
        raise CipaInputError(f"{path}: expected a dict checkpoint, got {type(checkpoint).__name__}")
    return checkpoint


def state_dict_of(checkpoint: Mapping[str, object], path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """The state_dict in a loaded checkpoint: its ``"model"`` entry (MONAI's ``CheckpointSaver``, the official
    training script) or the checkpoint itself (a plain state_dict)."""
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CipaInputError(f"{path}: key 'model' (or the top level) must be a state_dict of tensors")
    return state  # type: ignore[return-value]


def cipa_state_dict(path: str | os.PathLike[str]) -> Mapping[str, torch.Tensor]:
    """The state_dict of :class:`~cipa_bundle.networks.CIPA` saved in ``path``.

    Raises:
        CipaInputError: the file cannot be read, or it holds weights of another network (e.g. an official
            ``CIPA.pth`` that has not been converted).
    """
    state = state_dict_of(load_checkpoint(path), path)
    if "encoder.patch_embed.weight" not in state:
        raise CipaInputError(
            f"checkpoint {path}: key encoder.patch_embed.weight missing; expected a state_dict of "
            "cipa_bundle.networks.CIPA (convert an official CIPA.pth first, with 'cipa-bundle import-official')"
        )
    return state


def checkpoint_architecture(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The CIPA constructor arguments a state_dict was saved from, read from its tensor shapes.

    * ``network_width``: output channels of the encoder's patch embedding;
    * ``img_size``: CRM's first layer normalises the flattened stage-0 map of ``(img_size / 4)**2`` values;
    * ``encoder_depths`` / ``decoder_depths``: blocks per stage. The decoder's deepest entry exists only for the
      training drop-path schedule (no weights), so it is set equal to the entry before it.

    Returns:
        ``{"img_size", "network_width", "encoder_depths", "decoder_depths"}``.

    Raises:
        CipaInputError: the file is not a CIPA state_dict (square input assumed).
    """
    state = cipa_state_dict(path)
    width = int(state["encoder.patch_embed.weight"].shape[0])
    area = int(state["crm.0.spatial_norm.weight"].shape[0]) if "crm.0.spatial_norm.weight" in state else 0
    side = math.isqrt(area)
    if side * side != area or side == 0:
        raise CipaInputError(f"checkpoint {path}: crm.0.spatial_norm has {area} values, expected a square map")
    encoder = [0, 0, 0, 0]
    decoder = [0, 0, 0]
    for key in state:
        if m := _ENCODER_BLOCK.match(key):
            encoder[int(m[1])] = max(encoder[int(m[1])], int(m[2]) + 1)
        elif m := _DECODER_BLOCK.match(key):
            # decoder.stages.j refines the skip at encoder stage 2 - j (deep to shallow).
            decoder[2 - int(m[1])] = max(decoder[2 - int(m[1])], int(m[2]) + 1)
    return {"img_size": 4 * side, "network_width": width, "encoder_depths": encoder,
            "decoder_depths": [*decoder, decoder[2]]}
