"""Per-lesion statistics of a predicted tumour mask: connected components, volume and PET uptake.

3-D connected components (26-connectivity) of the binary mask, ordered largest first, with their voxel count,
volume in ml (from the affine), SUVmax, SUVmean, total lesion glycolysis (SUVmean x ml), centroid in RAS mm and
bounding box -> :func:`label_lesions`, :func:`lesion_statistics`.

All volumes are :class:`~cipa_bundle.io.volume.Volume` objects on one grid (the CT grid of inference) with arrays
indexed ``[i, j, k]`` and a voxel-to-RAS affine.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from cipa_bundle.components import label_components, label_components_in_box
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.nifti import grid_mismatch
from cipa_bundle.io.volume import Volume

__all__ = ["Lesion", "label_lesions", "lesion_statistics", "voxel_volume_ml"]


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
