"""Atomic NIfTI and JSON writers: an output file is either complete or absent, never half-written.

Every writer here goes through :func:`cipa_bundle.io.atomic.atomic_outputs`, so several files that belong together
(a NIfTI and its JSON sidecar) appear all or none.

``.nii.gz`` files are gzipped here rather than by nibabel, with a zero gzip timestamp, so the same volume always
gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gzip
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.volume import Volume

__all__ = [
    "AFFINE_ATOL_MM",
    "NIFTI_SUFFIXES",
    "is_nifti_path",
    "strip_nifti_suffix",
    "nifti_header",
    "require_3d_mask",
    "grid_mismatch",
    "require_same_grid",
    "json_text",
    "nifti_bytes",
    "save_json",
    "save_nifti",
    "save_nifti_with_sidecar",
    "sidecar_path",
    "json_ready",
]

#: gzip level for .nii.gz: 1 is what nibabel uses by default; higher levels cost seconds on clinical volumes.
_GZIP_LEVEL = 1


#: File endings of NIfTI files, the longer first so that ``.nii.gz`` is taken off whole. Matched case-insensitively.
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti_path(path: str | os.PathLike[str]) -> bool:
    """Whether the file name ends in ``.nii`` or ``.nii.gz`` (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(text: str) -> str:
    """``text`` without a final ``.nii`` / ``.nii.gz`` (any case): ``sub/case_001.nii.gz`` -> ``sub/case_001``.

    Text with another ending is returned whole.
    """
    for suffix in NIFTI_SUFFIXES:
        if text.lower().endswith(suffix):
            return text[: -len(suffix)]
    return text


def nifti_bytes(image: Any, *, gz: bool) -> bytes:
    """The bytes of a NIfTI file for ``image`` (a :class:`Volume` or a ``nibabel`` NIfTI image).

    Spatial units are set to mm. With ``gz`` the bytes are gzipped with a zero timestamp (reproducible).
    """
    img = image.to_nifti() if isinstance(image, Volume) else image
    img.header.set_xyzt_units("mm", "sec")
    raw = img.to_bytes()
    if not gz:
        return raw
    return gzip.compress(raw, compresslevel=_GZIP_LEVEL, mtime=0)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def save_nifti(image: Any, path: str | os.PathLike[str]) -> Path:
    """Save a :class:`Volume` or ``nibabel`` image to ``path`` (``.nii`` or ``.nii.gz``) atomically.

    Args:
        image: a :class:`~cipa_bundle.io.volume.Volume` (array ``(I, J, K[, C])``, RAS affine in mm) or a
            ``nibabel.Nifti1Image``.
        path: output path ending in ``.nii`` or ``.nii.gz``.

    Returns:
        ``path`` as a :class:`Path`.

    Raises:
        ValueError: ``path`` does not end in ``.nii`` or ``.nii.gz``.
    """
    final = Path(path)
    if not is_nifti_path(final):
        raise ValueError(f"NIfTI output {final} must end in .nii or .nii.gz")
    data = nifti_bytes(image, gz=final.name.lower().endswith(".gz"))
    with atomic_outputs([final]) as (temp,):
        _write_bytes(temp, data)
    return final


def json_ready(value: Any) -> Any:
    """``value`` as plain JSON values, for a record in which a non-finite number means "not defined".

    Dataclasses and objects with ``to_dict`` / ``as_dict`` become dicts (keys as text), tuples and arrays lists,
    numpy scalars Python numbers, datetimes ISO text and paths text; NaN and infinity become ``null``. It is the one
    sanitiser of the package (report.json, the evaluation summary). :func:`json_text` alone refuses NaN instead,
    because a NaN in a provenance sidecar is an error, not an undefined value.
    """
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return json_ready(dataclasses.asdict(value))
    for method in ("to_dict", "as_dict"):
        if callable(getattr(value, method, None)):
            return json_ready(getattr(value, method)())
    if isinstance(value, Mapping):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_ready(value.tolist())
    if isinstance(value, np.generic):
        return json_ready(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Infinity
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _json_default(obj: Any) -> Any:
    """numpy scalars/arrays and paths into JSON types (the encoder's fallback; NaN stays refused)."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def json_text(obj: Any) -> str:
    """Indented JSON with numpy support; NaN/inf are refused (they are not JSON)."""
    return json.dumps(obj, indent=2, allow_nan=False, default=_json_default) + "\n"


def save_json(obj: Any, path: str | os.PathLike[str]) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically (numpy scalars and arrays allowed; NaN refused)."""
    final = Path(path)
    text = json_text(obj)
    with atomic_outputs([final]) as (temp,):
        _write_bytes(temp, text.encode("utf-8"))
    return final


def save_nifti_with_sidecar(
    image: Any, path: str | os.PathLike[str], sidecar: Any, sidecar_file: str | os.PathLike[str] | None = None
) -> tuple[Path, Path]:
    """Save a NIfTI and its JSON sidecar together: both appear, or (on any failure) neither does.

    Args:
        image: a :class:`Volume` or ``nibabel`` image.
        path: ``.nii`` / ``.nii.gz`` output path.
        sidecar: JSON-serialisable object (e.g. a provenance record's ``to_dict()``).
        sidecar_file: where to write the JSON; default :func:`sidecar_path` of ``path``.

    Returns:
        ``(nifti_path, json_path)``.
    """
    final = Path(path)
    if not is_nifti_path(final):
        raise ValueError(f"NIfTI output {final} must end in .nii or .nii.gz")
    json_file = Path(sidecar_file) if sidecar_file is not None else sidecar_path(final)
    # Serialise both before touching the disk, so a bad value fails with nothing written.
    text = json_text(sidecar).encode("utf-8")
    data = nifti_bytes(image, gz=final.name.lower().endswith(".gz"))
    with atomic_outputs([final, json_file]) as (temp_nii, temp_json):
        _write_bytes(temp_nii, data)
        _write_bytes(temp_json, text)
    return final, json_file


def sidecar_path(nifti_path: str | os.PathLike[str]) -> Path:
    """The JSON sidecar of a NIfTI file, BIDS-style: ``suv.nii.gz`` -> ``suv.json``, ``x.nii`` -> ``x.json``."""
    path = Path(nifti_path)
    return path.with_name(strip_nifti_suffix(path.name) + ".json")


# ---------------------------------------------------------------------------------------------------- grid checks
#: Largest difference (mm) allowed between the affines of files that must share a voxel grid.
AFFINE_ATOL_MM = 1e-2


def nifti_header(path: Path, case: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Shape and affine of a NIfTI from its header (no voxel data is read); errors name ``case`` and the file."""
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as err:  # nibabel raises several unrelated types for unreadable files
        raise CipaInputError(f"case {case}: cannot read NIfTI header of {path}: {err}") from err
    return tuple(int(s) for s in img.shape), np.asarray(img.affine, dtype=np.float64)


def grid_mismatch(
    shape_a: Sequence[int], affine_a: ArrayLike, shape_b: Sequence[int], affine_b: ArrayLike
) -> str | None:
    """How two voxel grids differ, or ``None`` when they are one grid.

    One grid means the same spatial shape (the first three axes; a trailing channel axis is ignored) and affines
    that agree to :data:`AFFINE_ATOL_MM`. The description names the first difference found, for error messages.
    """
    spatial_a, spatial_b = tuple(int(n) for n in shape_a[:3]), tuple(int(n) for n in shape_b[:3])
    if spatial_a != spatial_b:
        return f"spatial shape {spatial_a} vs {spatial_b}"
    a, b = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    if not np.allclose(a, b, rtol=0.0, atol=AFFINE_ATOL_MM):
        return (
            f"affines differ by up to {float(np.max(np.abs(a - b))):.3g} mm, more than {AFFINE_ATOL_MM} mm: "
            f"{a[:3].round(3).tolist()} vs {b[:3].round(3).tolist()}"
        )
    return None


def require_same_grid(
    case: str, a: tuple[Path, tuple[int, ...], np.ndarray], b: tuple[Path, tuple[int, ...], np.ndarray]
) -> None:
    """Raise unless two ``(file, shape, affine)`` headers describe one voxel grid (:func:`grid_mismatch`)."""
    (pa, sa, aa), (pb, sb, ab) = a, b
    problem = grid_mismatch(sa, aa, sb, ab)
    if problem is not None:
        raise CipaInputError(f"case {case}: {pa.name} and {pb.name} differ ({problem}); expected the same grid")


def require_3d_mask(case: str, path: Path, shape: tuple[int, ...]) -> None:
    """Raise unless ``shape`` is a 3-D ``(I, J, K)`` (or ``(I, J, K, 1)``) mask."""
    if not (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        raise CipaInputError(f"case {case}: label {path} has shape {shape}; expected a 3-D (I, J, K) mask")
