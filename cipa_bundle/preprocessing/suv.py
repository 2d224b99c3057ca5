"""Standardised uptake value (SUV) from PET DICOM headers: body weight (SUVbw), lean body mass (SUL) and BSA (SUVbsa).

``suv_factors`` is a pure function over pydicom datasets: it returns one factor per slice, ``SUV = value x factor``
with ``value = stored x RescaleSlope + RescaleIntercept`` of that instance (the reader applies the slope per
instance), and a :class:`SuvProvenance` record saying exactly how the factor was obtained. File I/O lives around it
in :mod:`cipa_bundle.preprocessing.suv_series`; the header value readers are :mod:`cipa_bundle.io.dicom_values`.

The rules follow the QIBA vendor-neutral SUV pseudo-code with one IBSI fallback (the project's PET-CT notes,
section 0):

1. ``SUVbw = A_c[Bq/ml] x W[g] / D_ref[Bq]``, ``D_ref = D_inj x 2^(-(t_ref - t_inj) / T_half)``.
2. Decay reference time ``t_ref`` (DecayCorrection START), first that applies:

   a. SeriesDate/SeriesTime, if not after the earliest AcquisitionDate/AcquisitionTime of the series;
   b. the GE private scan datetime (0009,100D) of creator ``GEMS_PETD_01``;
   c. back-computed from FrameReferenceTime (FRT, only when FRT > 0 and ActualFrameDuration is present) of the
      earliest-acquired instance: ``t_ref = t_acq + T_ave - FRT``, ``T_ave = ln(lambda T / (1 - exp(-lambda T)))
      / lambda``;
   d. the earliest acquisition datetime.

3. Injection time: RadiopharmaceuticalStartDateTime (0018,1078) when present; otherwise the dateless
   RadiopharmaceuticalStartTime (0018,1072) put on the date of ``t_ref``, minus one day if that is after ``t_ref``
   (the scan crossed midnight).
4. Units: BQML; Philips CNTS through the private SUV scale factor (7053,1000), else the activity concentration
   scale factor (7053,1009) which turns the values into Bq/ml; GML with SUVType empty or BW (factor 1). Private tags
   are found through their private creator, never a fixed element number, with one exception: when the
   Manufacturer is Philips and group 7053 holds no private creator at all (anonymisers and some exports drop it),
   the factors are read at their conventional elements (7053,1000) / (7053,1009), as IBSI-conformant tools do, and
   the provenance says so. A group 7053 reserved by another creator is never read that way.
5. DecayCorrection: START (above), ADMIN (``f = W / D_inj``), NONE only with ``allow_decay_none=True`` (IBSI
   per-frame formula ``f = W / D_inj x lambda T / (1 - exp(-lambda T)) x exp(lambda (t_acq - t_inj))``).
6. SUL uses the Janmahasatian lean body mass, SUVbsa the Du Bois body surface area (cm^2), both over ``D_ref``.
   When the vendor already gives SUVbw (Philips SUV factor, GML) they are ``SUVbw x LBM / W`` and
   ``SUVbw x BSA / W``.

Choices a careful physicist would make where the notes leave room, all recorded as warnings in the provenance:

* A dose below 1e5 is taken as MBq and multiplied by 1e6 (only if ``mbq_heuristic``, the default); a dose in
  [1e5, 1e6) Bq or above 1e11 Bq (100 GBq) is refused as implausible, as is below 1 (MBq).
* PatientWeight above 1000 is taken as grams. Weights below 1 kg or above 1000 kg are refused.
* PatientSize must be in metres (0.3 to 2.75 m); a value in cm or a weight typed into it is refused, not guessed.
* Decay times below 10 min or above 5 h are warned about; more than 30 half-lives is refused (the decayed dose
  would be below 1e-9 of the injection, which is a header error, not a scan).
* Philips scale factors must lie in (0, 1e6).
* A UTC offset on RadiopharmaceuticalStartDateTime is ignored (warned), because the other times carry none.

Errors are the numbered classes of :mod:`cipa_bundle.preprocessing.suv_errors` (E1-E17).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import numpy as np
from pydicom.dataset import Dataset

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.dicom_values import (
    dicom_number,
    dicom_text,
    element_value,
    parse_da,
    parse_dt,
    parse_tm,
    private_value,
)
from cipa_bundle.io.multiframe import MULTIFRAME_IMAGE_STORAGE
from cipa_bundle.preprocessing.suv_errors import (
    DecayCorrectionError,
    DecayTimeError,
    HalfLifeError,
    InconsistentSeriesError,
    InjectedDoseError,
    InjectionTimeError,
    NotCorrectedError,
    NotPetError,
    PatientSexError,
    PatientSizeError,
    PatientWeightError,
    PhilipsScaleFactorError,
    RadiopharmaceuticalError,
    ReferenceTimeError,
    RescaleInterceptError,
    UnsupportedUnitsError,
)

__all__ = [
    "SuvKind",
    "SUV_KINDS",
    "SuvProvenance",
    "body_surface_area_dubois",
    "lean_body_mass_janmahasatian",
    "suv_factors",
]

SuvKind = Literal["bw", "lbm", "bsa"]
#: The SUV normalisations, as ``SuvKind`` spells them: body weight, lean body mass (SUL), body surface area.
SUV_KINDS: tuple[str, ...] = get_args(SuvKind)

PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
#: PET Image Storage and the multi-frame PET classes, whose frames the DICOM reader hands over as single-frame views.
PET_SOP_CLASSES = frozenset(
    {PET_IMAGE_STORAGE} | {uid for uid, name in MULTIFRAME_IMAGE_STORAGE.items() if "PET" in name}
)
PHILIPS_CREATOR = "Philips PET Private Group"
GE_PET_CREATOR = "GEMS_PETD_01"

_MBQ_BELOW = 1e5  # a dose below this many "Bq" is really MBq (heuristic)
_MIN_DOSE_BQ = 1e6
_MAX_DOSE_BQ = 1e11
_MIN_WEIGHT_KG, _MAX_WEIGHT_KG = 1.0, 1000.0
_MIN_HEIGHT_M, _MAX_HEIGHT_M = 0.3, 2.75
_MAX_HALF_LIVES = 30.0
_WARN_DECAY_MIN_S, _WARN_DECAY_MAX_S = 600.0, 5 * 3600.0
# Real Philips factors are 3e-4 to 7e-3 (SUV) and 1 to 5 (Bq/ml per count); far outside that a factor is corrupt, and
# one like 1e-300 would turn every float32 SUV into 0.
_MIN_PRIVATE_FACTOR, _MAX_PRIVATE_FACTOR = 1e-9, 1e6


# ---------------------------------------------------------------------------------------------------- provenance
@dataclass
class SuvProvenance:
    """How an SUV was computed; ``to_dict()`` is the JSON sidecar.

    Attributes:
        kind: ``"bw"``, ``"lbm"`` (SUL) or ``"bsa"``.
        quantity: ``"SUVbw"``, ``"SUL"`` or ``"SUVbsa"``.
        unit: unit of the SUV values, ``"g/ml"`` (bw, lbm) or ``"cm2/ml"`` (bsa).
        factors: per-slice factor in ``k`` order (SUV = value x factor).
        factor: the single factor when all slices share it, else ``None``.
        units_tag: Units (0054,1001) as found.
        conversion: which units path was taken (``BQML``, ``CNTS SUV scale factor (7053,1000)``, ...).
        decay_correction: DecayCorrection (0054,1102).
        reference_time_path: which rule gave ``t_ref`` (``None`` when no decay term was needed).
        reference_time: ``t_ref`` as ISO 8601.
        injection_time: ``t_inj`` as ISO 8601.
        injection_time_source: which tag (and rule) gave ``t_inj``.
        decay_time_s: ``t_ref - t_inj`` in seconds.
        half_life_s: radionuclide half-life in seconds.
        injected_dose_bq: injected activity in Bq (after any MBq conversion).
        decayed_dose_bq: activity decayed to ``t_ref`` in Bq.
        patient_weight_kg: weight used, kg.
        patient_size_m: height used, m (SUL/SUVbsa).
        patient_sex: sex used (SUL).
        normaliser: the body quantity that replaces weight: ``{"name": ..., "value": ..., "unit": ...}``.
        tags_used: ``{"(gggg,eeee) Keyword": value as text}`` for every tag that influenced the factor.
        warnings: non-fatal findings (unit conversions, unusual uptake time, varying slopes...).
        n_instances: number of instances (slices).
        series_uid: SeriesInstanceUID.
    """

    kind: str
    quantity: str
    unit: str
    factors: list[float]
    factor: float | None
    units_tag: str
    conversion: str
    decay_correction: str
    reference_time_path: str | None = None
    reference_time: str | None = None
    injection_time: str | None = None
    injection_time_source: str | None = None
    decay_time_s: float | None = None
    half_life_s: float | None = None
    injected_dose_bq: float | None = None
    decayed_dose_bq: float | None = None
    patient_weight_kg: float | None = None
    patient_size_m: float | None = None
    patient_sex: str | None = None
    normaliser: dict[str, Any] | None = None
    tags_used: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    n_instances: int = 0
    series_uid: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (all values are str, float, int, None, list or dict)."""
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------- body size
def lean_body_mass_janmahasatian(weight_kg: float, height_m: float, sex: str) -> float:
    """Janmahasatian lean body mass in kg (QIBA/EANM/PERCIST SUL).

    ``BMI = W / H^2``; male ``9270 W / (6680 + 216 BMI)``, female ``9270 W / (8780 + 244 BMI)``.

    Args:
        weight_kg: body weight, kg.
        height_m: height, m.
        sex: ``"M"`` or ``"F"``.
    """
    bmi = weight_kg / height_m**2
    if sex == "M":
        return 9270.0 * weight_kg / (6680.0 + 216.0 * bmi)
    if sex == "F":
        return 9270.0 * weight_kg / (8780.0 + 244.0 * bmi)
    raise ValueError(f"sex must be 'M' or 'F', got {sex!r}")


def body_surface_area_dubois(weight_kg: float, height_m: float) -> float:
    """Du Bois body surface area in m^2: ``0.007184 W[kg]^0.425 H[cm]^0.725``."""
    return 0.007184 * weight_kg**0.425 * (height_m * 100.0) ** 0.725


# ---------------------------------------------------------------------------------------------------- context
class _Series:
    """The instances being converted, with their file names for error messages and a record of the tags used."""

    def __init__(self, datasets: Sequence[Dataset], files: Sequence[str | os.PathLike[str]] | None) -> None:
        self.datasets = list(datasets)
        if files is not None:
            self.files = [str(f) for f in files]
        else:
            self.files = [str(getattr(ds, "filename", "") or "") or None for ds in self.datasets]  # type: ignore[misc]
        self.tags: dict[str, str] = {}
        self.warnings: list[str] = []

    def file(self, index: int = 0) -> str | None:
        return self.files[index] if self.files and index < len(self.files) else None

    def use(self, tag: str, keyword: str, value: Any) -> None:
        """Record that ``tag keyword`` with ``value`` influenced the result."""
        self.tags[f"{tag} {keyword}"] = dicom_text(value)

    def warn(self, message: str) -> None:
        if message not in self.warnings:
            self.warnings.append(message)


# ---------------------------------------------------------------------------------------------------- checks
def _check_modality(s: _Series) -> None:
    for n, ds in enumerate(s.datasets):
        modality = dicom_text(element_value(ds, "Modality"))
        sop = dicom_text(element_value(ds, "SOPClassUID"))
        if modality != "PT":
            raise NotPetError(
                f"not a PET series: Modality (0008,0060) = {modality!r}; expected 'PT'", file=s.file(n)
            )
        if sop not in PET_SOP_CLASSES:
            raise NotPetError(
                f"not a PET series: SOPClassUID (0008,0016) = {sop!r}; expected PET Image Storage {PET_IMAGE_STORAGE} "
                "or its Enhanced / Legacy Converted Enhanced multi-frame form",
                file=s.file(n),
            )


def _rp_items(ds: Dataset) -> list[Dataset]:
    seq = element_value(ds, "RadiopharmaceuticalInformationSequence")
    try:
        return list(seq) if seq is not None else []
    except TypeError:
        return []


def _series_signature(ds: Dataset) -> dict[str, str]:
    """Series-level attributes that must agree across instances (numbers compared as numbers)."""
    sig: dict[str, str] = {}
    for tag, keyword in (
        ("(0020,000E)", "SeriesInstanceUID"),
        ("(0054,1001)", "Units"),
        ("(0054,1102)", "DecayCorrection"),
        ("(0028,0051)", "CorrectedImage"),
        ("(0054,1006)", "SUVType"),
        ("(0010,1030)", "PatientWeight"),
        ("(0010,1020)", "PatientSize"),
        ("(0010,0040)", "PatientSex"),
        ("(0008,0021)", "SeriesDate"),
        ("(0008,0031)", "SeriesTime"),
    ):
        value = element_value(ds, keyword)
        number = dicom_number(value) if keyword.startswith("Patient") and keyword != "PatientSex" else None
        sig[f"{keyword} {tag}"] = repr(number) if number is not None else dicom_text(value)
    items = _rp_items(ds)
    sig["RadiopharmaceuticalInformationSequence (0054,0016) items"] = str(len(items))
    if items:
        item = items[0]
        for tag, keyword in (
            ("(0018,1074)", "RadionuclideTotalDose"),
            ("(0018,1075)", "RadionuclideHalfLife"),
        ):
            number = dicom_number(element_value(item, keyword))
            sig[f"{keyword} {tag}"] = repr(number) if number is not None else dicom_text(element_value(item, keyword))
        for tag, keyword in (
            ("(0018,1072)", "RadiopharmaceuticalStartTime"),
            ("(0018,1078)", "RadiopharmaceuticalStartDateTime"),
        ):
            sig[f"{keyword} {tag}"] = dicom_text(element_value(item, keyword))
    sig[f"GE scan_datetime (0009,100D) [{GE_PET_CREATOR}]"] = dicom_text(private_value(ds, 0x0009, GE_PET_CREATOR, 0x0D))
    return sig


def _check_consistency(s: _Series) -> None:
    ref = _series_signature(s.datasets[0])
    for n, ds in enumerate(s.datasets[1:], start=1):
        sig = _series_signature(ds)
        for key, value in ref.items():
            if sig[key] != value:
                raise InconsistentSeriesError(
                    f"instances do not form one series: {key} = {sig[key]!r} here but {value!r} in "
                    f"{s.file(0) or 'the first instance'}; expected one value for the whole series",
                    file=s.file(n),
                )


def _decay_correction(s: _Series, allow_none: bool) -> str:
    raw = element_value(s.datasets[0], "DecayCorrection")
    dc = dicom_text(raw).upper()
    s.use("(0054,1102)", "DecayCorrection", raw)
    if dc in ("START", "ADMIN"):
        return dc
    if dc == "NONE":
        if allow_none:
            return dc
        raise DecayCorrectionError(
            "DecayCorrection (0054,1102) = 'NONE' not supported by default (QIBA covers START only); "
            "expected START or ADMIN, or enable the IBSI per-frame path (allow_decay_none / --allow_decay_none)",
            file=s.file(),
        )
    raise DecayCorrectionError(
        f"DecayCorrection (0054,1102) = {dicom_text(raw)!r} not supported; expected START, ADMIN (or NONE when enabled)",
        file=s.file(),
    )


def _check_corrected(s: _Series, dc: str) -> None:
    raw = element_value(s.datasets[0], "CorrectedImage")
    values = {v.upper() for v in dicom_text(raw).split("\\") if v}
    s.use("(0028,0051)", "CorrectedImage", raw)
    missing = [c for c in ("ATTN", "DECY") if c not in values and not (c == "DECY" and dc == "NONE")]
    if missing:
        raise NotCorrectedError(
            f"image not attenuation/decay corrected: CorrectedImage (0028,0051) = {dicom_text(raw)!r} lacks "
            f"{'/'.join(missing)}; expected ATTN and DECY (DECY may be absent only with DecayCorrection NONE)",
            file=s.file(),
        )


def _check_intercepts(s: _Series) -> None:
    for n, ds in enumerate(s.datasets):
        raw = element_value(ds, "RescaleIntercept")
        if raw is None or dicom_text(raw) == "":
            continue
        value = dicom_number(raw)
        if value is None or value != 0.0:
            raise RescaleInterceptError(
                f"non-zero RescaleIntercept (0028,1052) = {dicom_text(raw)!r}; expected 0 for PET (IBSI)", file=s.file(n)
            )
    slopes = {dicom_text(element_value(ds, "RescaleSlope")) for ds in s.datasets}
    if len(slopes) > 1:
        s.warn(f"RescaleSlope (0028,1053) varies per slice ({len(slopes)} distinct values); applied per instance")


# ---------------------------------------------------------------------------------------------------- patient
def _weight_kg(s: _Series) -> float:
    raw = element_value(s.datasets[0], "PatientWeight")
    s.use("(0010,1030)", "PatientWeight", raw)
    value = dicom_number(raw)
    expected = f"a finite weight in kg between {_MIN_WEIGHT_KG:g} and {_MAX_WEIGHT_KG:g}"
    if value is None or not math.isfinite(value):
        raise PatientWeightError(
            f"PatientWeight (0010,1030) missing or invalid: {dicom_text(raw)!r}; expected {expected}", file=s.file()
        )
    if value > _MAX_WEIGHT_KG:
        s.warn(
            f"PatientWeight (0010,1030) = {dicom_text(raw)} taken as grams (> {_MAX_WEIGHT_KG:g}); used {value / 1000:g} kg"
        )
        value /= 1000.0
    if not (_MIN_WEIGHT_KG <= value <= _MAX_WEIGHT_KG):
        raise PatientWeightError(
            f"PatientWeight (0010,1030) missing or invalid: {dicom_text(raw)!r}; expected {expected}", file=s.file()
        )
    return value


def _height_m(s: _Series) -> float:
    raw = element_value(s.datasets[0], "PatientSize")
    s.use("(0010,1020)", "PatientSize", raw)
    value = dicom_number(raw)
    if value is None or not math.isfinite(value) or not (_MIN_HEIGHT_M <= value <= _MAX_HEIGHT_M):
        raise PatientSizeError(
            f"PatientSize (0010,1020) missing or invalid: {dicom_text(raw)!r}; expected a height in metres between "
            f"{_MIN_HEIGHT_M:g} and {_MAX_HEIGHT_M:g} (needed for SUL and SUVbsa)",
            file=s.file(),
        )
    return value


def _sex(s: _Series) -> str:
    raw = element_value(s.datasets[0], "PatientSex")
    s.use("(0010,0040)", "PatientSex", raw)
    sex = dicom_text(raw).upper()
    if sex not in ("M", "F"):
        raise PatientSexError(
            f"PatientSex (0010,0040) = {dicom_text(raw)!r}; expected 'M' or 'F' (needed for the Janmahasatian SUL)",
            file=s.file(),
        )
    return sex


def _normaliser(s: _Series, kind: str, weight_kg: float) -> tuple[float, dict[str, Any], float | None, str | None]:
    """``(X, description, height, sex)`` where ``X`` replaces W[g] in the SUV formula (g for bw/lbm, cm^2 for bsa)."""
    if kind == "bw":
        return weight_kg * 1000.0, {"name": "body weight", "value": weight_kg, "unit": "kg"}, None, None
    height = _height_m(s)
    if kind == "lbm":
        sex = _sex(s)
        lbm = lean_body_mass_janmahasatian(weight_kg, height, sex)
        return lbm * 1000.0, {"name": "lean body mass (Janmahasatian)", "value": lbm, "unit": "kg"}, height, sex
    bsa = body_surface_area_dubois(weight_kg, height)
    return bsa * 1e4, {"name": "body surface area (Du Bois)", "value": bsa, "unit": "m2"}, height, None


# ---------------------------------------------------------------------------------------------------- injection
def _radiopharmaceutical(s: _Series) -> Dataset:
    items = _rp_items(s.datasets[0])
    if len(items) != 1:
        what = "missing or empty" if not items else f"ambiguous ({len(items)} items)"
        raise RadiopharmaceuticalError(
            f"RadiopharmaceuticalInformationSequence (0054,0016) {what}; expected exactly one item", file=s.file()
        )
    return items[0]


def _dose_bq(s: _Series, item: Dataset, mbq_heuristic: bool) -> float:
    raw = element_value(item, "RadionuclideTotalDose")
    s.use("(0018,1074)", "RadionuclideTotalDose", raw)
    value = dicom_number(raw)
    expected = (
        f"a finite activity in Bq between {_MIN_DOSE_BQ:g} and {_MAX_DOSE_BQ:g}"
        + (f" (values between 1 and {_MBQ_BELOW:g} are read as MBq)" if mbq_heuristic else "")
    )

    def bad() -> InjectedDoseError:
        return InjectedDoseError(
            f"RadionuclideTotalDose (0018,1074) missing or invalid: {dicom_text(raw)!r}; expected {expected}", file=s.file()
        )

    if value is None or not math.isfinite(value) or value <= 0:
        raise bad()
    if mbq_heuristic and 1.0 <= value < _MBQ_BELOW:
        s.warn(f"RadionuclideTotalDose (0018,1074) = {dicom_text(raw)} read as MBq; used {value * 1e6:g} Bq")
        value *= 1e6
    if not (_MIN_DOSE_BQ <= value <= _MAX_DOSE_BQ):
        raise bad()
    return value


def _half_life_s(s: _Series, item: Dataset) -> float:
    raw = element_value(item, "RadionuclideHalfLife")
    s.use("(0018,1075)", "RadionuclideHalfLife", raw)
    value = dicom_number(raw)
    if value is None or not math.isfinite(value) or value <= 0:
        raise HalfLifeError(
            f"RadionuclideHalfLife (0018,1075) missing or zero: {dicom_text(raw)!r}; expected a positive half-life in s",
            file=s.file(),
        )
    return value


# ---------------------------------------------------------------------------------------------------- times
def _series_datetime(s: _Series) -> _dt.datetime | None:
    ds = s.datasets[0]
    date_raw, time_raw = element_value(ds, "SeriesDate"), element_value(ds, "SeriesTime")
    if not dicom_text(date_raw) or not dicom_text(time_raw):
        return None
    date, time = parse_da(dicom_text(date_raw)), parse_tm(dicom_text(time_raw))
    if date is None or time is None:
        raise ReferenceTimeError(
            f"cannot determine decay reference time: SeriesDate (0008,0021) = {dicom_text(date_raw)!r} / SeriesTime "
            f"(0008,0031) = {dicom_text(time_raw)!r} unparsable; expected YYYYMMDD and HHMMSS[.ffffff]",
            file=s.file(),
        )
    return _dt.datetime.combine(date, time)


def _acquisition_datetime(s: _Series, n: int) -> _dt.datetime | None:
    """Instance ``n``'s AcquisitionDate+AcquisitionTime (or AcquisitionDateTime); ``None`` when absent."""
    ds = s.datasets[n]
    date_raw, time_raw = element_value(ds, "AcquisitionDate"), element_value(ds, "AcquisitionTime")
    if dicom_text(time_raw):
        time = parse_tm(dicom_text(time_raw))
        date_text = dicom_text(date_raw) or dicom_text(element_value(ds, "SeriesDate"))
        date = parse_da(date_text) if date_text else None
        if time is None or (date_text and date is None):
            raise ReferenceTimeError(
                f"cannot determine decay reference time: AcquisitionDate (0008,0022) = {dicom_text(date_raw)!r} / "
                f"AcquisitionTime (0008,0032) = {dicom_text(time_raw)!r} unparsable; expected YYYYMMDD and HHMMSS[.ffffff]",
                file=s.file(n),
            )
        if date is not None:
            if not dicom_text(date_raw):
                s.warn("AcquisitionDate (0008,0022) missing; AcquisitionTime placed on SeriesDate")
            return _dt.datetime.combine(date, time)  # type: ignore[arg-type]
    dt_raw = element_value(ds, "AcquisitionDateTime")
    if dicom_text(dt_raw):
        value, offset = parse_dt(dicom_text(dt_raw))
        if value is None:
            raise ReferenceTimeError(
                f"cannot determine decay reference time: AcquisitionDateTime (0008,002A) = {dicom_text(dt_raw)!r} "
                "unparsable; expected YYYYMMDDHHMMSS[.ffffff]",
                file=s.file(n),
            )
        return value
    return None


def _frame_average_time_s(half_life_s: float, duration_s: float) -> float:
    """``T_ave = ln(lambda T / (1 - exp(-lambda T))) / lambda``: when, within a frame of length T, the average
    count rate of a decaying source equals its instantaneous rate."""
    lam = math.log(2.0) / half_life_s
    x = lam * duration_s
    return math.log(x / -math.expm1(-x)) / lam


def _reference_time(s: _Series, half_life_s: float) -> tuple[_dt.datetime, str]:
    """The decay reference time and the name of the rule that gave it (QIBA order plus the IBSI FRT fallback)."""
    series_dt = _series_datetime(s)
    acquisitions = [_acquisition_datetime(s, n) for n in range(len(s.datasets))]
    known = [(t, n) for n, t in enumerate(acquisitions) if t is not None]
    earliest, earliest_n = min(known) if known else (None, -1)
    ds0 = s.datasets[0]
    if series_dt is not None and (earliest is None or series_dt <= earliest):
        s.use("(0008,0021)", "SeriesDate", element_value(ds0, "SeriesDate"))
        s.use("(0008,0031)", "SeriesTime", element_value(ds0, "SeriesTime"))
        if earliest is None:
            s.warn("no AcquisitionDate/Time to check SeriesDate/Time against; SeriesDate/Time used as is")
            return series_dt, "SeriesDate/SeriesTime (no acquisition time to check against)"
        s.use("(0008,0022)/(0008,0032)", "earliest AcquisitionDate/Time", earliest.isoformat())
        return series_dt, "SeriesDate/SeriesTime (not after the earliest acquisition)"

    if series_dt is not None and earliest is not None:
        s.warn(
            f"SeriesDate/Time {series_dt.isoformat()} is after the earliest acquisition {earliest.isoformat()} "
            "(post-processed or re-reconstructed series?); SeriesTime not used"
        )
    ge_raw = private_value(ds0, 0x0009, GE_PET_CREATOR, 0x0D)
    if dicom_text(ge_raw):
        ge_dt, _ = parse_dt(dicom_text(ge_raw))
        if ge_dt is not None:
            s.use(f"(0009,100D) [{GE_PET_CREATOR}]", "scan_datetime", ge_raw)
            return ge_dt, f"GE private scan_datetime (0009,100D) [{GE_PET_CREATOR}]"
        s.warn(f"GE private scan_datetime (0009,100D) = {dicom_text(ge_raw)!r} unparsable; ignored")

    if earliest is not None:
        ds = s.datasets[earliest_n]
        frt_raw, dur_raw = element_value(ds, "FrameReferenceTime"), element_value(ds, "ActualFrameDuration")
        frt_ms, dur_ms = dicom_number(frt_raw), dicom_number(dur_raw)
        s.use("(0008,0022)/(0008,0032)", "earliest AcquisitionDate/Time", earliest.isoformat())
        if (
            frt_ms is not None and dur_ms is not None and math.isfinite(frt_ms) and math.isfinite(dur_ms)
            and frt_ms > 0 and dur_ms > 0
        ):
            s.use("(0054,1300)", "FrameReferenceTime", frt_raw)
            s.use("(0018,1242)", "ActualFrameDuration", dur_raw)
            t_ave = _frame_average_time_s(half_life_s, dur_ms / 1000.0)
            offset = t_ave - frt_ms / 1000.0
            if abs(offset) > 7 * 86400:
                raise ReferenceTimeError(
                    f"cannot determine decay reference time: FrameReferenceTime (0054,1300) = {dicom_text(frt_raw)!r} ms "
                    f"puts it {offset:.0f} s from the acquisition; expected an offset within the scan",
                    file=s.file(earliest_n),
                )
            return earliest + _dt.timedelta(seconds=offset), "acquisition time back-computed from FrameReferenceTime"
        return earliest, "earliest AcquisitionDate/AcquisitionTime"

    raise ReferenceTimeError(
        "cannot determine decay reference time: no SeriesDate/SeriesTime (0008,0021/0031), GE scan_datetime "
        "(0009,100D) or AcquisitionDate/Time (0008,0022/0032); expected at least one",
        file=s.file(),
    )


def _injection_time(s: _Series, item: Dataset, anchor: _dt.datetime) -> tuple[_dt.datetime, str]:
    """Injection datetime and its source; a dateless start time goes on ``anchor``'s date (midnight rule)."""
    dt_raw = element_value(item, "RadiopharmaceuticalStartDateTime")
    tm_raw = element_value(item, "RadiopharmaceuticalStartTime")
    if dicom_text(dt_raw):
        value, offset = parse_dt(dicom_text(dt_raw))
        if value is not None:
            s.use("(0018,1078)", "RadiopharmaceuticalStartDateTime", dt_raw)
            if offset:
                s.warn(f"UTC offset {offset} of RadiopharmaceuticalStartDateTime ignored (other times carry none)")
            return value, "RadiopharmaceuticalStartDateTime (0018,1078)"
        if not dicom_text(tm_raw):
            raise InjectionTimeError(
                f"injection time unparsable: RadiopharmaceuticalStartDateTime (0018,1078) = {dicom_text(dt_raw)!r}; "
                "expected YYYYMMDDHHMMSS[.ffffff]",
                file=s.file(),
            )
        s.warn(f"RadiopharmaceuticalStartDateTime (0018,1078) = {dicom_text(dt_raw)!r} unparsable; used the start time")
    if not dicom_text(tm_raw):
        raise InjectionTimeError(
            "injection time missing: neither RadiopharmaceuticalStartDateTime (0018,1078) nor "
            "RadiopharmaceuticalStartTime (0018,1072) in (0054,0016); expected one of them",
            file=s.file(),
        )
    time = parse_tm(dicom_text(tm_raw))
    if time is None:
        raise InjectionTimeError(
            f"injection time unparsable: RadiopharmaceuticalStartTime (0018,1072) = {dicom_text(tm_raw)!r}; "
            "expected HHMMSS[.ffffff]",
            file=s.file(),
        )
    s.use("(0018,1072)", "RadiopharmaceuticalStartTime", tm_raw)
    value = _dt.datetime.combine(anchor.date(), time)
    if value > anchor:
        return value - _dt.timedelta(days=1), "RadiopharmaceuticalStartTime (0018,1072) on the previous day (midnight)"
    return value, "RadiopharmaceuticalStartTime (0018,1072) on the reference date"


def _decay_seconds(s: _Series, t_ref: _dt.datetime, t_inj: _dt.datetime, half_life_s: float, what: str) -> float:
    delta = (t_ref - t_inj).total_seconds()
    if delta < 0:
        raise DecayTimeError(
            f"scan reference time precedes injection: {what} {t_ref.isoformat()} is {-delta:.0f} s before the "
            f"injection {t_inj.isoformat()}; expected a reference time after the injection",
            file=s.file(),
        )
    if delta > _MAX_HALF_LIVES * half_life_s:
        raise DecayTimeError(
            f"decay time {delta:.0f} s from injection {t_inj.isoformat()} to {what} {t_ref.isoformat()} exceeds "
            f"{_MAX_HALF_LIVES:g} half-lives ({half_life_s:g} s); expected a scan within hours of the injection",
            file=s.file(),
        )
    if not (_WARN_DECAY_MIN_S <= delta <= _WARN_DECAY_MAX_S):
        s.warn(f"decay (uptake) time {delta / 60:.1f} min is outside the usual 10 min to 5 h")
    return delta


# ---------------------------------------------------------------------------------------------------- units
#: What the provenance says when a Philips factor was read without its private creator.
CONVENTIONAL_ELEMENT_NOTE = "private creator absent; conventional element used"


def _philips_factor(ds: Dataset, offset: int) -> tuple[Any, bool]:
    """The raw Philips factor (7053,10xx) of one instance and whether it came from its conventional element."""
    raw = private_value(ds, 0x7053, PHILIPS_CREATOR, offset)
    if raw is not None:
        return raw, False
    manufacturer = dicom_text(element_value(ds, "Manufacturer")).lower()
    if "philips" in manufacturer and not ds.private_creators(0x7053):
        element = ds.get(0x70531000 + offset)
        return (None if element is None else element.value), True
    return None, False


def _private_factors(s: _Series, offset: int, name: str) -> list[float] | None:
    """Per-instance Philips factor (7053,10xx) or ``None`` if absent/zero in any instance; bad values raise E8."""
    values: list[float] = []
    found = [_philips_factor(ds, offset) for ds in s.datasets]
    for n, (raw, _) in enumerate(found):
        value = dicom_number(raw)
        if value is None or value == 0.0:
            return None
        if not math.isfinite(value) or not (_MIN_PRIVATE_FACTOR <= value < _MAX_PRIVATE_FACTOR):
            raise PhilipsScaleFactorError(
                f"Philips {name} (7053,10{offset:02X}) [{PHILIPS_CREATOR}] = {dicom_text(raw)!r}; expected a factor "
                f"from {_MIN_PRIVATE_FACTOR:g} to below {_MAX_PRIVATE_FACTOR:g}",
                file=s.file(n),
            )
        values.append(value)
    conventional = any(from_element for _, from_element in found)
    where = f"(7053,10{offset:02X}) [{CONVENTIONAL_ELEMENT_NOTE if conventional else PHILIPS_CREATOR}]"
    s.use(where, name, found[0][0])
    if conventional:
        s.warn(f"Philips {name} (7053,10{offset:02X}): {CONVENTIONAL_ELEMENT_NOTE} (Manufacturer Philips, no private "
               "creator in group 7053)")
    return values


# ---------------------------------------------------------------------------------------------------- main
_QUANTITY = {"bw": ("SUVbw", "g/ml"), "lbm": ("SUL", "g/ml"), "bsa": ("SUVbsa", "cm2/ml")}


def suv_factors(
    datasets: Sequence[Dataset],
    kind: SuvKind = "bw",
    *,
    files: Sequence[str | os.PathLike[str]] | None = None,
    mbq_heuristic: bool = True,
    allow_decay_none: bool = False,
) -> tuple[np.ndarray, SuvProvenance]:
    """Per-slice SUV factors of a PET series: ``SUV[..., k] = (stored x slope_k + intercept_k) x factors[k]``.

    Args:
        datasets: the PET instance headers in slice (``k``) order; pixel data is not needed.
        kind: ``"bw"`` (SUVbw, g/ml), ``"lbm"`` (SUL, Janmahasatian, g/ml) or ``"bsa"`` (SUVbsa, Du Bois, cm^2/ml).
        files: the instance paths, for error messages (default: each dataset's ``filename``).
        mbq_heuristic: read a RadionuclideTotalDose between 1 and 1e5 as MBq (with a warning).
        allow_decay_none: accept DecayCorrection NONE with the IBSI per-frame formula (refused by default).

    Returns:
        ``(factors, provenance)``: float64 ``(K,)`` factors (units: g/ml per Bq/ml, or cm^2/ml per Bq/ml) and the
        :class:`SuvProvenance` record.

    Raises:
        SuvError: one of E1..E17 (see the module docstring); ``CipaInputError`` for a bad ``kind``.
    """
    if kind not in _QUANTITY:
        raise CipaInputError(f"SUV kind {kind!r} not supported; expected one of 'bw', 'lbm', 'bsa'")
    if not datasets:
        raise NotPetError("not a PET series: no instances given; expected the PET series' datasets")
    s = _Series(datasets, files)
    _check_modality(s)
    _check_consistency(s)
    dc = _decay_correction(s, allow_decay_none)
    _check_corrected(s, dc)
    _check_intercepts(s)

    quantity, unit = _QUANTITY[kind]
    ds0 = s.datasets[0]
    units_raw = element_value(ds0, "Units")
    units = dicom_text(units_raw).upper()
    s.use("(0054,1001)", "Units", units_raw)
    prov = SuvProvenance(
        kind=kind,
        quantity=quantity,
        unit=unit,
        factors=[],
        factor=None,
        units_tag=dicom_text(units_raw),
        conversion="",
        decay_correction=dc,
        n_instances=len(s.datasets),
        series_uid=dicom_text(element_value(ds0, "SeriesInstanceUID")),
    )

    scale = np.ones(len(s.datasets))  # multiplies the voxel values into Bq/ml (Philips ACSF) or is 1
    if units == "CNTS":
        suvsf = _private_factors(s, 0x00, "SUV scale factor")
        if suvsf is not None:
            return _finish(s, prov, np.asarray(suvsf), "CNTS: Philips SUV scale factor (7053,1000)", kind)
        acsf = _private_factors(s, 0x09, "activity concentration scale factor")
        if acsf is None:
            raise PhilipsScaleFactorError(
                f"CNTS without Philips scale factors: Units (0054,1001) = 'CNTS' but neither (7053,1000) nor "
                f"(7053,1009) of private creator {PHILIPS_CREATOR!r} is present and non-zero in every instance; "
                "expected one of them",
                file=s.file(),
            )
        scale = np.asarray(acsf)
        prov.conversion = "CNTS: Philips activity concentration scale factor (7053,1009) to Bq/ml, then BQML"
    elif units == "GML":
        suv_type_raw = element_value(ds0, "SUVType")
        suv_type = dicom_text(suv_type_raw).upper()
        s.use("(0054,1006)", "SUVType", suv_type_raw)
        if suv_type not in ("", "BW"):
            raise UnsupportedUnitsError(
                f"Units (0054,1001)=GML with SUVType (0054,1006) = {suv_type!r} not supported; expected SUVType "
                "empty or BW",
                file=s.file(),
            )
        return _finish(s, prov, np.ones(len(s.datasets)), "GML: values are already SUVbw", kind)
    elif units != "BQML":
        raise UnsupportedUnitsError(
            f"Units (0054,1001)={dicom_text(units_raw)!r} not supported; expected BQML, CNTS (with Philips scale factors) "
            "or GML (SUVType BW)",
            file=s.file(),
        )
    else:
        prov.conversion = "BQML"

    weight = _weight_kg(s)
    x, prov.normaliser, prov.patient_size_m, prov.patient_sex = _normaliser(s, kind, weight)
    prov.patient_weight_kg = weight
    item = _radiopharmaceutical(s)
    dose = _dose_bq(s, item, mbq_heuristic)
    half_life = _half_life_s(s, item)
    prov.injected_dose_bq, prov.half_life_s = dose, half_life
    lam = math.log(2.0) / half_life

    if dc == "ADMIN":
        factors = np.full(len(s.datasets), x / dose)
        prov.reference_time_path = "not needed: DecayCorrection ADMIN (decay-corrected to administration)"
    elif dc == "START":
        t_ref, prov.reference_time_path = _reference_time(s, half_life)
        t_inj, prov.injection_time_source = _injection_time(s, item, t_ref)
        delta = _decay_seconds(s, t_ref, t_inj, half_life, "reference time")
        decayed = dose * 2.0 ** (-delta / half_life)
        prov.reference_time, prov.injection_time = t_ref.isoformat(), t_inj.isoformat()
        prov.decay_time_s, prov.decayed_dose_bq = delta, decayed
        factors = np.full(len(s.datasets), x / decayed)
    else:  # NONE, IBSI per frame: correct each frame's decay back to the injection time
        factors = _decay_none_factors(s, item, x / dose, lam, half_life, prov)
    return _finish(s, prov, factors * scale, prov.conversion, kind, already_normalised=True)


def _decay_none_factors(
    s: _Series, item: Dataset, base: float, lam: float, half_life: float, prov: SuvProvenance
) -> np.ndarray:
    """``base x lambda T / (1 - exp(-lambda T)) x exp(lambda (t_acq - t_inj))`` per instance (IBSI, NONE)."""
    acquisitions = [_acquisition_datetime(s, n) for n in range(len(s.datasets))]
    if any(t is None for t in acquisitions):
        n = acquisitions.index(None)
        raise ReferenceTimeError(
            "cannot determine decay reference time: DecayCorrection NONE needs every instance's "
            "AcquisitionDate/Time (0008,0022/0032); it is missing",
            file=s.file(n),
        )
    earliest = min(acquisitions)  # type: ignore[type-var]
    t_inj, prov.injection_time_source = _injection_time(s, item, earliest)  # type: ignore[arg-type]
    prov.injection_time = t_inj.isoformat()
    prov.reference_time_path = "per-frame AcquisitionDate/Time (DecayCorrection NONE, IBSI)"
    factors = np.empty(len(s.datasets))
    for n, (ds, t_acq) in enumerate(zip(s.datasets, acquisitions)):
        dur_raw = element_value(ds, "ActualFrameDuration")
        dur_ms = dicom_number(dur_raw)
        if dur_ms is None or not math.isfinite(dur_ms) or dur_ms <= 0:
            raise ReferenceTimeError(
                f"cannot determine decay reference time: ActualFrameDuration (0018,1242) = {dicom_text(dur_raw)!r}; "
                "expected a positive duration in ms (needed for DecayCorrection NONE)",
                file=s.file(n),
            )
        delta = _decay_seconds(s, t_acq, t_inj, half_life, "acquisition time")  # type: ignore[arg-type]
        x = lam * dur_ms / 1000.0
        factors[n] = base * (x / -math.expm1(-x)) * math.exp(lam * delta)
        if n == 0:
            prov.reference_time, prov.decay_time_s = t_acq.isoformat(), delta  # type: ignore[union-attr]
    s.use("(0018,1242)", "ActualFrameDuration", element_value(s.datasets[0], "ActualFrameDuration"))
    return factors


def _finish(
    s: _Series,
    prov: SuvProvenance,
    factors: np.ndarray,
    conversion: str,
    kind: str,
    *,
    already_normalised: bool = False,
) -> tuple[np.ndarray, SuvProvenance]:
    """Convert a vendor SUVbw factor to SUL/SUVbsa if needed, check it and fill the provenance."""
    prov.conversion = conversion
    if not already_normalised and kind != "bw":
        # The vendor factor gives SUVbw; SUL = SUVbw x LBM / W and SUVbsa = SUVbw x BSA[cm2] / W[g].
        weight = _weight_kg(s)
        x, prov.normaliser, prov.patient_size_m, prov.patient_sex = _normaliser(s, kind, weight)
        prov.patient_weight_kg = weight
        factors = factors * (x / (weight * 1000.0))
    factors = np.asarray(factors, dtype=np.float64)
    if not np.all(np.isfinite(factors)) or not np.all(factors > 0):
        # The bounds on every input keep factors finite and positive; reaching this is a bug, not bad input.
        raise RuntimeError(f"internal error: SUV factors not finite and positive: {factors}")
    prov.factors = [float(f) for f in factors]
    prov.factor = float(factors[0]) if np.all(factors == factors[0]) else None
    prov.tags_used = dict(s.tags)
    prov.warnings = list(s.warnings)
    return factors, prov


