"""MONAI transforms for CIPA's inputs: CT window, SUV scaling, the network's input normalisation, and a DICOM PET
-> SUV loader. Each array transform ``Foo`` has a dictionary twin ``Food(keys=...)``, as in MONAI.

The intensity chain from scanner values to network input is::

    HU  --WindowCT-->  [0, 1]  --NormalizeCIPAInput-->  [-1.6, 1.6]
    SUV --ScaleSUV-->  [0, 1]  --NormalizeCIPAInput-->  [-1.6, 1.6]

The first step replaces the 8-bit PNG conversion of the PCLT20K data set (kept as float: no rounding to 1/255);
the second is the official loader's ``v / 255 * 3.2 - 1.6`` applied to ``v / 255`` already in [0, 1].
:class:`NormalizeCIPAInput` is the *only* place in the project that knows the 3.2 / -1.6 constants.

All transforms are deterministic, accept numpy arrays or torch tensors, and keep ``MetaTensor`` metadata (affine
and meta dict travel through untouched).
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import DtypeLike, KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, ScaleIntensityRange, ScaleIntensityRanged, Transform
from monai.utils import MetaKeys, convert_to_tensor

from cipa_bundle.errors import CipaInputError
from cipa_bundle.preprocessing.suv import SUV_KINDS
from cipa_bundle.preprocessing.suv_series import pet_series_to_suv

__all__ = [
    "CIPA_INPUT_SCALE",
    "CIPA_INPUT_SHIFT",
    "DEFAULT_CT_WINDOW_HU",
    "DEFAULT_SUV_MAX",
    "LoadDicomPETSUV",
    "LoadDicomPETSUVd",
    "NormalizeCIPAInput",
    "NormalizeCIPAInputd",
    "ScaleSUV",
    "ScaleSUVd",
    "WindowCT",
    "SOFT_TISSUE_CT_WINDOW_HU",
    "WindowCTd",
    "ct_window_from",
]

#: PCLT20K's CT window (HU): [-1200, -200] -> [0, 1]. The data set description gives it (our reference notes could
#: not confirm it from code, so it stays a parameter). Everything above -200 HU, soft tissue and tumour included,
#: saturates at 1: the window is tuned to lung parenchyma, and tumour-versus-mediastinum contrast comes from PET.
DEFAULT_CT_WINDOW_HU: tuple[float, float] = (-1200.0, -200.0)
#: A soft-tissue window (HU), for tumours outside the lung: on the real sarcoma patients the lung window leaves the CT
#: channel blank inside the limb (docs/performance.md, "Quality on real data").
SOFT_TISSUE_CT_WINDOW_HU: tuple[float, float] = (-160.0, 240.0)

#: SUV mapped to 1 (g/ml). No PCLT20K rule is published; 10 is chosen because the decisions the network must make
#: happen below it (lung 0.3-0.6, blood pool 1.5-2.5, liver 2-3, the classic 2.5 malignancy threshold, hot nodes
#: 3-8), where 10 keeps a resolution of 0.04 SUV per 8-bit step; lesions above 10 are unambiguous and clip. It is
#: fixed rather than per-image (min-max scaling would destroy quantitation), and sits in the 10-20 range others use.
DEFAULT_SUV_MAX: float = 10.0

#: The official CIPA loader normalises 8-bit inputs as ``v / 255 * 3.2 - 1.6`` (a VMamba convention, no ImageNet
#: mean/std), so [0, 1] inputs map to [-1.6, 1.6].
CIPA_INPUT_SCALE: float = 3.2
CIPA_INPUT_SHIFT: float = -1.6


# --------------------------------------------------------------------------------------------------- CT window
def ct_window_from(value: str | Sequence[float]) -> tuple[float, float]:
    """A CT window ``(low, high)`` in HU from ``"LOW,HIGH"`` or a 2-sequence, as the command line and configs give it.

    Raises:
        CipaInputError: not two finite numbers with ``low < high``; the message names ``ct_window_hu``.
    """
    parts = value.replace(" ", "").split(",") if isinstance(value, str) else list(value)
    try:
        low, high = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise CipaInputError(f"ct_window_hu={value!r}: expected two numbers LOW,HIGH in HU, e.g. -160,240") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise CipaInputError(f"ct_window_hu={value!r}: expected finite LOW < HIGH in HU, e.g. -160,240")
    return low, high


class WindowCT(ScaleIntensityRange):
    """Clip HU to ``[hu_min, hu_max]`` and map linearly to ``[0, 1]`` (float32).

    ``y = clip((HU - hu_min) / (hu_max - hu_min), 0, 1)``; e.g. with the default window -700 HU -> 0.5,
    -1200 HU and below -> 0, -200 HU and above -> 1.

    Args:
        hu_min: HU mapped to 0 (default -1200, PCLT20K).
        hu_max: HU mapped to 1 (default -200, PCLT20K).
        dtype: output dtype (default float32).
    """

    def __init__(self, hu_min: float = DEFAULT_CT_WINDOW_HU[0], hu_max: float = DEFAULT_CT_WINDOW_HU[1],
                 dtype: DtypeLike = np.float32) -> None:
        if not hu_max > hu_min:
            raise ValueError(f"WindowCT: hu_max ({hu_max}) must be greater than hu_min ({hu_min})")
        super().__init__(a_min=hu_min, a_max=hu_max, b_min=0.0, b_max=1.0, clip=True, dtype=dtype)


class WindowCTd(ScaleIntensityRanged):
    """Dictionary twin of :class:`WindowCT`.

    Args:
        keys: keys of the CT images (HU).
        hu_min, hu_max, dtype: as :class:`WindowCT`.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, hu_min: float = DEFAULT_CT_WINDOW_HU[0],
                 hu_max: float = DEFAULT_CT_WINDOW_HU[1], dtype: DtypeLike = np.float32,
                 allow_missing_keys: bool = False) -> None:
        scaler = WindowCT(hu_min, hu_max, dtype)  # validates the window before anything else is built
        super().__init__(keys, a_min=hu_min, a_max=hu_max, b_min=0.0, b_max=1.0, clip=True, dtype=dtype,
                         allow_missing_keys=allow_missing_keys)
        self.scaler = scaler


# --------------------------------------------------------------------------------------------------- SUV scale
class ScaleSUV(ScaleIntensityRange):
    """Clip SUV to ``[0, suv_max]`` and map linearly to ``[0, 1]`` (float32): ``y = clip(SUV / suv_max, 0, 1)``.

    With the default ``suv_max`` = :data:`DEFAULT_SUV_MAX` = 10: SUV 2.5 -> 0.25, SUV 12 -> 1, negative -> 0.

    Args:
        suv_max: SUV mapped to 1 (g/ml, > 0).
        dtype: output dtype (default float32).
    """

    def __init__(self, suv_max: float = DEFAULT_SUV_MAX, dtype: DtypeLike = np.float32) -> None:
        if not suv_max > 0:
            raise ValueError(f"ScaleSUV: suv_max must be positive, got {suv_max}")
        super().__init__(a_min=0.0, a_max=suv_max, b_min=0.0, b_max=1.0, clip=True, dtype=dtype)


class ScaleSUVd(ScaleIntensityRanged):
    """Dictionary twin of :class:`ScaleSUV`.

    Args:
        keys: keys of the SUV images.
        suv_max, dtype: as :class:`ScaleSUV`.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, suv_max: float = DEFAULT_SUV_MAX, dtype: DtypeLike = np.float32,
                 allow_missing_keys: bool = False) -> None:
        scaler = ScaleSUV(suv_max, dtype)  # validates suv_max before anything else is built
        super().__init__(keys, a_min=0.0, a_max=suv_max, b_min=0.0, b_max=1.0, clip=True, dtype=dtype,
                         allow_missing_keys=allow_missing_keys)
        self.scaler = scaler


# --------------------------------------------------------------------------------------------------- network input
class NormalizeCIPAInput(Transform):
    """The CIPA network's own input normalisation: ``x * 3.2 - 1.6`` for inputs in ``[0, 1]``.

    The official loader applies ``v / 255 * 3.2 - 1.6`` to 8-bit PNG values; our windowed CT and scaled SUV are
    already ``v / 255`` in float, so 0 -> -1.6, 0.5 -> 0, 1 -> 1.6. No clipping: inputs outside [0, 1] are passed
    through linearly (that would be an upstream bug, not something to hide here).

    Args:
        dtype: output dtype (default float32).
    """

    backend = ScaleIntensityRange.backend

    def __init__(self, dtype: DtypeLike = np.float32) -> None:
        self.dtype = dtype

    def __call__(self, img: NdarrayOrTensor) -> torch.Tensor:
        """``img * CIPA_INPUT_SCALE + CIPA_INPUT_SHIFT`` as a tensor (a MetaTensor stays a MetaTensor)."""
        from monai.data import get_track_meta
        from monai.utils import convert_data_type

        tensor = convert_to_tensor(img, track_meta=get_track_meta())
        out = tensor * CIPA_INPUT_SCALE + CIPA_INPUT_SHIFT
        return convert_data_type(out, dtype=self.dtype)[0]


class NormalizeCIPAInputd(MapTransform):
    """Dictionary twin of :class:`NormalizeCIPAInput`.

    Args:
        keys: keys of the [0, 1] images fed to the network.
        dtype: output dtype (default float32).
        allow_missing_keys: skip absent keys.
    """

    backend = NormalizeCIPAInput.backend

    def __init__(self, keys: KeysCollection, dtype: DtypeLike = np.float32, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.normalizer = NormalizeCIPAInput(dtype)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.normalizer(d[key])
        return d


# --------------------------------------------------------------------------------------------------- DICOM PET
class LoadDicomPETSUV(Transform):
    """Load a DICOM PET series folder as an SUV ``MetaTensor`` on its native grid.

    The SUV conversion (vendor paths, decay reference time, per-slice slopes, errors E1-E17) is
    :func:`cipa_bundle.preprocessing.suv_series.pet_series_to_suv`; this transform only wraps its result the way MONAI's
    ``LoadImage`` would: a ``(I, J, K)`` float32 MetaTensor (or ``(1, I, J, K)`` with ``ensure_channel_first``)
    with the RAS affine, ``space="RAS"``, ``filename_or_obj`` = the folder, and the SUV provenance record under
    ``meta["suv_provenance"]``.

    Args:
        kind: ``"bw"`` (default), ``"lbm"`` (SUL) or ``"bsa"``.
        ensure_channel_first: add a leading channel dimension.

    Raises:
        CipaInputError: (from the SUV module or the DICOM reader) the folder is not a usable PET series.
    """

    def __init__(self, kind: str = "bw", ensure_channel_first: bool = False) -> None:
        if kind not in SUV_KINDS:
            raise ValueError(f"LoadDicomPETSUV: kind must be 'bw', 'lbm' or 'bsa', got {kind!r}")
        self.kind = kind
        self.ensure_channel_first = ensure_channel_first

    def __call__(self, folder: str | os.PathLike[str]) -> MetaTensor:
        """Read ``folder`` and return the SUV MetaTensor."""
        volume, provenance = pet_series_to_suv(folder, self.kind)  # type: ignore[arg-type]
        affine = torch.as_tensor(volume.affine, dtype=torch.float64)
        meta = {
            "filename_or_obj": os.fspath(folder),
            MetaKeys.SPACE: "RAS",
            MetaKeys.ORIGINAL_AFFINE: affine.clone(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(volume.shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan"),
            "suv_provenance": provenance.to_dict(),
            "units": provenance.unit,
            "quantity": provenance.quantity,
        }
        tensor = MetaTensor(torch.as_tensor(np.ascontiguousarray(volume.array, dtype=np.float32)), affine=affine,
                            meta=meta)
        if self.ensure_channel_first:
            tensor = tensor[None]
            tensor.meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan")
        return tensor


class LoadDicomPETSUVd(MapTransform):
    """Dictionary twin of :class:`LoadDicomPETSUV`: replaces each key's folder path by the SUV MetaTensor.

    Args:
        keys: keys holding PET DICOM folder paths.
        kind, ensure_channel_first: as :class:`LoadDicomPETSUV`.
        allow_missing_keys: skip absent keys.
    """

    def __init__(self, keys: KeysCollection, kind: str = "bw", ensure_channel_first: bool = False,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.loader = LoadDicomPETSUV(kind, ensure_channel_first)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.loader(d[key])
        return d
