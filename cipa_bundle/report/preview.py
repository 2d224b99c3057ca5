"""Preview figures of a predicted tumour mask: two PNGs a reader checks the result by (Pillow only, no matplotlib).

* the axial slice of maximum tumour extent: CT in a lung window, PET blended in a "hot" colour map, the mask
  contour in green -> :func:`render_axial_overlay`;
* a coronal maximum-intensity projection of the PET (inverted grey, as nuclear-medicine readers view it) with
  the outline of the projected mask in red -> :func:`render_coronal_mip`;

each written atomically as PNG by :func:`write_png` / :func:`write_overlays`.

Orientation is derived from the affine, never assumed: images are shown in the radiological convention, patient
right on the image left, anterior up on the axial view and head up on the coronal view. Pixels are resampled
to square physical size so anisotropic voxels do not distort anatomy.

All volumes are :class:`~cipa_bundle.io.volume.Volume` objects on one grid (the CT grid of inference) with arrays
indexed ``[i, j, k]`` and a voxel-to-RAS affine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform
from PIL import Image

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.atomic import atomic_outputs
from cipa_bundle.io.volume import Volume, axial_axis, axial_orientation
from cipa_bundle.report.statistics import _check_same_grid

__all__ = [
    "max_extent_axial_slice",
    "render_axial_overlay",
    "render_coronal_mip",
    "write_png",
    "write_overlays",
    "AXIAL_PNG",
    "CORONAL_MIP_PNG",
    "MIN_DISPLAY_PIXELS",
]

AXIAL_PNG = "overlay_axial.png"
CORONAL_MIP_PNG = "mip_coronal.png"

#: Smallest long side, in pixels, of a figure rendered at the default pixel size.
MIN_DISPLAY_PIXELS = 512

#: CT lung window as (level, width) in HU: the window chest radiologists read lung nodules in.
LUNG_WINDOW = (-600.0, 1500.0)

_MASK_COLOUR = (0, 255, 0)  # green stands out on both grey CT and the red/yellow of the hot map
_REFERENCE_COLOUR = (0, 200, 255)  # cyan: a ground truth beside the green prediction
_MIP_CONTOUR_COLOUR = (255, 0, 0)


# ----------------------------------------------------------------------------------------------- orientation
# Display axes: x toward the patient's Left (image columns, so patient right is on the image left), y toward
# Posterior (axial rows, anterior up) and z toward Superior. In nibabel's axis codes that is ("L", "P", "S").
_DISPLAY_AXCODES = ("L", "P", "S")


def _display_transform(affine: np.ndarray) -> np.ndarray:
    """nibabel orientation transform (per voxel axis: target axis, flip) from the voxel axes to (L, P, S)."""
    return ornt_transform(io_orientation(affine), axcodes2ornt(_DISPLAY_AXCODES))


def _to_display(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorient ``(I, J, K)`` to ``(X=L, Y=P, Z=S)`` (a view, no copy) and return it with its voxel sizes in mm.

    Oblique affines are shown along their nearest patient axes (as viewers do for slightly tilted acquisitions).
    """
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
