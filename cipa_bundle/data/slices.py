"""3-D volumes and PCLT20K PNG pairs as the 2-D axial slices the CIPA network trains on.

CIPA is a 2-D network. Training on 3-D studies uses a list of per-slice items, ``{"image": path, "label": path,
"slice": k}`` (every tumour slice of each case plus a seeded share of the tumour-free ones, see
:func:`sample_axial_slices`), that any MONAI ``Dataset`` / ``CacheDataset`` consumes with
:class:`ExtractAxialSliced` as its first transform. PCLT20K items are PNG pairs loaded by :class:`LoadPCLT20Kd`.

**Channel order.** The MONAI-facing convention of this project is channel 0 = CT, channel 1 = PET. The official
CIPA loader stacks ``[PET, CT]``; the network wrapper owns that difference, so nothing upstream of it swaps.

**In-plane orientation.** A slice comes out as ``(C, H, W)`` in the radiological display orientation of the
PCLT20K PNGs (and of DICOM viewers): rows run anterior -> posterior and columns run from the patient's right to
the patient's left, whatever the in-plane voxel order of the NIfTI (it is read from the affine). For a volume
written from an ordinary axial DICOM series (``convert``), that is ``array[:, :, k].T``. Inference must feed the
network the same view: with ``SliceInferer`` on an ``(C, I, J, K)`` volume in LPS voxel order, transpose the two
in-plane axes on the way in and out.

Images produced here are in [0, 1] (PNG / 255) or keep the NIfTI's stored values (HU, SUV, or the [0, 1]
intensities of ``convert``'s ``image.nii.gz``); the network's own ``x * 3.2 - 1.6`` normalisation happens later,
in ``cipa_bundle.preprocessing.transforms.NormalizeCIPAInput``.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.nifti import grid_mismatch, save_json
from cipa_bundle.preprocessing.transforms import DEFAULT_CT_WINDOW_HU, DEFAULT_SUV_MAX, ScaleSUV, WindowCT

__all__ = [
    "ExtractAxialSlice",
    "ExtractAxialSliced",
    "ReadGrayPNG",
    "LoadPCLT20Kd",
    "LoadPETCTSliced",
    "sample_axial_slices",
    "expand_datalist_slices",
    "write_slice_datalist",
]

#: Voxel order assumed for plain arrays that carry no affine: DICOM's (i -> patient left, j -> posterior).
_LPS_AFFINE = np.diag([-1.0, -1.0, 1.0, 1.0])


def _display_plan(affine: np.ndarray, source: str) -> tuple[bool, bool, bool]:
    """How to turn an ``(I, J)`` slice into the display view: ``(transpose, flip_rows, flip_cols)``.

    The flips apply after the transpose. Raises if the third voxel axis is not the axial one.
    """
    import nibabel as nib

    ornt = nib.io_orientation(np.asarray(affine, dtype=np.float64)[:4, :4])
    if int(ornt[2, 0]) != 2:
        codes = "".join(nib.aff2axcodes(np.asarray(affine, dtype=np.float64)[:4, :4]))
        raise CipaInputError(
            f"{source}: voxel axes are oriented {codes}; expected the third axis to be axial (S or I), "
            "as in a NIfTI written from an axial series"
        )
    # ornt[a] = (world axis, +1 if the index runs towards R/A, -1 if towards L/P).
    transpose = int(ornt[0, 0]) == 0  # i runs left-right, so it must become the column axis
    row_axis, col_axis = (1, 0) if transpose else (0, 1)
    # Display rows run towards posterior and columns towards the patient's left: flip axes that run towards A or R.
    return transpose, bool(ornt[row_axis, 1] > 0), bool(ornt[col_axis, 1] > 0)


def _slice_affine(affine: np.ndarray, k: int, shape_ij: tuple[int, int], plan: tuple[bool, bool, bool]) -> np.ndarray:
    """Affine of the displayed slice: ``(row, col, 0, 1)`` -> RAS mm of the same pixel in the volume."""
    transpose, flip_rows, flip_cols = plan
    row_axis, col_axis = (1, 0) if transpose else (0, 1)
    m = np.zeros((4, 4))
    m[row_axis, 0] = -1.0 if flip_rows else 1.0
    m[col_axis, 1] = -1.0 if flip_cols else 1.0
    m[row_axis, 3] = shape_ij[row_axis] - 1 if flip_rows else 0.0
    m[col_axis, 3] = shape_ij[col_axis] - 1 if flip_cols else 0.0
    m[2, 2] = 1.0
    m[2, 3] = float(k)
    m[3, 3] = 1.0
    return np.asarray(affine, dtype=np.float64) @ m


class ExtractAxialSlice(Transform):
    """Axial slice ``k`` of a 3-D image as a ``(C, H, W)`` ``MetaTensor`` in the display orientation.

    The input is either

    * a NIfTI path: only slice ``k`` is read (nibabel array proxy), never the whole volume. ``(I, J, K)`` files
      give ``C = 1``; ``(I, J, K, C)`` files (``convert``'s 2-channel ``image.nii.gz``) give ``C`` channels; or
    * an already loaded channel-first ``(C, I, J, K)`` array. A ``MetaTensor`` supplies its affine; a plain array or
      tensor is taken to be in DICOM (LPS) voxel order.

    Args:
        display: reorient to the radiological display view described in the module docstring (default). ``False``
            returns ``(C, I, J)`` exactly as stored, the view ``SliceInferer(spatial_dim=2)`` gives a network.

    The output's affine maps ``(row, col, 0)`` to the RAS position of that pixel in the volume, and its metadata
    keeps ``filename_or_obj`` (the source) and ``slice_index``.
    """
    def __init__(self, display: bool = True) -> None:
        self.display = display

    def __call__(self, img: Any, index: int) -> MetaTensor:  # type: ignore[override]
        if isinstance(img, (str, os.PathLike)):
            data, affine, source = self._read_slice(Path(img), int(index))
        else:
            data, affine, source = self._take_slice(img, int(index))
        k = int(index)
        shape_ij = (int(data.shape[1]), int(data.shape[2]))
        plan = _display_plan(affine, source) if self.display else (False, False, False)
        if plan[0]:
            data = np.swapaxes(data, 1, 2)
        if plan[1]:
            data = data[:, ::-1, :]
        if plan[2]:
            data = data[:, :, ::-1]
        out_affine = _slice_affine(affine, k, shape_ij, plan)
        meta = {"filename_or_obj": source, "slice_index": k}
        # A copy: nibabel may hand back read-only views, and the slice must not alias a cached volume either.
        pixels = torch.as_tensor(np.array(data, copy=True, order="C"))
        return MetaTensor(pixels, affine=torch.as_tensor(out_affine), meta=meta)

    @staticmethod
    def _check_index(index: int, depth: int, source: str) -> None:
        if not 0 <= index < depth:
            raise CipaInputError(f"{source}: slice {index} requested; expected 0 <= slice < {depth} (K of the volume)")

    def _read_slice(self, path: Path, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        import nibabel as nib

        source = str(path)
        if not path.is_file():
            raise CipaInputError(f"image {path} does not exist; expected a NIfTI file")
        img = nib.load(source)
        shape = img.shape
        # NIfTI vector images are (I, J, K, 1, C); both that and (I, J, K, C) are channel-last.
        if len(shape) == 5 and shape[3] == 1:
            proxy = img.dataobj
            self._check_index(index, shape[2], source)
            data = np.asanyarray(proxy[:, :, index, 0, :])
        elif len(shape) in (3, 4):
            self._check_index(index, shape[2], source)
            data = np.asanyarray(img.dataobj[:, :, index, ...])
        else:
            raise CipaInputError(f"{source}: shape {shape}; expected (I, J, K) or (I, J, K, C)")
        data = data[None] if data.ndim == 2 else np.moveaxis(data, -1, 0)
        return data, np.asarray(img.affine, dtype=np.float64), source

    def _take_slice(self, img: Any, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        affine = _LPS_AFFINE
        source = "<array>"
        if isinstance(img, MetaTensor):
            affine = img.affine.detach().cpu().numpy().astype(np.float64)
            source = str(img.meta.get("filename_or_obj", source))
        if affine.shape != (4, 4):
            raise ValueError(f"{source}: expected a 3-D (4 x 4) affine, got shape {affine.shape}")
        arr = img.detach().cpu().numpy() if isinstance(img, torch.Tensor) else np.asarray(img)
        if arr.ndim != 4:
            raise ValueError(f"{source}: expected a channel-first (C, I, J, K) volume, got shape {arr.shape}")
        self._check_index(index, arr.shape[3], source)
        return arr[..., index], affine, source


class ExtractAxialSliced(MapTransform):
    """Dictionary twin of :class:`ExtractAxialSlice`: replaces each key's volume (or path) by slice ``d[slice_key]``.

    Args:
        keys: keys holding NIfTI paths or loaded ``(C, I, J, K)`` volumes (e.g. ``["image", "label"]``).
        slice_key: the key holding the axial index ``k`` (written by :func:`sample_axial_slices`).
        display: see :class:`ExtractAxialSlice`.
        allow_missing_keys: skip keys absent from the item (e.g. ``label`` at inference).
    """
    def __init__(
        self, keys: KeysCollection, slice_key: str = "slice", display: bool = True, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.slice_key = slice_key
        self.extract = ExtractAxialSlice(display=display)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.slice_key not in d:
            raise CipaInputError(
                f"item has no {self.slice_key!r} key (keys: {sorted(map(str, d))}); expected an axial slice index"
            )
        for key in self.key_iterator(d):
            d[key] = self.extract(d[key], int(d[self.slice_key]))
        return d


class ReadGrayPNG(Transform):
    """Read an 8-bit grayscale PNG as a ``(1, H, W)`` float32 ``MetaTensor`` (rows, columns as stored).

    Args:
        binary: return ``{0, 1}`` with foreground = ``value / 255 >= 0.5`` (a PCLT20K ``_mask.png`` stored as
            0/255), instead of ``value / 255`` in [0, 1].

    Colour PNGs are converted with the ITU-R 601 luma weights, as OpenCV's grayscale read (used by the official
    loader) does; 16-bit or float PNGs are refused because PCLT20K is 8-bit.
    """
    def __init__(self, binary: bool = False) -> None:
        self.binary = binary

    def __call__(self, path: str | os.PathLike[str]) -> MetaTensor:  # type: ignore[override]
        from PIL import Image

        path = Path(path)
        if not path.is_file():
            raise CipaInputError(f"PNG {path} does not exist")
        with Image.open(path) as im:
            if im.mode not in ("L", "P", "RGB", "RGBA", "LA", "1"):
                raise CipaInputError(f"PNG {path} has mode {im.mode}; expected an 8-bit grayscale or colour PNG")
            arr = np.asarray(im.convert("L"), dtype=np.float32) / 255.0
        if self.binary:
            arr = (arr >= 0.5).astype(np.float32)
        meta = {"filename_or_obj": str(path)}
        return MetaTensor(torch.as_tensor(arr[None]), affine=torch.eye(4, dtype=torch.float64), meta=meta)


class LoadPCLT20Kd(MapTransform):
    """Load a PCLT20K item: CT and PET PNGs -> ``image`` ``(2, H, W)`` in [0, 1] (channel 0 = CT, 1 = PET), and
    the mask PNG -> ``label`` ``(1, H, W)`` in {0, 1}.

    The official loader stacks ``[PET, CT]``; this project's convention is ``[CT, PET]`` everywhere MONAI sees data.

    Args:
        ct_key, pet_key, label_key: item keys holding the ``_CT.png``, ``_PET.png`` and ``_mask.png`` paths
            (as written by ``cipa_bundle.data.datalist``). The label is optional (inference items have none).
        image_key: where the stacked image goes.
    """
    def __init__(
        self, ct_key: str = "ct", pet_key: str = "pet", label_key: str = "label", image_key: str = "image"
    ) -> None:
        super().__init__([ct_key, pet_key], allow_missing_keys=False)
        self.ct_key, self.pet_key, self.label_key, self.image_key = ct_key, pet_key, label_key, image_key
        self.read, self.read_mask = ReadGrayPNG(), ReadGrayPNG(binary=True)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in (self.ct_key, self.pet_key):
            if key not in d:
                raise CipaInputError(f"PCLT20K item has no {key!r} key (keys: {sorted(map(str, d))})")
        ct, pet = self.read(d[self.ct_key]), self.read(d[self.pet_key])
        if ct.shape != pet.shape:
            raise CipaInputError(
                f"CT {d[self.ct_key]} is {tuple(ct.shape[1:])} pixels but PET {d[self.pet_key]} is "
                f"{tuple(pet.shape[1:])}; expected the same size"
            )
        image = torch.cat([ct.as_tensor(), pet.as_tensor()], dim=0)
        d[self.image_key] = MetaTensor(image, affine=ct.affine, meta={"filename_or_obj": ct.meta["filename_or_obj"]})
        if self.label_key in d and d[self.label_key] is not None:
            label = self.read_mask(d[self.label_key])
            if label.shape[1:] != ct.shape[1:]:
                raise CipaInputError(
                    f"mask {d[self.label_key]} is {tuple(label.shape[1:])} pixels but CT {d[self.ct_key]} is "
                    f"{tuple(ct.shape[1:])}; expected the same size"
                )
            d[self.label_key] = label
        return d


class LoadPETCTSliced(MapTransform):
    """Any training or validation item of this project -> ``image`` ``(2, H, W)`` [CT, PET] in [0, 1] and ``label``
    ``(1, H, W)``, in the display orientation, whatever datalist source the item came from.

    Item kinds (decided per item, so one datalist may mix them):

    * ``{"image", "label", "slice"}``: the fused 2-channel NIfTI that ``cipa-bundle convert`` writes (already windowed
      and scaled) -> :class:`ExtractAxialSliced`.
    * ``{"ct", "pet", "label", "slice"}`` with NIfTI paths: separate CT (HU) and PET (SUV) volumes on one voxel grid,
      as in the autoPET release (``CTres.nii.gz``, ``SUV.nii.gz``) -> the slice of each, then
      :class:`~cipa_bundle.preprocessing.transforms.WindowCT` and
      :class:`~cipa_bundle.preprocessing.transforms.ScaleSUV` with the same window and SUV scale ``convert`` uses,
      so every source reaches the network with the same intensities.
    * ``{"ct", "pet", "label"}`` with PNG paths: a PCLT20K slice pair -> :class:`LoadPCLT20Kd`.

    The label is optional everywhere (inference items have none).

    Args:
        image_key, ct_key, pet_key, label_key, slice_key: item keys.
        ct_window_hu: HU window mapped to [0, 1] for CT volumes given in HU.
        suv_max: SUV mapped to 1 for PET volumes given in SUV.
    """
    def __init__(
        self,
        image_key: str = "image",
        ct_key: str = "ct",
        pet_key: str = "pet",
        label_key: str = "label",
        slice_key: str = "slice",
        ct_window_hu: Sequence[float] = DEFAULT_CT_WINDOW_HU,
        suv_max: float = DEFAULT_SUV_MAX,
    ) -> None:
        super().__init__([image_key, ct_key, pet_key], allow_missing_keys=True)
        self.image_key, self.ct_key, self.pet_key = image_key, ct_key, pet_key
        self.label_key, self.slice_key = label_key, slice_key
        self.window_ct = WindowCT(float(ct_window_hu[0]), float(ct_window_hu[1]))
        self.scale_suv = ScaleSUV(float(suv_max))
        self.fused = ExtractAxialSliced([image_key, label_key], slice_key=slice_key, allow_missing_keys=True)
        self.separate = ExtractAxialSliced([ct_key, pet_key, label_key], slice_key=slice_key, allow_missing_keys=True)
        self.pclt20k = LoadPCLT20Kd(ct_key=ct_key, pet_key=pet_key, label_key=label_key, image_key=image_key)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.image_key in d:
            return self.fused(d)
        if self.ct_key not in d or self.pet_key not in d:
            raise CipaInputError(
                f"item has keys {sorted(map(str, d))}; expected {self.image_key!r} (a fused CT/PET NIfTI) or both "
                f"{self.ct_key!r} and {self.pet_key!r} (CT and PET NIfTI volumes, or PCLT20K PNGs)"
            )
        if all(str(d[key]).lower().endswith(".png") for key in (self.ct_key, self.pet_key)):
            return self.pclt20k(d)
        d = self.separate(d)
        ct, pet = d.pop(self.ct_key), d.pop(self.pet_key)
        if ct.shape[0] != 1 or pet.shape[0] != 1:
            raise CipaInputError(
                f"CT {data[self.ct_key]} slice {d[self.slice_key]} has {ct.shape[0]} channel(s) and PET "
                f"{data[self.pet_key]} has {pet.shape[0]}; expected one each (3-D volumes): the image is CT then PET"
            )
        problem = grid_mismatch(ct.shape[1:], ct.affine, pet.shape[1:], pet.affine)
        if problem is not None:
            raise CipaInputError(
                f"CT {data[self.ct_key]} slice {d[self.slice_key]} and PET {data[self.pet_key]} are not on one grid "
                f"(CT vs PET: {problem}); expected the PET resampled onto the CT grid (autoPET's CTres.nii.gz / "
                "SUV.nii.gz are)"
            )
        image = torch.cat([self.window_ct(ct).as_tensor(), self.scale_suv(pet).as_tensor()], dim=0)
        meta = {k: v for k, v in ct.meta.items() if k != "affine"}  # the affine goes in once, explicitly
        d[self.image_key] = MetaTensor(image, affine=ct.affine, meta=meta)
        return d


# ---------------------------------------------------------------------------------------------------- sampling
def _resolve(path: str, base_dir: Path | None) -> Path:
    p = Path(path)
    return p if p.is_absolute() or base_dir is None else base_dir / p


def _case_rng(seed: int, name: str) -> np.random.Generator:
    # Seeding per case from its label path keeps a case's slice choice stable when other cases are added or removed.
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def sample_axial_slices(
    cases: Sequence[Mapping[str, Any]],
    tumour_free_fraction: float = 0.1,
    seed: int = 0,
    label_key: str = "label",
    base_dir: str | os.PathLike[str] | None = None,
) -> list[dict[str, Any]]:
    """Expand 3-D cases into per-slice items: every tumour slice plus a seeded share of the tumour-free ones.

    Args:
        cases: datalist items, each with ``label_key`` -> label NIfTI path (other keys, e.g. ``image`` or
            ``ct``/``pet``, are copied into every slice item unchanged).
        tumour_free_fraction: share of each case's tumour-free axial slices to keep, in [0, 1] (rounded to the
            nearest whole slice). A tumour slice is one whose label has any voxel >= 0.5.
        seed: seeds the choice of tumour-free slices (per case, from ``seed`` and the label path).
        label_key: key of the label path.
        base_dir: folder that relative paths are relative to (the dataset root); ``None`` = as given.

    Returns:
        ``[{**case, "slice": k}, ...]``, grouped by case in input order, ``k`` ascending within a case.
    """
    if not 0.0 <= float(tumour_free_fraction) <= 1.0:
        raise CipaInputError(f"tumour_free_fraction is {tumour_free_fraction}; expected a value in [0, 1]")
    import nibabel as nib

    base = Path(base_dir) if base_dir is not None else None
    out: list[dict[str, Any]] = []
    for case in cases:
        if label_key not in case:
            raise CipaInputError(f"datalist item {dict(case)} has no {label_key!r} key; expected a label path")
        label_path = _resolve(str(case[label_key]), base)
        if not label_path.is_file():
            raise CipaInputError(f"label {label_path} does not exist (item {case[label_key]!r})")
        img = nib.load(str(label_path))
        _display_plan(img.affine, str(label_path))  # the third axis must be axial, as ExtractAxialSlice needs
        label = np.asanyarray(img.dataobj)
        if label.ndim != 3:
            label = label.reshape(label.shape[:3] + (-1,)).max(axis=3)
        tumour = (label >= 0.5).any(axis=(0, 1))
        free = np.nonzero(~tumour)[0]
        n_keep = int(round(float(tumour_free_fraction) * free.size))
        chosen = _case_rng(seed, str(case[label_key])).choice(free, size=n_keep, replace=False) if n_keep else []
        for k in sorted(np.nonzero(tumour)[0].tolist() + [int(c) for c in chosen]):
            out.append({**dict(case), "slice": int(k)})
    return out


def expand_datalist_slices(
    doc: dict[str, Any],
    tumour_free_fraction: float = 0.1,
    seed: int = 0,
    sections: Sequence[str] = ("training", "validation"),
    base_dir: str | os.PathLike[str] | None = None,
    source: str = "datalist",
) -> dict[str, Any]:
    """A copy of a 3-D datalist document with ``sections`` expanded by :func:`sample_axial_slices`.

    Other sections (``testing``) and metadata are kept as they are, so 3-D evaluation still sees whole volumes; a
    ``slice_sampling`` record of the settings is added.
    """
    out = dict(doc)
    for section in sections:
        if section not in doc:
            raise CipaInputError(f"{source} has no {section!r} section; found {sorted(doc)}")
        out[section] = sample_axial_slices(doc[section], tumour_free_fraction, seed, base_dir=base_dir)
    out["slice_sampling"] = {
        "tumour_free_fraction": float(tumour_free_fraction),
        "seed": int(seed),
        "sections": list(sections),
    }
    return out


def write_slice_datalist(
    datalist: str | os.PathLike[str],
    out: str | os.PathLike[str],
    tumour_free_fraction: float = 0.1,
    seed: int = 0,
    sections: Sequence[str] = ("training", "validation"),
    base_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Rewrite a 3-D decathlon datalist JSON with ``sections`` expanded into per-slice items.

    Args:
        datalist: a JSON written by ``cipa_bundle.data.datalist`` for 3-D studies or autoPET.
        out: the per-slice JSON to write (atomically).
        tumour_free_fraction, seed: see :func:`sample_axial_slices`.
        sections: datalist sections to expand (see :func:`expand_datalist_slices`).
        base_dir: the dataset root; defaults to the datalist's folder, as ``load_decathlon_datalist`` does.
    """
    src = Path(datalist)
    try:
        doc = json.loads(src.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CipaInputError(f"cannot read datalist {src}: {err}") from err
    base = Path(base_dir) if base_dir is not None else src.parent
    doc = expand_datalist_slices(doc, tumour_free_fraction, seed, sections, base, source=f"datalist {src}")
    return save_json(doc, out)
