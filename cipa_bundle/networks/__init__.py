"""The CIPA network and its building blocks (no DICOM, no I/O beyond weight files)."""

from __future__ import annotations

from cipa_bundle.networks.blocks import SS1D, SS2D
from cipa_bundle.networks.cipa import CIPA
from cipa_bundle.networks.crm import ChannelRectification
from cipa_bundle.networks.dcim import CrossModalInteraction
from cipa_bundle.networks.decoder import MambaDecoder
from cipa_bundle.networks.encoder import VMambaEncoder
from cipa_bundle.networks.official_keys import convert_official_state_dict, load_vmamba_pretrained
from cipa_bundle.networks.optim import param_groups

__all__ = [
    "CIPA",
    "SS1D",
    "SS2D",
    "ChannelRectification",
    "CrossModalInteraction",
    "MambaDecoder",
    "VMambaEncoder",
    "convert_official_state_dict",
    "load_vmamba_pretrained",
    "param_groups",
]
