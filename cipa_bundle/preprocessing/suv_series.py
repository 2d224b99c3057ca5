"""SUV for a PET series on disk: read the DICOM series, scale each slice by its SUV factor, write NIfTI + sidecar.

The SUV maths is :func:`cipa_bundle.preprocessing.suv.suv_factors`, a pure function over the headers; this module is
the file edge around it (``cipa-bundle suv``, ``convert`` and the ``LoadSUVd`` transform read PET through it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from cipa_bundle import __version__
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.dicom import DicomSeries, find_series, read_series
from cipa_bundle.io.nifti import is_nifti_path, save_nifti_with_sidecar
from cipa_bundle.io.volume import Volume
from cipa_bundle.preprocessing.suv import SuvKind, SuvProvenance, suv_factors

__all__ = ["pet_series_to_suv", "write_suv"]


def pet_series_to_suv(
    source: Any,
    kind: SuvKind = "bw",
    *,
    mbq_heuristic: bool = True,
    allow_decay_none: bool = False,
) -> tuple[Any, SuvProvenance]:
    """Read a PET DICOM series and convert it to SUV.

    Args:
        source: a folder (its one image series, or its one PT series if there are several) or a ``DicomSeries``.
        kind: ``"bw"``, ``"lbm"`` or ``"bsa"`` (see :func:`~cipa_bundle.preprocessing.suv.suv_factors`).
        mbq_heuristic: see :func:`~cipa_bundle.preprocessing.suv.suv_factors`.
        allow_decay_none: see :func:`~cipa_bundle.preprocessing.suv.suv_factors`.

    Returns:
        ``(volume, provenance)``: a float32 ``(I, J, K)`` :class:`~cipa_bundle.io.volume.Volume` of SUV on the
        native PET grid (RAS affine), and the :class:`SuvProvenance`.

    Raises:
        SuvError, DicomSeriesError: both ``CipaInputError``.
    """
    if isinstance(source, DicomSeries):
        series = source
    else:
        groups = find_series(source)
        # A lone series is read whatever its modality, so that a CT folder fails with E1 rather than "no series".
        if len(groups) == 1:
            series = read_series(next(iter(groups.values())))
        else:
            series = read_series(source, modality="PT")
    factors, prov = suv_factors(
        series.datasets,
        kind,
        files=series.sources or series.files,
        mbq_heuristic=mbq_heuristic,
        allow_decay_none=allow_decay_none,
    )
    array = (series.volume.array.astype(np.float64) * factors[None, None, :]).astype(np.float32)
    meta = dict(series.volume.meta)
    meta.update(units=prov.unit, quantity=prov.quantity)
    return Volume(array, series.volume.affine.copy(), meta), prov


def write_suv(
    pet_dir: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    kind: SuvKind = "bw",
    *,
    mbq_heuristic: bool = True,
    allow_decay_none: bool = False,
) -> tuple[Path, Path]:
    """Convert a PET DICOM folder to an SUV NIfTI plus its JSON provenance sidecar, both atomically.

    The sidecar sits beside the NIfTI, BIDS style (``suv.nii.gz`` -> ``suv.json``). Nothing at all is written
    when the conversion fails.

    Args:
        pet_dir: folder holding the PET series.
        out_path: output ``.nii`` or ``.nii.gz``.
        kind: ``"bw"``, ``"lbm"`` or ``"bsa"``.
        mbq_heuristic: see :func:`~cipa_bundle.preprocessing.suv.suv_factors`.
        allow_decay_none: see :func:`~cipa_bundle.preprocessing.suv.suv_factors`.

    Returns:
        ``(nifti_path, json_path)``.
    """
    out = Path(out_path)
    if not is_nifti_path(out):
        raise CipaInputError(f"output {out}: expected a path ending in .nii or .nii.gz")
    volume, prov = pet_series_to_suv(pet_dir, kind, mbq_heuristic=mbq_heuristic, allow_decay_none=allow_decay_none)
    record = {"cipa_bundle_version": __version__, "source": str(pet_dir), **prov.to_dict()}
    return save_nifti_with_sidecar(volume, out, record)
