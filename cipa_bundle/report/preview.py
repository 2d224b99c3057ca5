"""Clinical read-outs of a predicted tumour mask: per-lesion PET statistics, two PNG figures and ``report.json``.

Three parts, each a pure function with a thin file writer around it:

1. **Lesions.** 3-D connected components (26-connectivity) of the binary mask, ordered largest first, with their
   voxel count, volume in ml (from the affine), SUVmax, SUVmean, total lesion glycolysis (SUVmean x ml), centroid in
   RAS mm and bounding box -> :func:`label_lesions`, :func:`lesion_statistics`.
2. **Figures** (Pillow only, no matplotlib):

   * the axial slice of maximum tumour extent: CT in a lung window, PET blended in a "hot" colour map, the mask
     contour in green -> :func:`render_axial_overlay`;
   * a coronal maximum-intensity projection of the PET (inverted grey, as nuclear-medicine readers view it) with
     the outline of the projected mask in red -> :func:`render_coronal_mip`.

   Orientation is derived from the affine, never assumed: images are shown in the radiological convention, patient
   right on the image left, anterior up on the axial view and head up on the coronal view. Pixels are resampled
   to square physical size so anisotropic voxels do not distort anatomy.
3. **Report.** Versions, device, timings, SUV provenance, tumour count, total volume and the lesion list ->
   :func:`build_report` (a dict) and :func:`write_report` (``report.json``, written atomically).

All volumes are :class:`~cipa_bundle.io.volume.Volume` objects on one grid (the CT grid of inference) with arrays
indexed ``[i, j, k]`` and a voxel-to-RAS affine.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cipa_bundle.components import label_components, label_components_in_box
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.nifti import grid_mismatch, save_json
from cipa_bundle.io.volume import Volume, axial_axis, axial_orientation

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

AXIAL_PNG = "overlay_axial.png"
CORONAL_MIP_PNG = "mip_coronal.png"
REPORT_JSON = "report.json"

#: Smallest long side, in pixels, of a figure rendered at the default pixel size.
MIN_DISPLAY_PIXELS = 512

#: CT lung window as (level, width) in HU: the window chest radiologists read lung nodules in.
LUNG_WINDOW = (-600.0, 1500.0)

_MASK_COLOUR = (0, 255, 0)  # green stands out on both grey CT and the red/yellow of the hot map
_REFERENCE_COLOUR = (0, 200, 255)  # cyan: a ground truth beside the green prediction
_MIP_CONTOUR_COLOUR = (255, 0, 0)


# ----------------------------------------------------------------------------------------------- lesions
def label_lesions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """3-D connected components of a binary mask with 26-connectivity (faces, edges and corners touch).

    Args:
        mask: ``(I, J, K)`` binary mask (any dtype; non-zero is foreground).

    Returns:
        ``(labels, n)``: an ``(I, J, K)`` ``int32`` array with 0 for background and ``1..n`` for the components,
        numbered by decreasing voxel count (ties: the component whose first voxel comes first in C order wins),
        and the number of components ``n``.
    """
    return label_components(mask, connectivity=26)


@dataclasses.dataclass(frozen=True)
class Lesion:
    """One connected tumour component.

    Attributes:
        index: 1-based rank by volume (1 = largest); equals its value in :func:`label_lesions`' label map.
        voxel_count: number of voxels.
        volume_ml: ``voxel_count`` x voxel volume, in ml (cm^3).
        suv_max: the largest SUV in the lesion (``None`` without an SUV volume).
        suv_mean: the mean SUV over the lesion's voxels (``None`` without an SUV volume).
        tlg: total lesion glycolysis, ``suv_mean * volume_ml`` (SUV x ml; ``None`` without an SUV volume).
        centroid_ras_mm: centre of mass of the voxel centres (unweighted) in RAS+ mm.
        bbox_ijk: inclusive voxel bounding box ``((i0, j0, k0), (i1, j1, k1))``.
    """

    index: int
    voxel_count: int
    volume_ml: float
    suv_max: float | None
    suv_mean: float | None
    tlg: float | None
    centroid_ras_mm: tuple[float, float, float]
    bbox_ijk: tuple[tuple[int, int, int], tuple[int, int, int]]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (plain Python numbers and lists)."""
        out = dataclasses.asdict(self)
        out["centroid_ras_mm"] = list(self.centroid_ras_mm)
        out["bbox_ijk"] = [list(self.bbox_ijk[0]), list(self.bbox_ijk[1])]
        return out


def _check_same_grid(reference: Volume, reference_name: str, other: Volume, name: str) -> None:
    """Refuse a volume that is not on ``reference``'s voxel grid (:func:`~cipa_bundle.io.nifti.grid_mismatch`)."""
    problem = grid_mismatch(other.shape, other.affine, reference.shape, reference.affine)
    if problem is not None:
        raise CipaInputError(
            f"{name} is not on the {reference_name}'s grid ({name} vs {reference_name}: {problem}); resample it first"
        )


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in ml: ``|det(affine[:3, :3])|`` mm^3 / 1000."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def lesion_statistics(mask: Volume, suv: Volume | None = None) -> list[Lesion]:
    """Per-lesion size and PET uptake of a binary tumour mask.

    Args:
        mask: binary ``(I, J, K)`` mask with its affine (the volume of a voxel comes from the affine).
        suv: SUV ``(I, J, K)`` on the same grid (same shape and affine), or ``None`` to skip uptake statistics.
            Non-finite SUV voxels (e.g. outside the PET field of view after resampling) are left out of SUVmax and
            SUVmean; a lesion with none gets ``None``.

    Returns:
        One :class:`Lesion` per connected component (26-connectivity), largest first.

    Raises:
        CipaInputError: a mask that is not 3-D or an SUV volume on another grid.
    """
    if suv is not None:
        _check_same_grid(mask, "mask", suv, "suv")
    labels, box, n = label_components_in_box(mask.array, connectivity=26)
    origin = (box[0].start, box[1].start, box[2].start)
    if n == 0:
        return []
    ii, jj, kk = np.nonzero(labels)
    lab = labels[ii, jj, kk]
    ii, jj, kk = ii + origin[0], jj + origin[1], kk + origin[2]
    counts = np.bincount(lab, minlength=n + 1)[1:]
    centroid_ijk = np.stack(
        [np.bincount(lab, weights=axis.astype(np.float64), minlength=n + 1)[1:] / counts for axis in (ii, jj, kk)],
        axis=1,
    )
    centroid_ras = centroid_ijk @ mask.affine[:3, :3].T + mask.affine[:3, 3]

    # Group voxels by lesion once; reduceat then gives per-lesion min/max in one pass.
    order = np.argsort(lab, kind="stable")
    starts = np.searchsorted(lab[order], np.arange(1, n + 1))
    ijk_sorted = np.stack([ii, jj, kk], axis=1)[order]
    bbox_lo = np.minimum.reduceat(ijk_sorted, starts, axis=0)
    bbox_hi = np.maximum.reduceat(ijk_sorted, starts, axis=0)

    suv_max: list[float | None] = [None] * n
    suv_mean: list[float | None] = [None] * n
    if suv is not None:
        values = np.asarray(suv.array[ii, jj, kk], dtype=np.float64)
        finite = np.isfinite(values)
        n_finite = np.bincount(lab, weights=finite.astype(np.float64), minlength=n + 1)[1:]
        sums = np.bincount(lab, weights=np.where(finite, values, 0.0), minlength=n + 1)[1:]
        maxima = np.fmax.reduceat(np.where(finite, values, np.nan)[order], starts)
        for m in range(n):
            if n_finite[m] > 0:
                suv_max[m] = float(maxima[m])
                suv_mean[m] = float(sums[m] / n_finite[m])

    ml_per_voxel = voxel_volume_ml(mask.affine)
    lesions = []
    for m in range(n):
        volume = float(counts[m]) * ml_per_voxel
        lesions.append(
            Lesion(
                index=m + 1,
                voxel_count=int(counts[m]),
                volume_ml=volume,
                suv_max=suv_max[m],
                suv_mean=suv_mean[m],
                tlg=None if suv_mean[m] is None else suv_mean[m] * volume,
                centroid_ras_mm=tuple(float(v) for v in centroid_ras[m]),  # type: ignore[arg-type]
                bbox_ijk=(
                    tuple(int(v) for v in bbox_lo[m]),  # type: ignore[arg-type]
                    tuple(int(v) for v in bbox_hi[m]),  # type: ignore[arg-type]
                ),
            )
        )
    return lesions


# ----------------------------------------------------------------------------------------------- orientation
# Display axes: x toward the patient's Left (image columns, so patient right is on the image left), y toward
# Posterior (axial rows, anterior up) and z toward Superior. In nibabel's axis codes that is ("L", "P", "S").
_DISPLAY_AXCODES = ("L", "P", "S")


def _display_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform (per voxel axis: target axis, flip) from the voxel axes to (L, P, S)."""
    from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

    return ornt_transform(io_orientation(affine), axcodes2ornt(_DISPLAY_AXCODES))


def _to_display(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``(I, J, K)`` to ``(X=L, Y=P, Z=S)`` (a view, no copy) and return it with its voxel sizes in mm.

    Oblique affines are shown along their nearest patient axes (as viewers do for slightly tilted acquisitions).
    """
    from nibabel.orientations import apply_orientation

    transform = _display_transform(affine)
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    display_spacing = np.empty(3)
    display_spacing[transform[:, 0].astype(int)] = spacing
    return apply_orientation(array, transform), display_spacing


def max_extent_axial_slice(mask: Volume) -> int:
    """Index, along the mask's own axial voxel axis, of the axial slice with the most tumour voxels.

    The axial axis is the voxel axis nearest to the patient's superior-inferior axis according to the affine (``k``
    for ordinary axial CT). Ties go to the lowest index. An empty mask gives the middle slice.
    """
    axis = axial_axis(mask.affine)
    counts = np.count_nonzero(np.asarray(mask.array), axis=tuple(a for a in range(3) if a != axis))
    if not counts.any():
        return int(mask.shape[axis] // 2)
    return int(np.argmax(counts))


# ----------------------------------------------------------------------------------------------- rendering
def _window(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linear map of ``[low, high]`` to ``[0, 1]``, clipped; NaN becomes 0."""
    scaled = (np.asarray(values, dtype=np.float32) - np.float32(low)) / np.float32(max(high - low, 1e-12))
    return np.nan_to_num(np.clip(scaled, 0.0, 1.0), nan=0.0)


def _hot(t: np.ndarray) -> np.ndarray:
    """The "hot" colour map (black -> red -> yellow -> white) of ``t`` in ``[0, 1]``: ``(..., 3)`` in ``[0, 1]``."""
    return np.stack([np.clip(3 * t, 0, 1), np.clip(3 * t - 1, 0, 1), np.clip(3 * t - 2, 0, 1)], axis=-1)


def _default_pet_window(pet: np.ndarray) -> tuple[float, float]:
    """``(0, 99.9th percentile of the finite positive PET values)``: bright enough for lesions, robust to one hot voxel."""
    values = np.asarray(pet)
    values = values[np.isfinite(values) & (values > 0)]
    if values.size == 0:
        return 0.0, 1.0
    return 0.0, float(np.percentile(values, 99.9))


def _outline(mask_2d: np.ndarray) -> np.ndarray:
    """Pixels of a 2-D mask with at least one 4-neighbour outside it (a one-pixel inner contour)."""
    m = np.pad(mask_2d.astype(bool), 1)
    interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    return mask_2d.astype(bool) & ~interior


def _display_size(n_cols: int, n_rows: int, col_mm: float, row_mm: float, pixel_mm: float | None) -> tuple[int, int]:
    """``(width, height)`` in pixels of an image of square ``pixel_mm`` pixels.

    The default pixel is the finer of the two voxel sizes, made smaller where needed so that the long side has at
    least :data:`MIN_DISPLAY_PIXELS` pixels (a 64-voxel phantom would otherwise give a thumbnail); clinical CT
    (512 voxels across) is shown at its own resolution.
    """
    if pixel_mm is None:
        long_side_mm = max(n_cols * col_mm, n_rows * row_mm)
        size = min(col_mm, row_mm, long_side_mm / MIN_DISPLAY_PIXELS)
    else:
        size = pixel_mm
    if not size > 0:
        raise ValueError(f"pixel_mm must be positive, got {pixel_mm}")
    return max(1, round(n_cols * col_mm / size)), max(1, round(n_rows * row_mm / size))


def _compose(
    rgb: np.ndarray, outlines: Sequence[tuple[np.ndarray, tuple[int, int, int]]], size: tuple[int, int]
) -> np.ndarray:
    """Resize a ``(rows, cols, 3)`` float image in ``[0, 1]`` to ``size`` and draw each ``(mask_2d, colour)``
    outline on it, in order (a later one is drawn over an earlier one).

    Each outline is traced after a nearest-neighbour resize of its mask, so it stays one display pixel thin.
    """
    from PIL import Image

    image = Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    out = np.array(image)
    for mask_2d, colour in outlines:
        mask_img = Image.fromarray(mask_2d.astype(np.uint8) * 255, mode="L")
        if mask_img.size != size:
            mask_img = mask_img.resize(size, Image.Resampling.NEAREST)
        out[_outline(np.asarray(mask_img) > 127)] = colour
    return out


def render_axial_overlay(
    ct: Volume,
    pet: Volume,
    mask: Volume,
    *,
    slice_index: int | None = None,
    ct_window: tuple[float, float] = LUNG_WINDOW,
    pet_window: tuple[float, float] | None = None,
    alpha: float = 0.6,
    pixel_mm: float | None = None,
    reference: Volume | None = None,
) -> tuple[np.ndarray, int]:
    """An axial PET-on-CT fusion image with the tumour contour, as a radiologist reads it.

    Patient right is on the image left and anterior is up, whatever the voxel order of the volumes (taken from the
    affine). The CT is shown in ``ct_window`` (level, width) in grey; the PET is blended on top in the hot colour map
    with opacity ``alpha * (PET scaled to [0, 1] by pet_window)``, so low uptake leaves the CT visible; the mask
    outline is drawn in green.

    Args:
        ct: CT in HU, ``(I, J, K)``.
        pet: PET (SUV or any activity unit) on the CT grid.
        mask: binary tumour mask on the CT grid.
        slice_index: index along the volumes' axial voxel axis (``k`` for axial CT); default
            :func:`max_extent_axial_slice`.
        ct_window: CT (level, width) in HU; default the lung window (-600, 1500).
        pet_window: PET (low, high) mapped to the colour map ends; default ``(0, 99.9th percentile)`` of the PET.
        alpha: maximum PET opacity, in ``[0, 1]``.
        pixel_mm: output pixel size in mm; default the finer in-plane voxel size (no downsampling), or smaller
            so that the long side has at least :data:`MIN_DISPLAY_PIXELS` pixels.
        reference: a second mask on the CT grid (a ground truth), outlined in cyan under the mask's green outline;
            the default slice is then the reference's largest.

    Returns:
        ``(rgb, slice_index)``: a ``(height, width, 3)`` ``uint8`` image, height along anterior->posterior and width
        along patient right->left, and the slice index shown.

    Raises:
        CipaInputError: volumes on different grids, or ``slice_index`` outside the volume.
    """
    _check_same_grid(ct, "CT", pet, "PET")
    _check_same_grid(ct, "CT", mask, "mask")
    if reference is not None:
        _check_same_grid(ct, "CT", reference, "reference mask")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    axis, inferior_to_superior = axial_orientation(ct.affine)
    n_axial = ct.shape[axis]
    if slice_index is None:
        slice_index = max_extent_axial_slice(reference if reference is not None else mask)
    if not 0 <= slice_index < n_axial:
        raise CipaInputError(f"slice_index {slice_index} is outside the {n_axial} axial slices (0..{n_axial - 1})")
    z = slice_index if inferior_to_superior else n_axial - 1 - slice_index

    ct_d, spacing = _to_display(np.asarray(ct.array), ct.affine)
    pet_d, _ = _to_display(np.asarray(pet.array), ct.affine)
    mask_d, _ = _to_display(np.asarray(mask.array), ct.affine)
    # Display arrays are (X=L, Y=P, Z=S); an image is (rows=Y, cols=X), so transpose the (X, Y) plane.
    grey = _window(ct_d[:, :, z].T, ct_window[0] - ct_window[1] / 2, ct_window[0] + ct_window[1] / 2)
    low, high = pet_window if pet_window is not None else _default_pet_window(pet.array)
    heat = _window(pet_d[:, :, z].T, low, high)
    opacity = (alpha * heat)[..., None]
    rgb = grey[..., None] * (1.0 - opacity) + _hot(heat) * opacity
    size = _display_size(rgb.shape[1], rgb.shape[0], spacing[0], spacing[1], pixel_mm)
    outlines = []
    if reference is not None:
        reference_d, _ = _to_display(np.asarray(reference.array), ct.affine)
        outlines.append((reference_d[:, :, z].T != 0, _REFERENCE_COLOUR))
    outlines.append((mask_d[:, :, z].T != 0, _MASK_COLOUR))
    return _compose(rgb, outlines, size), int(slice_index)


def render_coronal_mip(
    pet: Volume,
    mask: Volume,
    *,
    pet_window: tuple[float, float] | None = None,
    pixel_mm: float | None = None,
) -> np.ndarray:
    """A coronal maximum-intensity projection of the PET with the outline of the projected tumour mask.

    The projection runs along the anterior-posterior axis (from the affine). The image is seen from the front:
    patient right on the image left, head up. Uptake is dark on white (inverted grey, the nuclear-medicine
    convention); the outline of the mask's projection is drawn in red.

    Args:
        pet: PET ``(I, J, K)`` (SUV or any activity unit).
        mask: binary tumour mask on the PET's grid.
        pet_window: PET (low, high) mapped to white..black; default ``(0, 99.9th percentile)`` of the PET.
        pixel_mm: output pixel size in mm; default the finer of the left-right and head-foot voxel sizes, or
            smaller so that the long side has at least :data:`MIN_DISPLAY_PIXELS` pixels.

    Returns:
        ``(height, width, 3)`` ``uint8`` image, height along superior->inferior, width along patient right->left.

    Raises:
        CipaInputError: volumes on different grids.
    """
    _check_same_grid(pet, "PET", mask, "mask")
    pet_d, spacing = _to_display(np.asarray(pet.array), pet.affine)
    mask_d, _ = _to_display(np.asarray(mask.array), pet.affine)
    # Project along Y (posterior); the (X, Z) plane becomes (rows = Z from superior down, cols = X).
    # fmax skips NaN (PET outside its field of view) without copying the volume; an all-NaN ray stays NaN -> 0.
    mip = np.fmax.reduce(pet_d, axis=1).T[::-1]
    projected = np.any(mask_d != 0, axis=1).T[::-1]
    low, high = pet_window if pet_window is not None else _default_pet_window(pet.array)
    grey = 1.0 - _window(mip, low, high)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    size = _display_size(rgb.shape[1], rgb.shape[0], spacing[0], spacing[2], pixel_mm)
    return _compose(rgb, [(projected, _MIP_CONTOUR_COLOUR)], size)


# ----------------------------------------------------------------------------------------------- file output
def write_png(rgb: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write a ``(height, width, 3)`` ``uint8`` image as PNG, atomically."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), mode="RGB")
    out = Path(path)
    with atomic_outputs([out]) as (tmp,):
        image.save(tmp, format="PNG")
    return out


def write_overlays(
    out_dir: str | os.PathLike[str],
    ct: Volume,
    pet: Volume,
    mask: Volume,
    *,
    ct_window: tuple[float, float] = LUNG_WINDOW,
    pet_window: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Write :data:`AXIAL_PNG` (max-extent axial fusion) and :data:`CORONAL_MIP_PNG` (PET MIP) into ``out_dir``.

    Returns:
        ``{"axial": Path, "coronal_mip": Path, "axial_slice_index": int}``.
    """
    out = Path(out_dir)
    if pet_window is None:  # one percentile pass over the PET for both figures, so their colours agree
        pet_window = _default_pet_window(pet.array)
    axial, index = render_axial_overlay(ct, pet, mask, ct_window=ct_window, pet_window=pet_window)
    mip = render_coronal_mip(pet, mask, pet_window=pet_window)
    return {
        "axial": write_png(axial, out / AXIAL_PNG),
        "coronal_mip": write_png(mip, out / CORONAL_MIP_PNG),
        "axial_slice_index": index,
    }


# ----------------------------------------------------------------------------------------------- report.json
def _package_version(name: str) -> str | None:
    """Installed distribution version without importing the package (torch's import alone takes seconds)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def software_versions() -> dict[str, str | None]:
    """Versions of this bundle and the libraries whose numerics the results depend on."""
    import cipa_bundle

    return {
        "cipa_bundle": cipa_bundle.__version__,
        "monai": _package_version("monai"),
        "torch": _package_version("torch"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _plain(value: Any) -> Any:
    """Convert provenance objects (dataclasses, numpy scalars, paths, datetimes) into JSON-ready values."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    for method in ("to_dict", "as_dict"):
        if callable(getattr(value, method, None)):
            return _plain(getattr(value, method)())
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return _plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN/Infinity
    if isinstance(value, (_dt.datetime, _dt.date, _dt.time)):
        return value.isoformat()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


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
        "suv_provenance": _plain(suv_provenance),
        "tumor_count": len(lesions),
        "total_volume_ml": float(sum(lesion.volume_ml for lesion in lesions)),
        "total_lesion_glycolysis": None if any(t is None for t in tlgs) else float(sum(tlgs)),  # type: ignore[arg-type]
        "voxel_volume_ml": voxel_volume_ml,
        "lesions": [lesion.to_dict() for lesion in lesions],
    }
    for key, value in (extra or {}).items():
        if key in report:
            raise ValueError(f"extra key {key!r} would overwrite a report field")
        report[key] = _plain(value)
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
