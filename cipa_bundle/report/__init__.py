"""Clinical read-outs of a predicted tumour mask: per-lesion PET statistics, two PNG figures and ``report.json``.

Three parts, one module each, each a pure function with a thin file writer around it:

1. **Lesions** (:mod:`cipa_bundle.report.statistics`). 3-D connected components (26-connectivity) of the binary
   mask, ordered largest first, with their voxel count, volume in ml (from the affine), SUVmax, SUVmean, total lesion
   glycolysis (SUVmean x ml), centroid in RAS mm and bounding box -> :func:`label_lesions`,
   :func:`lesion_statistics`.
2. **Figures** (:mod:`cipa_bundle.report.preview`; Pillow only, no matplotlib): the axial slice of maximum tumour
   extent as a PET-on-CT fusion with the mask contour -> :func:`render_axial_overlay`, and a coronal PET MIP with the
   outline of the projected mask -> :func:`render_coronal_mip`; both shown in the radiological convention derived
   from the affine.
3. **Report** (:mod:`cipa_bundle.report.report_json`). Versions, device, timings, SUV provenance, tumour count,
   total volume and the lesion list -> :func:`build_report` (a dict) and :func:`write_report` (``report.json``,
   written atomically).

All volumes are :class:`~cipa_bundle.io.volume.Volume` objects on one grid (the CT grid of inference) with arrays
indexed ``[i, j, k]`` and a voxel-to-RAS affine. The names below are re-exported so ``cipa_bundle.report.X`` works.
"""

from __future__ import annotations

from cipa_bundle.report.preview import (
    AXIAL_PNG,
    CORONAL_MIP_PNG,
    MIN_DISPLAY_PIXELS,
    max_extent_axial_slice,
    render_axial_overlay,
    render_coronal_mip,
    write_overlays,
    write_png,
)
from cipa_bundle.report.report_json import REPORT_JSON, build_report, software_versions, write_report
from cipa_bundle.report.statistics import Lesion, label_lesions, lesion_statistics, voxel_volume_ml

__all__ = [
    "Lesion",
    "label_lesions",
    "lesion_statistics",
    "voxel_volume_ml",
    "software_versions",
    "max_extent_axial_slice",
    "render_axial_overlay",
    "render_coronal_mip",
    "write_png",
    "write_overlays",
    "build_report",
    "write_report",
    "AXIAL_PNG",
    "CORONAL_MIP_PNG",
    "REPORT_JSON",
    "MIN_DISPLAY_PIXELS",
]
