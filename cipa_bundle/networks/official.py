"""Import the released official CIPA checkpoint (``CIPA.pth``) as this bundle's ``models/model.pt``.

The name translation lives in :mod:`cipa_bundle.networks.official_keys`, which :class:`CIPA` itself uses for VMamba's
ImageNet weights; this module adds the check against :class:`CIPA` and the file output.
"""

from __future__ import annotations

import logging
import os

import torch

from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.networks.cipa import CIPA
from cipa_bundle.networks.official_keys import (
    OfficialKeyError,
    convert_official_state_dict,
    load_checkpoint,
    state_dict_of,
)

__all__ = ["import_official_checkpoint"]

logger = logging.getLogger(__name__)


def import_official_checkpoint(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str]) -> str:
    """Convert the released official checkpoint (``CIPA.pth``) into a state_dict for the default :class:`CIPA`.

    The result is checked against ``CIPA()``: the same keys and shapes, or an error naming the differences. It is
    written atomically as a plain state_dict, which MONAI's ``CheckpointLoader`` and ``torch.load`` both read.

    Returns:
        The output path.
    """
    state = convert_official_state_dict(state_dict_of(load_checkpoint(checkpoint), checkpoint))
    with torch.device("meta"):
        expected = CIPA().state_dict()
    missing = sorted(set(expected) - set(state))
    mismatched = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or mismatched:
        details = [f"missing {missing[:5]}"] if missing else []
        details += [f"{k}: {tuple(state[k].shape)} != {tuple(expected[k].shape)}" for k in mismatched[:5]]
        raise OfficialKeyError(f"{checkpoint}: not the default CIPA configuration: " + "; ".join(details))
    with atomic_outputs([out]) as (tmp,):
        torch.save({k: v.contiguous() for k, v in state.items()}, tmp)
    logger.info("wrote %d tensors to %s", len(state), out)
    return str(out)
