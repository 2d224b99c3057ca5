"""The selective scan behind every Mamba block of CIPA, with interchangeable backends."""

from __future__ import annotations

from cipa_bundle.networks.scan.dispatch import available_backends, selective_scan
from cipa_bundle.networks.scan.reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference", "available_backends"]
