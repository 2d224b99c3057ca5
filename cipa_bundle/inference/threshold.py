"""Training-free PET segmentation by an SUV threshold: the baselines a nuclear-medicine reader tries first.

Two rules from the clinical literature, both applied to the PET in SUV on the CT grid:

* **Absolute, SUV >= 2.5.** The classic cut-off between benign and malignant FDG uptake (Paquet et al., J Nucl Med
  2004; widely used for metabolic tumour volume). It also marks every organ with physiological uptake above 2.5
  (brain, heart, kidneys, bladder).
* **Relative, >= 41 % of SUVmax.** EANM procedure guidelines for tumour imaging (Boellaard et al., Eur J Nucl Med
  Mol Imaging 2015) give 41 % of the lesion's SUVmax for metabolic volume. Without a lesion-wise seed the maximum
  is taken over the whole study (``fraction_of_max``), as a researcher applying it to a study would.

Either way only connected components that overlap the body (:class:`~cipa_bundle.inference.postprocess.BodyMask`
of the CT) are kept, through the bundle's own :class:`~cipa_bundle.inference.postprocess.RemoveSmallLesions`, so
that the baselines and the network are post-processed by the same component rule.

Array transforms take a channel-first ``(1, I, J, K)`` (or ``(I, J, K)``) SUV image; the dictionary twin reads the
SUV and the CT body mask from the data dictionary, as in MONAI.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
from monai.config import KeysCollection, NdarrayOrTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type

from cipa_bundle.inference.postprocess import RemoveSmallLesions

__all__ = ["SUV_THRESHOLD_METHODS", "SUVThreshold", "SUVThresholdd"]

#: The two published rules, by name: keyword arguments of :class:`SUVThreshold`.
SUV_THRESHOLD_METHODS: dict[str, dict[str, float]] = {
    "suv_2.5": {"absolute": 2.5},
    "suv_41pct_max": {"fraction_of_max": 0.41},
}

# "Overlaps the body": at least one voxel inside it. RemoveSmallLesions keeps a component when
# inside >= fraction x size, so any fraction below 1 / (largest possible component) means one voxel.
_ANY_OVERLAP = 1e-12


class SUVThreshold(Transform):
    """Binary mask of the voxels at or above an SUV threshold, kept to components that overlap the body.

    Args:
        absolute: the threshold in SUV (g/ml); exactly one of ``absolute`` and ``fraction_of_max``.
        fraction_of_max: the threshold as a fraction of the image's SUVmax, in ``(0, 1]``.

    Call with the SUV ``(1, I, J, K)`` or ``(I, J, K)``, an optional body mask of the same spatial shape, and the
    voxel-to-world ``affine`` when the SUV is not a ``MetaTensor``. Returns a ``uint8`` mask of the input's shape and
    type. :attr:`last_threshold` holds the SUV threshold of the last call.
    """

    def __init__(self, absolute: float | None = None, fraction_of_max: float | None = None) -> None:
        if (absolute is None) == (fraction_of_max is None):
            raise ValueError("SUVThreshold: give exactly one of absolute= and fraction_of_max=")
        if absolute is not None and not absolute > 0:
            raise ValueError(f"SUVThreshold: absolute must be > 0 SUV, got {absolute}")
        if fraction_of_max is not None and not 0 < fraction_of_max <= 1:
            raise ValueError(f"SUVThreshold: fraction_of_max must be in (0, 1], got {fraction_of_max}")
        self.absolute = absolute
        self.fraction_of_max = fraction_of_max
        self.last_threshold: float | None = None
        self._components = RemoveSmallLesions(min_volume_ml=0.0, min_body_fraction=_ANY_OVERLAP)

    def __call__(
        self, img: NdarrayOrTensor, body: NdarrayOrTensor | None = None, affine: NdarrayOrTensor | None = None
    ) -> NdarrayOrTensor:
        suv = np.asarray(img.detach().cpu() if hasattr(img, "detach") else img, dtype=np.float32)
        finite = np.isfinite(suv)
        if self.fraction_of_max is not None:
            peak = float(suv[finite].max()) if finite.any() else 0.0
            threshold = self.fraction_of_max * peak
        else:
            threshold = float(self.absolute)  # type: ignore[arg-type]
        self.last_threshold = threshold
        mask = (finite & (suv >= threshold) & (suv > 0)).astype(np.uint8)
        if affine is None and not hasattr(img, "affine"):
            raise ValueError("SUVThreshold needs the voxel size: pass affine= or a MetaTensor SUV")
        kept = self._components(mask, body, affine if affine is not None else img.affine)  # type: ignore[union-attr]
        return convert_to_dst_type(np.asarray(kept, dtype=np.uint8), img, dtype=np.uint8)[0]


class SUVThresholdd(MapTransform):
    """Dictionary twin of :class:`SUVThreshold`: thresholds ``keys`` (the SUV) and stores the mask under ``name``.

    Args:
        keys: the SUV key (one key).
        name: key to store the mask under.
        body_key: key of the body mask (``(1, I, J, K)``); ``None`` keeps every component.
        absolute, fraction_of_max: as :class:`SUVThreshold`.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, name: str = "pred", body_key: str | None = "body",
                 absolute: float | None = None, fraction_of_max: float | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 1:
            raise ValueError(f"SUVThresholdd reads one SUV key, got {self.keys}")
        self.name = name
        self.body_key = body_key
        self.threshold = SUVThreshold(absolute, fraction_of_max)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.name] = self.threshold(d[key], d.get(self.body_key) if self.body_key else None)
        return d
