"""Post-processing of a thresholded tumour mask: drop components that are too small or lie outside the body.

The network sees one axial slice at a time and knows nothing of 3-D size or anatomy, so two kinds of error survive
thresholding and are removed here, after the prediction is back on the CT grid:

* **Specks.** 3-D connected components (26-connectivity, the same labelling as the lesion report,
  :func:`cipa_bundle.report.label_lesions`) smaller than ``min_volume_ml``. The default, 0.1 ml, is a sphere of
  5.8 mm diameter: below the spatial resolution of clinical PET (about 6 mm FWHM), so a true lesion that small
  would not show the uptake the network relies on.
* **Findings outside the patient.** Components with less than ``min_body_fraction`` (default one half) of their
  voxels inside the body mask.

The **body mask** (:class:`BodyMask`) is the CT channel above a threshold, with the holes of every axial slice
filled, so the lungs (about -850 HU, below any sensible body threshold) count as body. The fill is 2-D per axial
slice on purpose: in 3-D the airways connect the lungs to the air outside the patient, and a 3-D fill would leave
the lungs out. The scanner couch is above the threshold and counts as body; nothing of interest is lost by that.

Units: thresholds apply to whatever the image holds. In the bundle the body mask is taken from ``convert``'s
windowed CT channel in [0, 1] *before* the network normalisation, where the default 0.5 is -700 HU with the default
window [-1200, -200] HU (air -1000 HU is 0.2, fat -100 HU and soft tissue are 1).

Array transforms work on channel-first ``(C, I, J, K)`` images (``(I, J, K)`` also accepted); each has a dictionary
twin, as in MONAI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numba
import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type

from cipa_bundle.io.volume import axial_axis
from cipa_bundle.report.statistics import label_lesions, voxel_volume_ml

__all__ = [
    "DEFAULT_BODY_THRESHOLD",
    "DEFAULT_MIN_BODY_FRACTION",
    "DEFAULT_MIN_LESION_ML",
    "BodyMask",
    "BodyMaskd",
    "RemoveSmallLesions",
    "RemoveSmallLesionsd",
    "fill_holes_2d",
]

#: Body threshold in windowed-CT units ([0, 1]); -700 HU with the default window [-1200, -200] HU.
DEFAULT_BODY_THRESHOLD: float = 0.5
#: Smallest kept component, ml (a 5.8 mm sphere; below PET resolution).
DEFAULT_MIN_LESION_ML: float = 0.1
#: Share of a component's voxels that must lie inside the body for it to be kept.
DEFAULT_MIN_BODY_FRACTION: float = 0.5


# ----------------------------------------------------------------------------------------------- hole filling
@numba.njit(cache=True, nogil=True)
def _fill_holes_stack(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of each ``(H, W)`` plane of a C-contiguous ``(N, H, W)`` ``uint8`` stack (4-connected fill)."""
    n, h, w = mask.shape
    out = np.ones((n, h, w), dtype=np.uint8)
    stack = np.empty(h * w, dtype=np.int64)
    for s in range(n):
        # Background reachable from the border is outside; everything else (foreground and enclosed holes) stays 1.
        top = 0
        for r in range(h):
            for c in range(w):
                if (r == 0 or c == 0 or r == h - 1 or c == w - 1) and mask[s, r, c] == 0 and out[s, r, c] == 1:
                    out[s, r, c] = 0
                    stack[top] = r * w + c
                    top += 1
        while top > 0:
            top -= 1
            r = stack[top] // w
            c = stack[top] % w
            for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
                rr = r + dr
                cc = c + dc
                if 0 <= rr < h and 0 <= cc < w and mask[s, rr, cc] == 0 and out[s, rr, cc] == 1:
                    out[s, rr, cc] = 0
                    stack[top] = rr * w + cc
                    top += 1
    return out


def fill_holes_2d(mask: np.ndarray, axis: int = -1) -> np.ndarray:
    """Fill the holes of every 2-D plane of a 3-D binary mask, planes taken perpendicular to ``axis``.

    A hole is background that cannot reach the plane's border through 4-connected background pixels.

    Args:
        mask: ``(I, J, K)`` binary array (non-zero is foreground).
        axis: the axis the planes are stacked along (the axial axis for a body mask).

    Returns:
        ``(I, J, K)`` ``bool`` array.
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"fill_holes_2d expects a 3-D mask, got shape {mask.shape}")
    stacked = np.ascontiguousarray(np.moveaxis(mask.astype(bool, copy=False), axis, 0), dtype=np.uint8)
    return np.moveaxis(_fill_holes_stack(stacked).astype(bool), 0, axis)


def _axial_axis_of(img: Any) -> int:
    """The spatial axis (0, 1 or 2) of a channel-first image that runs head-foot (last axis when no affine)."""
    if isinstance(img, MetaTensor):
        return axial_axis(np.asarray(img.affine, dtype=np.float64))
    return 2


# ----------------------------------------------------------------------------------------------- body mask
class BodyMask(Transform):
    """The patient's body: one channel above ``threshold``, holes filled slice by slice in the axial plane.

    Args:
        threshold: value above which a voxel is tissue, in the image's units (default 0.5 = -700 HU in the
            windowed CT of ``convert``).
        channel: the channel holding the CT.

    Call with a channel-first ``(C, I, J, K)`` image (a ``MetaTensor`` supplies the affine that says which axis is
    axial; a plain array is taken to be axial along its last axis). Returns a ``(1, I, J, K)`` ``bool`` tensor, a
    ``MetaTensor`` with the input's metadata when the input is one.
    """

    def __init__(self, threshold: float = DEFAULT_BODY_THRESHOLD, channel: int = 0) -> None:
        self.threshold = float(threshold)
        self.channel = int(channel)

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        if img.ndim != 4:
            raise ValueError(f"BodyMask expects a channel-first (C, I, J, K) image, got shape {tuple(img.shape)}")
        if not 0 <= self.channel < img.shape[0]:
            raise ValueError(f"BodyMask: channel {self.channel} requested, the image has {img.shape[0]} channels")
        ct = img[self.channel]
        ct_np = ct.detach().cpu().numpy() if isinstance(ct, torch.Tensor) else np.asarray(ct)
        body = fill_holes_2d(ct_np > self.threshold, axis=_axial_axis_of(img))[None]
        out = torch.as_tensor(body)
        if isinstance(img, MetaTensor):
            meta = {k: v for k, v in img.meta.items() if k != "affine"}  # the affine travels separately
            return MetaTensor(out, affine=img.affine.clone(), meta=meta)
        return out


class BodyMaskd(MapTransform):
    """Dictionary twin of :class:`BodyMask`: reads ``keys`` and stores each body mask under ``name``.

    Args:
        keys: the image key (one key; the CT channel is taken from it).
        name: key to store the ``(1, I, J, K)`` body mask under.
        threshold, channel: as :class:`BodyMask`.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, name: str = "body", threshold: float = DEFAULT_BODY_THRESHOLD,
                 channel: int = 0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"BodyMaskd reads one image key, got {self.keys}")
        self.name = name
        self.body = BodyMask(threshold, channel)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.name] = self.body(d[key])
        return d


# ----------------------------------------------------------------------------------------------- components
class RemoveSmallLesions(Transform):
    """Remove connected components smaller than ``min_volume_ml`` or lying mostly outside the body.

    Components are 3-D and 26-connected (:func:`cipa_bundle.report.label_lesions`, so what survives here is what the
    report counts). A component is kept when ``voxels x voxel volume >= min_volume_ml`` and, when a body mask is
    given, ``voxels inside the body / voxels >= min_body_fraction``.

    Args:
        min_volume_ml: smallest kept component in ml (0 keeps every size).
        min_body_fraction: share of a component that must lie inside the body (0 disables the test).

    Call with a binary channel-first ``(C, I, J, K)`` (or ``(I, J, K)``) mask, an optional body mask of the same
    spatial shape (``(1, I, J, K)`` or ``(I, J, K)``), and the voxel-to-world ``affine`` (taken from the mask when it
    is a ``MetaTensor``; the voxel volume in ml is ``|det(affine[:3, :3])| / 1000``). Each channel is filtered on its
    own. The result has the input's type, dtype and metadata; the counts of removed components are recorded in
    :attr:`last_removed`.
    """

    def __init__(self, min_volume_ml: float = DEFAULT_MIN_LESION_ML,
                 min_body_fraction: float = DEFAULT_MIN_BODY_FRACTION) -> None:
        if min_volume_ml < 0:
            raise ValueError(f"RemoveSmallLesions: min_volume_ml must be >= 0, got {min_volume_ml}")
        if not 0.0 <= min_body_fraction <= 1.0:
            raise ValueError(f"RemoveSmallLesions: min_body_fraction must be in [0, 1], got {min_body_fraction}")
        self.min_volume_ml = float(min_volume_ml)
        self.min_body_fraction = float(min_body_fraction)
        #: ``{"too_small": n, "outside_body": n, "kept": n}`` of the last call, summed over channels.
        self.last_removed: dict[str, int] = {"too_small": 0, "outside_body": 0, "kept": 0}

    def __call__(self, img: NdarrayOrTensor, body: NdarrayOrTensor | None = None,
                 affine: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        if affine is None:
            if not isinstance(img, MetaTensor):
                raise ValueError("RemoveSmallLesions needs the voxel size: pass affine= or a MetaTensor mask")
            affine = img.affine
        affine_np = np.asarray(affine.detach().cpu() if isinstance(affine, torch.Tensor) else affine, dtype=np.float64)
        ml_per_voxel = voxel_volume_ml(affine_np[:4, :4])

        array = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        channels = array[None] if array.ndim == 3 else array
        if channels.ndim != 4:
            raise ValueError(f"RemoveSmallLesions expects (C, I, J, K) or (I, J, K), got shape {array.shape}")
        body_np = None
        if body is not None:
            body_np = body.detach().cpu().numpy() if isinstance(body, torch.Tensor) else np.asarray(body)
            body_np = body_np.reshape(body_np.shape[-3:]).astype(bool) if body_np.ndim == 4 else body_np.astype(bool)
            if body_np.shape != channels.shape[1:]:
                raise ValueError(f"body mask has spatial shape {body_np.shape}, the mask {channels.shape[1:]}")

        counts_removed = {"too_small": 0, "outside_body": 0, "kept": 0}
        out = np.zeros_like(channels)
        for c in range(channels.shape[0]):
            labels, n = label_lesions(channels[c] != 0)
            if n == 0:
                continue
            sizes = np.bincount(labels.ravel(), minlength=n + 1)
            keep = sizes * ml_per_voxel >= self.min_volume_ml
            counts_removed["too_small"] += int(n - keep[1:].sum())
            if body_np is not None and self.min_body_fraction > 0:
                inside = np.bincount(labels[body_np], minlength=n + 1)
                in_body = inside >= self.min_body_fraction * sizes
                counts_removed["outside_body"] += int((keep[1:] & ~in_body[1:]).sum())
                keep &= in_body
            keep[0] = False
            counts_removed["kept"] += int(keep.sum())
            out[c] = np.where(keep[labels], channels[c], 0)
        self.last_removed = counts_removed
        result = out[0] if array.ndim == 3 else out
        return convert_to_dst_type(result, img)[0]


class RemoveSmallLesionsd(MapTransform):
    """Dictionary twin of :class:`RemoveSmallLesions`.

    Args:
        keys: keys of the binary masks (e.g. ``"pred"`` after thresholding).
        body_key: key of the body mask on the same grid (see :class:`BodyMaskd`), or ``None`` for size only.
        min_volume_ml, min_body_fraction: as :class:`RemoveSmallLesions`.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, body_key: str | None = "body",
                 min_volume_ml: float = DEFAULT_MIN_LESION_ML,
                 min_body_fraction: float = DEFAULT_MIN_BODY_FRACTION, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.body_key = body_key
        self.remover = RemoveSmallLesions(min_volume_ml, min_body_fraction)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        body = d[self.body_key] if self.body_key is not None else None
        for key in self.key_iterator(d):
            d[key] = self.remover(d[key], body)
        return d
