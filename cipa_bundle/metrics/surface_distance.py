"""Surface distances: the 95th-percentile Hausdorff distance (HD95), exactly as the CIPA paper computes it.

**HD95 definition** (medpy's ``hd95``, which the paper calls on 2-D arrays): the surface of a mask is
``mask XOR binary_erosion(mask)`` with the connectivity-1 structuring element (4-neighbourhood in 2-D,
6-neighbourhood in 3-D) and voxels outside the array counting as background, so a mask touching the array edge has
a surface there. With ``d(a, B)`` the Euclidean distance (in the given spacing) from a surface voxel ``a`` to the
nearest surface voxel of ``B``, HD95 is the 95th percentile (numpy's default linear interpolation) of the pooled
set ``{d(a, B) : a in surface(A)} ∪ {d(b, A) : b in surface(B)}``. This is *not* MONAI's
``compute_hausdorff_distance(percentile=95)``, which takes the larger of the two directed percentiles; the two
differ on asymmetric shapes, which is why this module computes it itself (exact Euclidean distance transform,
Felzenszwalb & Huttenlocher, as a small numba kernel: scipy is not a dependency).

**Paper HD95** (CIPA, CVPR 2025, arXiv 2503.17261; the official ``pred.py``): computed per 2-D slice in pixels
(spacing 1) and then averaged over slices, with the paper's empty-mask rules (see :func:`hd95_slice`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numba
import numpy as np

from cipa_bundle.metrics.foreground import foreground

__all__ = ["hd95", "hd95_slice", "mean_slice_hd95", "slice_hd95_values"]


# scipy is not a dependency of this package (and ITK's Python wrappers take many seconds to load), so the exact
# Euclidean distance transform below is a small numba kernel.
@numba.njit(cache=True, nogil=True)
def _squared_edt_lines(f: np.ndarray, step: float) -> np.ndarray:
    """1-D squared distance transform of each row of ``f`` (Felzenszwalb & Huttenlocher 2012, lower envelope).

    Args:
        f: ``(n_lines, L)`` float64: 0 at sites, ``inf`` elsewhere, or squared distances from earlier axes.
        step: sample spacing along the rows.

    Returns:
        ``(n_lines, L)``: ``min_q step^2 (p - q)^2 + f[q]`` for every ``p`` (``inf`` on rows without a finite value).
    """
    n_lines, length = f.shape
    out = np.empty_like(f)
    v = np.empty(length, dtype=np.int64)
    z = np.empty(length + 1, dtype=np.float64)
    w2 = step * step
    for line in range(n_lines):
        k = -1
        for q in range(length):
            fq = f[line, q]
            if fq == np.inf:
                continue
            if k < 0:
                k = 0
                v[0] = q
                z[0] = -np.inf
                z[1] = np.inf
                continue
            while True:
                p = v[k]
                s = ((fq + w2 * q * q) - (f[line, p] + w2 * p * p)) / (2.0 * w2 * (q - p))
                if s <= z[k]:
                    k -= 1  # z[0] is -inf, so this never pops the first parabola
                else:
                    break
            k += 1
            v[k] = q
            z[k] = s
            z[k + 1] = np.inf
        if k < 0:
            out[line, :] = np.inf
            continue
        j = 0
        for q in range(length):
            while z[j + 1] < q:
                j += 1
            p = v[j]
            out[line, q] = w2 * (q - p) * (q - p) + f[line, p]
    return out


def _distance_to(sites: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """Euclidean distance from every voxel to the nearest ``True`` voxel of ``sites`` (exact, any dimension)."""
    d = np.where(sites, 0.0, np.inf)
    for axis in range(sites.ndim):
        moved = np.moveaxis(d, axis, -1)
        lines = np.ascontiguousarray(moved).reshape(-1, moved.shape[-1])
        d = np.moveaxis(_squared_edt_lines(lines, float(spacing[axis])).reshape(moved.shape), -1, axis)
    return np.sqrt(d)


def _surface(mask: np.ndarray) -> np.ndarray:
    """``mask XOR erosion(mask)`` with the connectivity-1 element; outside the array is background."""
    padded = np.pad(mask, 1, constant_values=False)
    eroded = mask.copy()
    core = tuple(slice(1, -1) for _ in range(mask.ndim))
    for axis in range(mask.ndim):
        for shift in (-1, 1):
            eroded &= np.roll(padded, shift, axis=axis)[core]
    return mask & ~eroded


def hd95(pred: Any, gt: Any, spacing: Sequence[float] | None = None) -> float:
    """Symmetric 95th-percentile Hausdorff distance between two non-empty masks (medpy ``hd95`` semantics).

    Args:
        pred, gt: same-shape masks of any dimension (binarised as ``>= 0.5``).
        spacing: voxel size per axis (e.g. mm); ``None`` means 1 per axis, giving the result in voxels.

    Returns:
        HD95 in the units of ``spacing``. See the module docstring for the exact definition.

    Raises:
        ValueError: when either mask is empty (the distance is undefined; callers apply their own rule).
    """
    p, g = foreground(pred), foreground(gt)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    if not p.any() or not g.any():
        raise ValueError("hd95 is undefined when a mask is empty")
    spacing_arr = np.ones(p.ndim) if spacing is None else np.asarray(spacing, dtype=np.float64)
    if spacing_arr.shape != (p.ndim,):
        raise ValueError(f"spacing needs {p.ndim} values, got {spacing}")
    # Every surface voxel lies inside the bounding box of both masks; one voxel of margin keeps the erosion exact
    # (the margin is background, just as the array outside is), so the distance maps only cover that box.
    where = np.nonzero(p | g)
    box = tuple(
        slice(max(int(ix.min()) - 1, 0), min(int(ix.max()) + 2, n)) for ix, n in zip(where, p.shape, strict=True)
    )
    sp, sg = _surface(p[box]), _surface(g[box])
    to_g = _distance_to(sg, spacing_arr)[sp]
    to_p = _distance_to(sp, spacing_arr)[sg]
    return float(np.percentile(np.concatenate([to_g, to_p]), 95))


def hd95_slice(pred: Any, gt: Any) -> float:
    """The paper's per-slice HD95 in pixels, with its empty-mask rules.

    Args:
        pred, gt: ``(H, W)`` masks.

    Rules (official ``pred.py``): both empty -> 0. Prediction empty, ground truth not -> one foreground pixel is set
    at the image centre ``(H // 2, W // 2)`` of the prediction (``(256, 256)`` for 512 x 512) and HD95 is computed.
    Ground truth empty, prediction not (the official script crashes on this case; PCLT20K's test slices all contain
    tumour) -> the same centre pixel is set in the ground truth instead, the symmetric extension of the rule.
    """
    p, g = foreground(pred).copy(), foreground(gt).copy()
    if p.ndim != 2:
        raise ValueError(f"hd95_slice takes (H, W) masks, got shape {p.shape}")
    has_p, has_g = bool(p.any()), bool(g.any())
    if not has_p and not has_g:
        return 0.0
    centre = (p.shape[0] // 2, p.shape[1] // 2)
    if not has_p:
        p[centre] = True
    elif not has_g:
        g[centre] = True
    return hd95(p, g)


def mean_slice_hd95(pred: np.ndarray, gt: np.ndarray, axis: int = 2, tumour_slices_only: bool = False) -> float:
    """Mean of :func:`hd95_slice` over the 2-D slices of two volumes along ``axis`` (pixels).

    Args:
        pred, gt: same-shape 3-D masks.
        axis: the slicing axis (2 = the ``k`` axis of an ``(I, J, K)`` volume).
        tumour_slices_only: average only over slices whose ground truth has foreground (PCLT20K's test set holds
            only such slices); otherwise every slice counts, both-empty ones as 0.

    Returns:
        The mean, or ``nan`` when no slice qualifies.
    """
    values = slice_hd95_values(foreground(pred), foreground(gt), axis)
    g = np.moveaxis(foreground(gt), axis, 0).reshape(values.size, -1).any(axis=1)
    chosen = values[g] if tumour_slices_only else values
    return float(chosen.mean()) if chosen.size else math.nan


def slice_hd95_values(p: np.ndarray, g: np.ndarray, axis: int) -> np.ndarray:
    """Per-slice paper HD95 (pixels) of two same-shape bool masks along ``axis``: ``(shape[axis],)`` float64.

    Both-empty slices are 0 and skip the distance computation.
    """
    p, g = np.moveaxis(p, axis, 0), np.moveaxis(g, axis, 0)
    out = np.zeros(p.shape[0])
    for k in np.nonzero(p.reshape(p.shape[0], -1).any(1) | g.reshape(g.shape[0], -1).any(1))[0]:
        out[k] = hd95_slice(p[k], g[k])
    return out

