"""The selective scan behind every Mamba block of CIPA, with interchangeable backends.

``selective_scan`` picks the backend (mamba-ssm on a GPU, compiled numba kernels on the CPU, chunked PyTorch
otherwise; see :mod:`.dispatch`). Importing this package imports neither numba nor mamba-ssm.
"""

from __future__ import annotations

from cipa_bundle.networks.scan.dispatch import ScanBackendError, available_backends, selective_scan
from cipa_bundle.networks.scan.reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference", "available_backends", "ScanBackendError"]
