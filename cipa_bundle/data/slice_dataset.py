"""A ``CacheDataset`` that accepts whole 3-D volume items as well as per-slice items.

``configs/train.json`` trains the 2-D CIPA network on per-slice items ``{"image": fused.nii.gz, "label":
label.nii.gz, "slice": k}`` (``cipa-bundle datalist ... --slices`` writes them). MONAI Label's ``BundleTrainTask``
overrides ``train#dataset#data`` and ``validate#dataset#data`` with whole-study items ``{"image": ..., "label":
...}`` and no ``slice`` key, because its datastore knows only image/label pairs. :class:`AxialSliceCacheDataset`
takes both: an item that already has ``"slice"`` is used as it is, and an item without it whose label is a NIfTI
volume is expanded into per-slice items by the same sampler the datalist command uses
(:func:`cipa_bundle.data.slices.sample_axial_slices`: every tumour slice plus a seeded share of the tumour-free
ones), so a study trains identically whichever way it arrives. Items whose label is not a NIfTI file (PCLT20K PNG
pairs, already 2-D) are used as they are.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from monai.data import CacheDataset

from cipa_bundle.data.slices import sample_axial_slices
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.nifti import is_nifti_path

__all__ = ["SLICE_KEY", "AxialSliceCacheDataset", "expand_volume_items"]

#: The item key holding the axial slice index (what :func:`sample_axial_slices` writes and ``ExtractAxialSliced``
#: reads by default).
SLICE_KEY = "slice"

def _is_volume(path: Any) -> bool:
    """A NIfTI label marks a 3-D volume item; anything else (e.g. a PCLT20K ``_mask.png``) is already 2-D."""
    return is_nifti_path(str(path))


def expand_volume_items(
    data: Sequence[Mapping[str, Any]],
    tumour_free_fraction: float = 0.1,
    seed: int = 0,
    label_key: str = "label",
    base_dir: str | os.PathLike[str] | None = None,
    source: str = "dataset",
) -> list[dict[str, Any]]:
    """Per-slice items for a list that may mix 3-D volume items and per-slice items.

    Args:
        data: datalist items. Items with a ``"slice"`` key, and 2-D items whose ``label_key`` is not a NIfTI file
            (PCLT20K PNG pairs), are kept as they are. Items without ``"slice"`` whose ``label_key`` is a NIfTI
            volume (fused ``image`` or separate ``ct``/``pet`` items alike; the label decides which slices hold
            tumour) are replaced, in place in the order, by ``{**item, "slice": k}`` for the sampled axial indices.
        tumour_free_fraction: share of each volume's tumour-free slices to keep (see ``sample_axial_slices``).
        seed: seeds the tumour-free choice; per case it depends only on ``seed`` and the label path, so the same
            study always gives the same slices.
        label_key: key of the label path in volume items.
        base_dir: folder that relative label paths are relative to; ``None`` = as given.
        source: what ``data`` is, for error messages (e.g. ``"train#dataset"``).

    Returns:
        The list of per-slice items (a new list; the input is not modified).

    Raises:
        CipaInputError: an item that is not a mapping, an item with neither ``"slice"`` nor ``label_key``, or volume
            items that give no slice at all (nothing of them to train or validate on).
    """
    out: list[dict[str, Any]] = []
    volumes = volume_slices = 0
    for index, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise CipaInputError(
                f"{source}: item {index} is a {type(item).__name__}; expected a dict such as "
                "{'image': 'fused.nii.gz', 'label': 'label.nii.gz'} (optionally with 'slice': k)"
            )
        if label_key not in item and SLICE_KEY not in item:
            raise CipaInputError(
                f"{source}: item {index} has neither {SLICE_KEY!r} nor {label_key!r} (keys: {sorted(map(str, item))}); "
                f"expected a per-slice item or a 3-D item with a {label_key!r} path to choose its slices from"
            )
        if SLICE_KEY in item or not _is_volume(item[label_key]):
            out.append(dict(item))
            continue
        volumes += 1
        # One case at a time keeps the input order; the sampler seeds per case, so this equals one batched call.
        slices = sample_axial_slices([item], tumour_free_fraction, seed, label_key=label_key, base_dir=base_dir)
        volume_slices += len(slices)
        out.extend(slices)
    if volumes and not volume_slices:
        raise CipaInputError(
            f"{source}: {volumes} volume item(s) gave no axial slices (no tumour and tumour_free_fraction="
            f"{tumour_free_fraction}); expected at least one slice to train on"
        )
    return out


class AxialSliceCacheDataset(CacheDataset):
    """MONAI ``CacheDataset`` over axial slices, fed with per-slice items, whole 3-D items, or a mix.

    Args:
        data: datalist items (see :func:`expand_volume_items`): per-slice ``{"image", "label", "slice"}`` items as
            ``cipa-bundle datalist --slices`` writes them, or 3-D ``{"image", "label"}`` items as MONAI Label's
            ``BundleTrainTask`` passes them. ``image`` is the fused ``(I, J, K, 2)`` NIfTI of ``cipa-bundle
            convert``, ``label`` an ``(I, J, K)`` mask on the same grid. Other keys are carried into every slice
            item, and 2-D items (non-NIfTI label) pass through unchanged.
        transform: the per-slice transform chain; it starts with ``ExtractAxialSliced``, which reads ``"slice"``.
        tumour_free_fraction: share of each 3-D item's tumour-free slices kept (as ``cipa-bundle datalist``).
        seed: seeds the tumour-free slice choice.
        label_key: key of the label path in 3-D items.
        base_dir: folder that relative paths of 3-D items are relative to.
        **kwargs: the other ``CacheDataset`` arguments (``cache_rate``, ``num_workers``, ...).

    ``len(dataset)`` is the number of slices after expansion; ``dataset.data`` holds the per-slice items.
    """
    def __init__(
        self,
        data: Sequence[Mapping[str, Any]],
        transform: Sequence[Callable] | Callable | None = None,
        tumour_free_fraction: float = 0.1,
        seed: int = 0,
        label_key: str = "label",
        base_dir: str | os.PathLike[str] | None = None,
        **kwargs: Any,
    ) -> None:
        # Set before CacheDataset.__init__, which calls set_data (and so the expansion) itself.
        self.tumour_free_fraction = float(tumour_free_fraction)
        self.seed = int(seed)
        self.label_key = label_key
        self.base_dir = base_dir
        super().__init__(data=data, transform=transform, **kwargs)

    def set_data(self, data: Sequence[Mapping[str, Any]]) -> None:
        """Expand 3-D items into slice items, then cache the deterministic transforms of every slice."""
        items = expand_volume_items(
            data, self.tumour_free_fraction, self.seed, self.label_key, self.base_dir, source=type(self).__name__
        )
        super().set_data(items)
