"""Run the network only on the axial slices that can hold a lung tumour.

A whole-body FDG PET-CT (skull to mid-thigh, 300-600 slices) shows lung on a third of its slices or less; on a CPU
every 512 x 512 slice costs seconds, so skipping the others makes a clinical study practical. The rule is
anatomical and errs towards running more:

* **Lung** is air-density tissue inside the body: on each axial slice, the holes of the body mask (CT above
  ``body_threshold``, -700 HU by default), i.e. the low-density regions the body surrounds (the body mask's own
  2-D hole filling, :func:`cipa_bundle.inference.postprocess.fill_holes_2d`). Of those, only 3-D connected
  components of at least ``min_lung_ml`` count: the lungs (litres) and the airways joined to them, not a bowel gas
  pocket or a gap between patient and couch.
* The range is the first to the last slice with lung, widened by ``margin_mm`` (default 20 mm) each way: a tumour at
  the apex, at the base below the lowest aerated slice (posterior costophrenic recess, next to the liver dome), in
  the mediastinum or the hilum lies within it.
* If no lung is found (a study of the abdomen only, or a CT whose window hides the lungs), every body slice is run:
  nothing is skipped on a guess.

Every slice outside the range gets the background logit (an empty mask there), exactly as the body range of
:class:`~cipa_bundle.inference.body_range.BodySliceInferer` does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from monai.data.utils import affine_to_spacing

from cipa_bundle.components import label_components
from cipa_bundle.inference.postprocess import DEFAULT_BODY_THRESHOLD, fill_holes_2d
from cipa_bundle.inference.body_range import BodySliceInferer

__all__ = ["DEFAULT_LUNG_MARGIN_MM", "DEFAULT_MIN_LUNG_ML", "LungSliceInferer", "lung_slices"]

#: Slices added above and below the lungs, in mm (the issue's floor: at least 2 cm each way).
DEFAULT_LUNG_MARGIN_MM: float = 20.0
#: Smallest air-density component inside the body that counts as lung, ml. An adult lung holds litres and even the
#: apex is joined to it in 3-D; bowel gas pockets are typically tens of ml.
DEFAULT_MIN_LUNG_ML: float = 100.0


def lung_slices(
    ct: np.ndarray, spacing: Sequence[float], axis: int = 2, threshold: float = DEFAULT_BODY_THRESHOLD,
    min_lung_ml: float = DEFAULT_MIN_LUNG_ML,
) -> np.ndarray:
    """Indices along ``axis`` of the slices that show lung.

    Args:
        ct: ``(I, J, K)`` CT in any units in which ``threshold`` separates tissue from air.
        spacing: voxel size in mm along the three axes.
        axis: the axial axis.
        threshold: tissue above it is body; air-density regions the body encloses on a slice are lung candidates.
        min_lung_ml: smallest 3-D component of candidates that counts.

    Returns:
        Sorted ``int64`` slice indices (empty when no lung is found).
    """
    body = np.asarray(ct) > threshold
    candidates = fill_holes_2d(body, axis=axis) & ~body
    labels, count = label_components(candidates, connectivity=26)
    if count == 0:
        return np.zeros(0, dtype=np.int64)
    voxel_ml = float(np.prod(np.asarray(spacing, dtype=np.float64))) / 1000.0
    volumes = np.bincount(labels.ravel(), minlength=count + 1)[1:] * voxel_ml
    lung = np.isin(labels, np.flatnonzero(volumes >= min_lung_ml) + 1)
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(lung.any(axis=other)).astype(np.int64)


class LungSliceInferer(BodySliceInferer):
    """``SliceInferer`` that runs the network only on the slices of the lungs plus a margin (see the module doc).

    Args:
        roi_size: the network's ``(H, W)`` input size.
        lung_only: ``False`` runs every body slice (``--all_slices``).
        margin_mm: added above and below the lungs, in mm (at least one slice).
        min_lung_ml: smallest air-density component inside the body that counts as lung.
        kwargs: :class:`~cipa_bundle.inference.body_range.BodySliceInferer`'s other arguments (``sw_batch_size``,
            ``body_threshold``, ``margin``: slices around the body range, which runs when no lung is found or
            ``lung_only`` is off...).

    After each call :attr:`last_stats` holds ``{"slices", "slices_run", "network_s", "selection"}``, where
    ``selection`` is ``"lung"`` (with ``"lung_slices"``: the first and last slice with lung), ``"body"`` or ``"all"``.
    """

    def __init__(
        self,
        roi_size: Sequence[int] | int,
        lung_only: bool = True,
        margin_mm: float = DEFAULT_LUNG_MARGIN_MM,
        min_lung_ml: float = DEFAULT_MIN_LUNG_ML,
        **kwargs: Any,
    ) -> None:
        super().__init__(roi_size, **kwargs)
        if margin_mm < 0 or min_lung_ml <= 0:
            raise ValueError(f"LungSliceInferer: margin_mm must be >= 0 and min_lung_ml > 0, got {margin_mm}, "
                             f"{min_lung_ml}")
        self.lung_only = bool(lung_only)
        self.margin_mm = float(margin_mm)
        self.min_lung_ml = float(min_lung_ml)

    @staticmethod
    def _spacing(inputs: torch.Tensor) -> np.ndarray:
        """Voxel size (mm) of the three spatial axes, from a ``MetaTensor``'s affine (1 mm where there is none)."""
        affine = getattr(inputs, "affine", None)
        if affine is None:
            return np.ones(3)
        matrix = torch.as_tensor(affine).detach().cpu().to(torch.float64)
        matrix = matrix[0] if matrix.ndim == 3 else matrix  # a batch's affines: one study per batch in inference
        return np.asarray(affine_to_spacing(matrix, r=3))

    def slice_range(self, inputs: torch.Tensor) -> tuple[int, int]:
        first, stop = super().slice_range(inputs)
        if not self.lung_only:
            return first, stop
        axis = self.spatial_dim
        spacing = self._spacing(inputs)
        ct = inputs[:, self.body_channel].detach().cpu().numpy()
        hits = np.unique(np.concatenate([
            lung_slices(volume, spacing, axis, self.network_threshold, self.min_lung_ml) for volume in ct
        ]))
        if hits.size == 0:
            return first, stop  # the body range, as the parent chose it
        n = int(inputs.shape[axis + 2])
        widen = max(1, math.ceil(self.margin_mm / float(spacing[axis]) - 1e-9))
        self.selection = {"selection": "lung", "lung_slices": [int(hits[0]), int(hits[-1])]}
        return max(int(hits[0]) - widen, 0), min(int(hits[-1]) + 1 + widen, n)
