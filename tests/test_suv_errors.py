"""Errors E1-E15 of the PET-CT notes (section 2), plus the SUL/SUVbsa extensions E16/E17.

Each test writes a real PET DICOM series with one header defect, reads it with the project's reader and checks that
:func:`~cipa_bundle.preprocessing.suv.suv_factors` raises that error's own class, whose message names the tag, the
value found and the file. Tests through :func:`~cipa_bundle.preprocessing.suv_series.write_suv` also check that nothing is
written.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.dicom import read_series
from cipa_bundle.synthetic.dicom_writer import pet_header, write_image_series
from cipa_bundle.preprocessing import suv, suv_errors, suv_series
from cipa_bundle.preprocessing.registration import check_frame_of_reference

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR")

AFFINE = np.diag([-4.0, -4.0, 3.0, 1.0])


def write_pet(folder: Path, header: Dataset | None = None, per_slice: Any = None, modality: str = "PT",
              **kwargs: Any) -> Path:
    array = np.full((3, 2, 2), 5000.0)
    write_image_series(array, AFFINE, folder, modality, uid_seed=folder.name,  # type: ignore[arg-type]
                       header=pet_header() if header is None else header, per_slice=per_slice, **kwargs)
    return folder


def factors_of(folder: Path, kind: str = "bw", **options: Any) -> tuple[np.ndarray, suv.SuvProvenance]:
    series = read_series(folder)
    return suv.suv_factors(series.datasets, kind, files=series.files, **options)  # type: ignore[arg-type]


def raw(keyword_tag: int, vr: str, text: str) -> Any:
    """A per-slice callback that stores ``text`` verbatim, even when it is not a valid value of ``vr``."""
    data = text.encode("ascii")
    data += b" " * (len(data) % 2)

    def apply(k: int, ds: Dataset) -> None:
        ds[keyword_tag] = RawDataElement(Tag(keyword_tag), vr, len(data), data, 0, False, True)

    return apply


def expect(folder: Path, error: type[suv_errors.SuvError], *fragments: str, kind: str = "bw", **options: Any) -> str:
    """Assert ``error`` (with its code) and that its message holds each fragment and the file name."""
    with pytest.raises(error) as info:
        factors_of(folder, kind, **options)
    message = str(info.value)
    assert isinstance(info.value, CipaInputError)
    assert f"[{error.code}]" in message
    assert str(folder) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_error_classes_are_distinct_and_numbered() -> None:
    classes = [getattr(suv_errors, name) for name in suv_errors.__all__ if name.endswith("Error") and name != "SuvError"]
    codes = sorted(int(c.code[1:]) for c in classes)
    assert codes == list(range(1, 18))
    assert all(issubclass(c, suv_errors.SuvError) and issubclass(c, CipaInputError) for c in classes)


def test_e1_not_pet(tmp_path: Path) -> None:
    ct = write_pet(tmp_path / "ct", Dataset(), modality="CT")
    expect(ct, suv_errors.NotPetError, "Modality (0008,0060)", "'CT'")
    with pytest.raises(suv_errors.NotPetError):
        suv_series.write_suv(ct, tmp_path / "out" / "suv.nii.gz")
    assert not (tmp_path / "out").exists()
    # Right modality but a non-PET SOP class.
    pet = write_pet(tmp_path / "pet", per_slice=lambda k, ds: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2"))
    expect(pet, suv_errors.NotPetError, "SOPClassUID (0008,0016)", "1.2.840.10008.5.1.4.1.1.2")


@pytest.mark.parametrize(("weight", "shown"), [(None, "''"), (0, "'0.0'"), (0.5, "'0.5'"), (2_000_000, "'2000000.0'")])
def test_e2_patient_weight(tmp_path: Path, weight: float | None, shown: str) -> None:
    expect(write_pet(tmp_path / "pet", pet_header(weight_kg=weight)), suv_errors.PatientWeightError,
           "PatientWeight (0010,1030)", shown)


def test_e2_non_numeric_weight(tmp_path: Path) -> None:
    pet = write_pet(tmp_path / "pet", per_slice=raw(0x00101030, "DS", "heavy"))
    expect(pet, suv_errors.PatientWeightError, "PatientWeight (0010,1030)", "'heavy'")


def test_e2_weight_in_grams_is_converted_with_warning(tmp_path: Path) -> None:
    factors, prov = factors_of(write_pet(tmp_path / "pet", pet_header(weight_kg=70000)))
    assert float(f"{factors[0]:.5e}") == 2.76337e-4
    assert any("grams" in w for w in prov.warnings)


def test_e3_radiopharmaceutical_sequence(tmp_path: Path) -> None:
    header = pet_header()
    del header.RadiopharmaceuticalInformationSequence
    expect(write_pet(tmp_path / "missing", header), suv_errors.RadiopharmaceuticalError, "(0054,0016)", "missing")
    header = pet_header()
    item = header.RadiopharmaceuticalInformationSequence[0]
    header.RadiopharmaceuticalInformationSequence = DicomSequence([item, item])
    expect(write_pet(tmp_path / "two", header), suv_errors.RadiopharmaceuticalError, "(0054,0016)", "ambiguous (2 items)")


@pytest.mark.parametrize(
    ("dose", "shown"), [(None, "''"), (-5.0, "'-5.0'"), (5e5, "'500000.0'"), (1e12, "1000000000000")]
)
def test_e4_dose(tmp_path: Path, dose: float | None, shown: str) -> None:
    expect(write_pet(tmp_path / "pet", pet_header(dose_bq=dose)), suv_errors.InjectedDoseError,
           "RadionuclideTotalDose (0018,1074)", shown)


def test_e4_mbq_value_refused_when_heuristic_off(tmp_path: Path) -> None:
    expect(write_pet(tmp_path / "pet", pet_header(dose_bq=370)), suv_errors.InjectedDoseError,
           "RadionuclideTotalDose (0018,1074)", "'370.0'", mbq_heuristic=False)


@pytest.mark.parametrize("half_life", [None, 0.0, -6586.2])
def test_e5_half_life(tmp_path: Path, half_life: float | None) -> None:
    expect(write_pet(tmp_path / "pet", pet_header(half_life_s=half_life)), suv_errors.HalfLifeError,
           "RadionuclideHalfLife (0018,1075)")


def test_e6_injection_time(tmp_path: Path) -> None:
    expect(write_pet(tmp_path / "none", pet_header(injection=None)), suv_errors.InjectionTimeError,
           "(0018,1078)", "(0018,1072)", "missing")
    header = pet_header(injection=None)
    header.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartTime = "9999"
    expect(write_pet(tmp_path / "bad", header), suv_errors.InjectionTimeError, "(0018,1072)", "'9999'")


def test_e6_bad_datetime_falls_back_to_start_time_with_warning(tmp_path: Path) -> None:
    header = pet_header()
    header.RadiopharmaceuticalInformationSequence[0].RadiopharmaceuticalStartDateTime = "20241399090000"
    factors, prov = factors_of(write_pet(tmp_path / "pet", header))
    assert float(f"{factors[0]:.5e}") == 2.76337e-4
    assert any("unparsable" in w for w in prov.warnings)


@pytest.mark.parametrize(("units", "suv_type", "shown"), [("PROPCPS", None, "PROPCPS"), ("CPS", None, "CPS"),
                                                           ("GML", "LBM", "'LBM'")])
def test_e7_units(tmp_path: Path, units: str, suv_type: str | None, shown: str) -> None:
    header = pet_header(units=units)
    if suv_type:
        header.SUVType = suv_type
    expect(write_pet(tmp_path / "pet", header), suv_errors.UnsupportedUnitsError, "Units (0054,1001)", shown)


def test_gml_bw_is_already_suv(tmp_path: Path) -> None:
    header = pet_header(units="GML", dose_bq=None)
    header.SUVType = "BW"
    factors, prov = factors_of(write_pet(tmp_path / "pet", header))
    assert factors.tolist() == [1.0, 1.0]


def test_e8_cnts_without_usable_philips_factors(tmp_path: Path) -> None:
    expect(write_pet(tmp_path / "none", pet_header(units="CNTS")), suv_errors.PhilipsScaleFactorError, "CNTS", "(7053,1000)")
    header = pet_header(units="CNTS")
    header.private_block(0x7053, "Philips PET Private Group", create=True).add_new(0x00, "DS", "0.0")
    expect(write_pet(tmp_path / "zero", header), suv_errors.PhilipsScaleFactorError, "(7053,1009)")
    header = pet_header(units="CNTS")
    header.private_block(0x7053, "Philips PET Private Group", create=True).add_new(0x00, "DS", "-1.0")
    expect(write_pet(tmp_path / "negative", header), suv_errors.PhilipsScaleFactorError, "(7053,1000)", "'-1.0'")
    # Positive but absurdly small: every float32 SUV would be 0 (found by the header fuzz test).
    header = pet_header(units="CNTS")
    header.private_block(0x7053, "Philips PET Private Group", create=True).add_new(0x00, "DS", "1e-300")
    expect(write_pet(tmp_path / "tiny", header), suv_errors.PhilipsScaleFactorError, "(7053,1000)", "'1e-300'", "1e-09")
    # The factor at the right element but under another private creator must not be used.
    header = pet_header(units="CNTS")
    header.private_block(0x7053, "SOMEONE ELSE", create=True).add_new(0x00, "DS", "0.000628")
    expect(write_pet(tmp_path / "creator", header), suv_errors.PhilipsScaleFactorError, "Philips PET Private Group")


@pytest.mark.parametrize(("corrected", "dc", "missing"), [(("DECY",), "START", "ATTN"), (("ATTN",), "START", "DECY"),
                                                         ((), "ADMIN", "ATTN/DECY")])
def test_e9_not_corrected(tmp_path: Path, corrected: tuple[str, ...], dc: str, missing: str) -> None:
    header = pet_header(corrected_image=corrected, decay_correction=dc)
    expect(write_pet(tmp_path / "pet", header), suv_errors.NotCorrectedError, "CorrectedImage (0028,0051)", f"lacks {missing}")


@pytest.mark.parametrize("dc", ["NONE", "FOO", ""])
def test_e10_decay_correction(tmp_path: Path, dc: str) -> None:
    expect(write_pet(tmp_path / "pet", pet_header(decay_correction=dc)), suv_errors.DecayCorrectionError,
           "DecayCorrection (0054,1102)", f"'{dc}'")


def test_e11_reference_before_injection_and_absurd_decay(tmp_path: Path) -> None:
    expect(write_pet(tmp_path / "before", pet_header(injection=dt.datetime(2024, 1, 1, 10, 30))),
           suv_errors.DecayTimeError, "precedes injection", "2024-01-01T10:30:00")
    expect(write_pet(tmp_path / "days", pet_header(injection=dt.datetime(2023, 12, 25, 9, 0))),
           suv_errors.DecayTimeError, "half-lives")


def test_e12_reference_time(tmp_path: Path) -> None:
    expect(write_pet(tmp_path / "series", per_slice=raw(0x00080031, "TM", "25x000")), suv_errors.ReferenceTimeError,
           "SeriesTime (0008,0031)", "'25x000'")

    def strip_times(k: int, ds: Dataset) -> None:
        for keyword in ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime"):
            delattr(ds, keyword)

    expect(write_pet(tmp_path / "none", per_slice=strip_times), suv_errors.ReferenceTimeError,
           "cannot determine decay reference time")


def test_e13_rescale_intercept(tmp_path: Path) -> None:
    expect(write_pet(tmp_path / "pet", rescale_intercept=10.0), suv_errors.RescaleInterceptError,
           "RescaleIntercept (0028,1052)", "'10.0'")


@pytest.mark.parametrize(("keyword", "values"), [("PatientWeight", ["70", "71"]), ("Units", ["BQML", "CNTS"]),
                                                 ("SeriesTime", ["100000", "095900"])])
def test_e14_instances_disagree(tmp_path: Path, keyword: str, values: list[str]) -> None:
    pet = write_pet(tmp_path / "pet", per_slice=lambda k, ds: setattr(ds, keyword, values[k]))
    expect(pet, suv_errors.InconsistentSeriesError, keyword, values[1])


def test_e14_dose_disagrees_inside_sequence(tmp_path: Path) -> None:
    def per_slice(k: int, ds: Dataset) -> None:
        ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose = ["3.7e8", "3.8e8"][k]

    expect(write_pet(tmp_path / "pet", per_slice=per_slice), suv_errors.InconsistentSeriesError,
           "RadionuclideTotalDose (0018,1074)")


def test_e15_frame_of_reference(tmp_path: Path) -> None:
    pet = read_series(write_pet(tmp_path / "pet"))  # uid_seed "pet"
    same = np.full((2, 2, 2), 0.0)
    write_image_series(same, AFFINE, tmp_path / "ct_same", "CT", uid_seed="pet")  # same seed: shared frame
    write_image_series(same, AFFINE, tmp_path / "ct_other", "CT", uid_seed="elsewhere")
    ct_same, ct_other = read_series(tmp_path / "ct_same"), read_series(tmp_path / "ct_other")
    assert check_frame_of_reference(pet, ct_same) == pet.frame_of_reference_uid
    with pytest.raises(suv_errors.FrameOfReferenceError) as info:
        check_frame_of_reference(pet, ct_other)
    assert "FrameOfReferenceUID (0020,0052)" in str(info.value) and ct_other.frame_of_reference_uid in str(info.value)
    with pytest.raises(suv_errors.FrameOfReferenceError):
        check_frame_of_reference(pet.datasets, "")


def test_e16_e17_sul_needs_height_and_sex(tmp_path: Path) -> None:
    pet = write_pet(tmp_path / "noheight", pet_header(sex="M"))
    expect(pet, suv_errors.PatientSizeError, "PatientSize (0010,1020)", kind="lbm")
    expect(pet, suv_errors.PatientSizeError, "PatientSize (0010,1020)", kind="bsa")
    assert factors_of(pet, "bw")[0][0] > 0  # SUVbw does not need them
    expect(write_pet(tmp_path / "cm", pet_header(height_m=180, sex="M")), suv_errors.PatientSizeError, "'180.0'", kind="lbm")
    expect(write_pet(tmp_path / "sex", pet_header(height_m=1.8, sex="O")), suv_errors.PatientSexError,
           "PatientSex (0010,0040)", "'O'", kind="lbm")


def test_bad_kind_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(CipaInputError, match="'ibw'"):
        factors_of(write_pet(tmp_path / "pet"), "ibw")


def test_write_suv_leaves_nothing_and_keeps_existing_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out" / "suv.nii.gz"
    good = write_pet(tmp_path / "good")
    nii, side = suv_series.write_suv(good, out)
    before = (nii.read_bytes(), side.read_bytes())
    bad = write_pet(tmp_path / "bad", pet_header(weight_kg=0))
    with pytest.raises(suv_errors.PatientWeightError):
        suv_series.write_suv(bad, out)
    # A failed run neither removes nor half-overwrites the previous result, and leaves no temporary behind.
    assert (nii.read_bytes(), side.read_bytes()) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["suv.json", "suv.nii.gz"]
