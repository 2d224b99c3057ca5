"""``report.json``: the machine-readable record of one segmentation.

Versions, device, timings, SUV provenance, tumour count, total volume and the lesion list (from
:func:`~cipa_bundle.report.statistics.lesion_statistics`) -> :func:`build_report` (a dict, pure) and
:func:`write_report` (``report.json``, written atomically).
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

import cipa_bundle
from cipa_bundle.io.nifti import json_ready, save_json
from cipa_bundle.report.statistics import Lesion

__all__ = ["software_versions", "build_report", "write_report", "REPORT_JSON"]

REPORT_JSON = "report.json"


def _package_version(name: str) -> str | None:
    """Installed distribution version without importing the package (torch's import alone takes seconds)."""
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """Versions of this bundle and the libraries whose numerics the results depend on."""
    return {
        "cipa_bundle": cipa_bundle.__version__,
        "monai": _package_version("monai"),
        "torch": _package_version("torch"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def build_report(
    lesions: list[Lesion],
    *,
    device: str,
    timings: Mapping[str, float],
    suv_provenance: Any = None,
    voxel_volume_ml: float | None = None,
    extra: Mapping[str, Any] | None = None,
    created: _dt.datetime | None = None,
) -> dict[str, Any]:
    """The content of ``report.json`` as a JSON-ready dict (pure: no I/O).

    Args:
        lesions: output of :func:`lesion_statistics`.
        device: the torch device inference ran on, e.g. ``"cpu"`` or ``"cuda:0 (NVIDIA H100)"``.
        timings: stage name -> seconds, e.g. ``{"load": 1.2, "inference": 30.5, "outputs": 2.0}``.
        suv_provenance: how SUV was computed (a dict, or a dataclass such as the SUV module's provenance record);
            ``None`` when the PET was not converted to SUV (then SUV values are in the PET's own units).
        voxel_volume_ml: volume of one voxel of the mask grid, recorded so volumes can be re-derived.
        extra: more top-level keys (inputs, outputs, threshold...); must not overwrite the keys above.
        created: timestamp; default now (UTC).

    Returns:
        ``{"format", "created", "versions", "device", "timings_s", "suv_provenance", "tumor_count",
        "total_volume_ml", "total_lesion_glycolysis", "voxel_volume_ml", "lesions": [...]}`` plus ``extra``.
    """
    bad = {k: v for k, v in timings.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
    if bad:
        raise ValueError(f"timings must be finite seconds, got {bad}")
    tlgs = [lesion.tlg for lesion in lesions]
    report: dict[str, Any] = {
        "format": "cipa_bundle.report/1",
        "created": (created or _dt.datetime.now(_dt.timezone.utc)).isoformat(timespec="seconds"),
        "versions": software_versions(),
        "device": str(device),
        "timings_s": {str(k): float(v) for k, v in timings.items()},
        "suv_provenance": json_ready(suv_provenance),
        "tumor_count": len(lesions),
        "total_volume_ml": float(sum(lesion.volume_ml for lesion in lesions)),
        "total_lesion_glycolysis": None if any(t is None for t in tlgs) else float(sum(tlgs)),  # type: ignore[arg-type]
        "voxel_volume_ml": voxel_volume_ml,
        "lesions": [lesion.to_dict() for lesion in lesions],
    }
    for key, value in (extra or {}).items():
        if key in report:
            raise ValueError(f"extra key {key!r} would overwrite a report field")
        report[key] = json_ready(value)
    return report


def write_report(
    out_dir: str | os.PathLike[str],
    lesions: list[Lesion],
    *,
    device: str,
    timings: Mapping[str, float],
    suv_provenance: Any = None,
    voxel_volume_ml: float | None = None,
    extra: Mapping[str, Any] | None = None,
    created: _dt.datetime | None = None,
    filename: str = REPORT_JSON,
) -> Path:
    """Write :func:`build_report`'s dict to ``out_dir/report.json`` atomically (strict JSON, 2-space indent).

    Returns:
        The path written.
    """
    report = build_report(
        lesions,
        device=device,
        timings=timings,
        suv_provenance=suv_provenance,
        voxel_volume_ml=voxel_volume_ml,
        extra=extra,
        created=created,
    )
    return save_json(report, Path(out_dir) / filename)
