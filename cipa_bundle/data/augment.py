"""The paper's training augmentation steps that MONAI has no exact equivalent for."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform, Resize, SpatialCrop
from monai.utils import ensure_tuple_rep

__all__ = ["RandSquareCropResize", "RandSquareCropResized"]


class RandSquareCropResize(RandomizableTransform):
    """With probability ``prob``, crop a random square of side ``int(min(H, W) * U(*scale_range))`` at a random
    position and resize it back to ``(H, W)``.

    This is step (c) of CIPA's augmentation (side ``int(512 * U(0.7, 0.9))``, bicubic). MONAI's ``RandZoom`` crops
    at the centre and ``RandScaleCrop`` draws each side independently, so neither reproduces it.

    Args:
        prob: probability of applying the crop.
        scale_range: range of the square side as a fraction of the shorter image side.
        mode: interpolation for the resize (``"bicubic"`` for images; labels use ``"bilinear"`` then a 0.5 threshold
            in the paper).

    Shapes:
        ``(C, H, W)`` -> ``(C, H, W)``.
    """

    def __init__(self, prob: float = 0.5, scale_range: Sequence[float] = (0.7, 0.9), mode: str = "bicubic") -> None:
        RandomizableTransform.__init__(self, prob)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.mode = mode
        self._box: tuple[int, int, int] | None = None

    def randomize(self, spatial_shape: Sequence[int]) -> None:  # type: ignore[override]
        super().randomize(None)
        if not self._do_transform:
            return
        height, width = int(spatial_shape[0]), int(spatial_shape[1])
        side = max(1, int(min(height, width) * self.R.uniform(*self.scale_range)))
        self._box = (side, int(self.R.randint(0, height - side + 1)), int(self.R.randint(0, width - side + 1)))

    def __call__(self, img: torch.Tensor, randomize: bool = True, mode: str | None = None) -> torch.Tensor:  # type: ignore[override]
        if randomize:
            self.randomize(img.shape[1:])
        if not self._do_transform or self._box is None:
            return img
        side, top, left = self._box
        cropped = SpatialCrop(roi_start=(top, left), roi_end=(top + side, left + side))(img)
        return Resize(spatial_size=tuple(img.shape[1:]), mode=mode or self.mode, anti_aliasing=False)(cropped)


class RandSquareCropResized(RandomizableTransform, MapTransform):
    """Dictionary twin of :class:`RandSquareCropResize`: the same crop for every key, one mode per key."""

    def __init__(
        self,
        keys: KeysCollection,
        prob: float = 0.5,
        scale_range: Sequence[float] = (0.7, 0.9),
        mode: str | Sequence[str] = "bicubic",
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.cropper = RandSquareCropResize(prob=1.0, scale_range=scale_range)
        self.mode = ensure_tuple_rep(mode, len(self.keys))

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> "RandSquareCropResized":
        super().set_random_state(seed, state)
        self.cropper.set_random_state(seed, state)
        return self

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize(None)
        first = self.first_key(d)
        if not self._do_transform or first == ():
            return d
        self.cropper.randomize(d[first].shape[1:])
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.cropper(d[key], randomize=False, mode=mode)
        return d
