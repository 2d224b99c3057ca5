"""Why a PET series gives no trustworthy SUV: the numbered input errors E1-E17 of the SUV conversion.

Each is a :class:`SuvError`, hence a ``CipaInputError``, and its message starts with the file and ``[E<n>]``; the
number is that of the project's PET-CT notes, section 2. A class per error lets a caller catch the one it can act on
(``except PatientWeightError``) the way pydicom and MONAI users catch built-in exception types.

====  ===================================  ================================================================
E1    :class:`NotPetError`                 Modality is not PT or SOP class is not PET Image Storage
E2    :class:`PatientWeightError`          PatientWeight missing, empty, not finite, < 1 kg or > 1000 kg
E3    :class:`RadiopharmaceuticalError`    RadiopharmaceuticalInformationSequence missing, empty or > 1 item
E4    :class:`InjectedDoseError`           RadionuclideTotalDose missing, <= 0 or implausible
E5    :class:`HalfLifeError`               RadionuclideHalfLife missing, <= 0 or not finite
E6    :class:`InjectionTimeError`          neither (0018,1078) nor (0018,1072), or unparsable
E7    :class:`UnsupportedUnitsError`       Units not BQML, CNTS (Philips) or GML (SUVType BW)
E8    :class:`PhilipsScaleFactorError`     CNTS without usable (7053,1000) / (7053,1009)
E9    :class:`NotCorrectedError`           CorrectedImage lacks ATTN, or DECY while DecayCorrection is not NONE
E10   :class:`DecayCorrectionError`        DecayCorrection NONE (default policy), missing or unknown
E11   :class:`DecayTimeError`              reference time before injection, or more than 30 half-lives after
E12   :class:`ReferenceTimeError`          series/acquisition dates or times unparsable, or no usable t_ref
E13   :class:`RescaleInterceptError`       RescaleIntercept not 0
E14   :class:`InconsistentSeriesError`     series-level attributes differ between instances
E15   :class:`FrameOfReferenceError`       PET and CT FrameOfReferenceUID differ (identity resample)
E16   :class:`PatientSizeError`            PatientSize missing/implausible (only SUL and SUVbsa need it)
E17   :class:`PatientSexError`             PatientSex not M or F (only SUL needs it)
====  ===================================  ================================================================
"""

from __future__ import annotations

import os
from typing import ClassVar

from cipa_bundle.errors import CipaInputError

__all__ = [
    "DecayCorrectionError",
    "DecayTimeError",
    "FrameOfReferenceError",
    "HalfLifeError",
    "InconsistentSeriesError",
    "InjectedDoseError",
    "InjectionTimeError",
    "NotCorrectedError",
    "NotPetError",
    "PatientSexError",
    "PatientSizeError",
    "PatientWeightError",
    "PhilipsScaleFactorError",
    "RadiopharmaceuticalError",
    "ReferenceTimeError",
    "RescaleInterceptError",
    "SuvError",
    "UnsupportedUnitsError",
]


class SuvError(CipaInputError):
    """A PET series whose headers do not allow a trustworthy SUV. ``code`` is the error number (E1..E17)."""

    code: ClassVar[str] = ""

    def __init__(self, message: str, *, file: str | os.PathLike[str] | None = None) -> None:
        self.file = None if file is None else str(file)
        prefix = f"{self.file}: " if self.file else ""
        super().__init__(f"{prefix}[{self.code}] {message}")


class NotPetError(SuvError):
    """E1: Modality is not PT, or the SOP class is not PET Image Storage."""

    code = "E1"


class PatientWeightError(SuvError):
    """E2: PatientWeight (0010,1030) missing, empty, not finite or implausible."""

    code = "E2"


class RadiopharmaceuticalError(SuvError):
    """E3: RadiopharmaceuticalInformationSequence (0054,0016) missing, empty or ambiguous (more than one item)."""

    code = "E3"


class InjectedDoseError(SuvError):
    """E4: RadionuclideTotalDose (0018,1074) missing, not positive or implausible."""

    code = "E4"


class HalfLifeError(SuvError):
    """E5: RadionuclideHalfLife (0018,1075) missing, not positive or not finite."""

    code = "E5"


class InjectionTimeError(SuvError):
    """E6: no usable injection time in (0018,1078) or (0018,1072)."""

    code = "E6"


class UnsupportedUnitsError(SuvError):
    """E7: Units (0054,1001) other than BQML, CNTS (Philips) or GML with SUVType BW."""

    code = "E7"


class PhilipsScaleFactorError(SuvError):
    """E8: Units CNTS without a usable Philips (7053,1000) or (7053,1009) factor."""

    code = "E8"


class NotCorrectedError(SuvError):
    """E9: CorrectedImage (0028,0051) lacks ATTN, or lacks DECY while DecayCorrection is not NONE."""

    code = "E9"


class DecayCorrectionError(SuvError):
    """E10: DecayCorrection (0054,1102) NONE (refused by default), missing or unknown."""

    code = "E10"


class DecayTimeError(SuvError):
    """E11: decay reference time before the injection (after the midnight rule), or absurdly long after it."""

    code = "E11"


class ReferenceTimeError(SuvError):
    """E12: series/acquisition date or time unparsable, or no usable decay reference time."""

    code = "E12"


class RescaleInterceptError(SuvError):
    """E13: RescaleIntercept (0028,1052) is not 0 (IBSI: PET intercepts must be 0)."""

    code = "E13"


class InconsistentSeriesError(SuvError):
    """E14: a series-level attribute (Units, weight, dose, half-life, times...) differs between instances."""

    code = "E14"


class FrameOfReferenceError(SuvError):
    """E15: PET and CT are not in the same frame of reference, so an identity resample would be wrong."""

    code = "E15"


class PatientSizeError(SuvError):
    """E16 (SUL/SUVbsa only): PatientSize (0010,1020) missing or not a height in metres."""

    code = "E16"


class PatientSexError(SuvError):
    """E17 (SUL only): PatientSex (0010,0040) is not M or F."""

    code = "E17"
