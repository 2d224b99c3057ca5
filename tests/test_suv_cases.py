"""Every hand-worked SUV case of the PET-CT notes, section 3.1 (A-K and X1-X8).

Each case writes a real two-slice PET DICOM series with the project's writer (slice 0 holds 5000 Bq/ml, slice 1
holds 20000 Bq/ml unless stated), then checks the expected factor to 6 significant figures (or the expected error)
through both routes a user has:

* the library: :func:`cipa_bundle.io.dicom.read_series` then :func:`cipa_bundle.preprocessing.suv.suv_factors`;
* the CLI: ``cipa-bundle suv PET_DIR OUT.nii.gz`` (in-process, plus one real subprocess), checking the NIfTI voxels,
  the JSON sidecar, exit code 2 with a one-line message on bad input, and that nothing is written on failure.

The expected numbers are the notes' hand calculations, not values computed by the code under test.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from pydicom.dataset import Dataset

from cipa_bundle.cli import main
from cipa_bundle.io.dicom import read_series
from cipa_bundle.synthetic.dicom_writer import pet_header, write_image_series
from cipa_bundle.preprocessing import suv, suv_errors

REPO = Path(__file__).resolve().parents[1]
AFFINE = np.array([[-4.0, 0, 0, 100.0], [0, -4.0, 0, 80.0], [0, 0, 3.27, -50.0], [0, 0, 0, 1]])
BQML = (5000.0, 20000.0)  # slice 0, slice 1


def sig6(x: float) -> float:
    """``x`` rounded to 6 significant figures, the precision of the notes' table."""
    return float(f"{x:.5e}")


def write_pet(
    folder: Path,
    header: Dataset,
    *,
    per_slice: Any = None,
    series_datetime: dt.datetime = dt.datetime(2024, 1, 1, 10, 0, 0),
    stored: tuple[int, int] | None = None,
    slopes: tuple[float, float] = (1.0, 1.0),
) -> Path:
    """A (3, 2, 2) PET series: slice values BQML (or the given stored integers) with the given per-slice slopes."""
    if stored is None:
        array = np.stack([np.full((3, 2), BQML[0]), np.full((3, 2), BQML[1])], axis=-1)
        write_image_series(array, AFFINE, folder, "PT", uid_seed=folder.name, header=header,
                           per_slice=per_slice, series_datetime=series_datetime, rescale_slopes=slopes)
    else:
        array = np.stack([np.full((3, 2), stored[0]), np.full((3, 2), stored[1])], axis=-1).astype(np.int16)
        write_image_series(array, AFFINE, folder, "PT", uid_seed=folder.name, header=header,
                           per_slice=per_slice, series_datetime=series_datetime, rescale_slopes=slopes,
                           stored_values=True)
    return folder


def with_private(header: Dataset, group: int, creator: str, offset: int, vr: str, value: str) -> Dataset:
    header.private_block(group, creator, create=True).add_new(offset, vr, value)
    return header


def set_tags(**tags: Any) -> Any:
    """A per-slice callback setting ``{keyword: value or [value_slice0, value_slice1]}``."""

    def apply(k: int, ds: Dataset) -> None:
        for keyword, value in tags.items():
            setattr(ds, keyword, value[k] if isinstance(value, list) else value)

    return apply


def library_factors(pet: Path, kind: str = "bw", **options: Any) -> tuple[np.ndarray, Any, Any]:
    series = read_series(pet)
    factors, prov = suv.suv_factors(series.datasets, kind, **options)
    return factors, prov, series


def cli_suv(pet: Path, out: Path, *args: str) -> tuple[np.ndarray, dict[str, Any]]:
    main(["suv", str(pet), str(out), *args])
    image = nib.load(str(out))
    sidecar = json.loads(out.with_name(out.name.replace(".nii.gz", ".json")).read_text())
    return np.asarray(image.dataobj), sidecar


def check_case(tmp_path: Path, pet: Path, expected: float, kind: str = "bw", *cli_args: str, **options: Any) -> Any:
    """Library and CLI both give ``expected`` (6 s.f.), and the CLI voxels are value x factor."""
    factors, prov, series = library_factors(pet, kind, **options)
    assert sig6(factors[0]) == expected
    assert np.all(factors == factors[0])
    out = tmp_path / "out" / "suv.nii.gz"
    data, sidecar = cli_suv(pet, out, "--kind", kind, *cli_args)
    assert sig6(sidecar["factor"]) == expected
    assert sidecar["kind"] == kind
    assert data.dtype == np.float32 and data.shape == (3, 2, 2)
    for k, bqml in enumerate(BQML):
        assert data[:, :, k] == pytest.approx(bqml * expected, rel=6e-6)
    np.testing.assert_allclose(nib.load(str(out)).affine, series.volume.affine, atol=1e-5)
    return prov


# ------------------------------------------------------------------------------------------------ A..K
def test_a_baseline(tmp_path: Path) -> None:
    pet = write_pet(tmp_path / "pet", pet_header())
    prov = check_case(tmp_path, pet, 2.76337e-4)
    data, _ = cli_suv(pet, tmp_path / "again.nii.gz")
    assert sig6(float(data[0, 0, 0])) == 1.38168
    assert sig6(float(data[0, 0, 1])) == 5.52673
    assert prov.decay_time_s == pytest.approx(3600.0)
    assert prov.reference_time_path.startswith("SeriesDate/SeriesTime")
    assert prov.injection_time == "2024-01-01T09:00:00"
    assert prov.warnings == []


def test_b_ge_post_processed_uses_private_scan_datetime(tmp_path: Path) -> None:
    header = with_private(pet_header(), 0x0009, "GEMS_PETD_01", 0x0D, "DT", "20240101100000")
    header.SeriesTime = "103000"
    prov = check_case(tmp_path, write_pet(tmp_path / "pet", header), 2.76337e-4)
    assert "GE private" in prov.reference_time_path
    # Using SeriesTime would have given Delta t = 5400 s and 3.33972e-4 (+20.9%): the trap this case guards.
    assert sig6(prov.factors[0]) != 3.33972e-4


def test_b2_series_after_acquisition_without_ge_tag_uses_earliest_acquisition(tmp_path: Path) -> None:
    header = pet_header()
    header.SeriesTime = "103000"
    # Two beds: the *first file* was acquired at 10:05, the earliest acquisition is 10:00 on the second file.
    per_slice = set_tags(AcquisitionTime=["100500", "100000"], FrameReferenceTime="0")
    prov = check_case(tmp_path, write_pet(tmp_path / "pet", header, per_slice=per_slice), 2.76337e-4)
    assert prov.reference_time == "2024-01-01T10:00:00"
    assert prov.reference_time_path == "earliest AcquisitionDate/AcquisitionTime"


def test_b3_frame_reference_time_back_computation(tmp_path: Path) -> None:
    header = pet_header()
    header.SeriesTime = "103000"
    per_slice = set_tags(FrameReferenceTime="60000", ActualFrameDuration=120000)
    prov = check_case(tmp_path, write_pet(tmp_path / "pet", header, per_slice=per_slice), 2.76335e-4)
    assert prov.decay_time_s == pytest.approx(3599.936855, abs=1e-6)
    assert "FrameReferenceTime" in prov.reference_time_path


def test_c_midnight_crossing_with_dateless_start_time(tmp_path: Path) -> None:
    header = pet_header(injection=dt.datetime(2024, 1, 1, 23, 50), injection_time_only=True)
    pet = write_pet(tmp_path / "pet", header, series_datetime=dt.datetime(2024, 1, 2, 0, 50))
    prov = check_case(tmp_path, pet, 2.76337e-4)
    assert prov.injection_time == "2024-01-01T23:50:00"
    assert prov.decay_time_s == pytest.approx(3600.0)
    assert "previous day" in prov.injection_time_source


def test_d1_philips_cnts_suv_scale_factor(tmp_path: Path) -> None:
    # The dose is removed to show that time and dose are irrelevant on this path.
    header = with_private(pet_header(units="CNTS", dose_bq=None), 0x7053, "Philips PET Private Group", 0x00,
                          "DS", "0.000628")
    prov = check_case(tmp_path, write_pet(tmp_path / "pet", header), 6.28000e-4)
    assert "7053,1000" in prov.conversion


def test_d2_philips_cnts_activity_concentration_scale_factor(tmp_path: Path) -> None:
    header = with_private(pet_header(units="CNTS"), 0x7053, "Philips PET Private Group", 0x09, "DS", "2.5")
    prov = check_case(tmp_path, write_pet(tmp_path / "pet", header), 6.90842e-4)
    assert "7053,1009" in prov.conversion


def _philips_without_creator(offset: int, value: str, manufacturer: str = "Philips Medical Systems") -> Dataset:
    """A CNTS header whose factor sits at (7053,10xx) with no private creator in group 7053, as anonymisers leave."""
    header = pet_header(units="CNTS")
    header.Manufacturer = manufacturer
    header.add_new(0x70531000 + offset, "DS", value)
    return header


@pytest.mark.parametrize(("offset", "value", "expected"), [(0x00, "0.000628", 6.28000e-4), (0x09, "2.5", 6.90842e-4)])
def test_d3_philips_factor_without_private_creator_is_read_at_its_conventional_element(
    tmp_path: Path, offset: int, value: str, expected: float
) -> None:
    # The same factors as D1 and D2, hand-checked there: only the private creator is missing.
    prov = check_case(tmp_path, write_pet(tmp_path / "pet", _philips_without_creator(offset, value)), expected)
    assert f"7053,10{offset:02X}" in prov.conversion
    assert any(suv.CONVENTIONAL_ELEMENT_NOTE in warning for warning in prov.warnings)
    assert any(suv.CONVENTIONAL_ELEMENT_NOTE in tag for tag in prov.tags_used)


@pytest.mark.parametrize(
    ("manufacturer", "value", "words"),
    [
        ("SIEMENS", "0.000628", ("CNTS", "(7053,1000)")),  # not Philips: the element is not Philips's to read
        ("Philips Medical Systems", "-1.0", ("(7053,1000)", "'-1.0'")),  # Philips, but not a positive factor
        ("Philips Medical Systems", "nan", ("(7053,1000)", "'nan'")),
    ],
)
def test_d3_conventional_element_is_refused_when_not_philips_or_not_positive_and_finite(
    tmp_path: Path, manufacturer: str, value: str, words: tuple[str, ...]
) -> None:
    pet = write_pet(tmp_path / "pet", _philips_without_creator(0x00, value, manufacturer))
    with pytest.raises(suv_errors.PhilipsScaleFactorError) as refused:
        library_factors(pet, "bw")
    assert all(word in str(refused.value) for word in words), str(refused.value)


def test_e_per_slice_slope_applied_per_instance(tmp_path: Path) -> None:
    # Stored 1000 in both slices, slope 2.5 on slice 0 and 0.5 on slice 1; InstanceNumber runs against position so
    # ordering by InstanceNumber would swap the slopes.
    pet = write_pet(tmp_path / "pet", pet_header(), stored=(1000, 1000), slopes=(2.5, 0.5),
                    per_slice=set_tags(InstanceNumber=[2, 1]))
    factors, prov, series = library_factors(pet)
    values = series.volume.array * factors[None, None, :]
    assert sig6(values[0, 0, 0]) == 0.690842
    assert sig6(values[0, 0, 1]) == 0.138168
    assert any("RescaleSlope" in w for w in prov.warnings)
    out = tmp_path / "out" / "suv.nii.gz"
    data, sidecar = cli_suv(pet, out)
    assert sig6(float(data[1, 1, 0])) == 0.690842
    assert sig6(float(data[1, 1, 1])) == 0.138168
    assert sig6(sidecar["factor"]) == 2.76337e-4


def test_f_decay_correction_admin(tmp_path: Path) -> None:
    prov = check_case(tmp_path, write_pet(tmp_path / "pet", pet_header(decay_correction="ADMIN")), 1.89189e-4)
    assert prov.decay_time_s is None


def test_g_gallium_68(tmp_path: Path) -> None:
    check_case(tmp_path, write_pet(tmp_path / "pet", pet_header(half_life_s=4057.7)), 3.49922e-4)


def test_h_other_weight_dose_half_life_and_uptake(tmp_path: Path) -> None:
    header = pet_header(weight_kg=85, dose_bq=2.5e8, half_life_s=6588,
                        injection=dt.datetime(2024, 1, 1, 10, 0) - dt.timedelta(seconds=4350))
    prov = check_case(tmp_path, write_pet(tmp_path / "pet", header), 5.37337e-4)
    assert prov.decay_time_s == pytest.approx(4350.0)


def test_i_dose_stored_in_mbq(tmp_path: Path) -> None:
    prov = check_case(tmp_path, write_pet(tmp_path / "pet", pet_header(dose_bq=370)), 2.76337e-4)
    assert any("MBq" in w for w in prov.warnings)
    assert prov.injected_dose_bq == pytest.approx(3.7e8)


def test_j_decay_correction_none_optional_path(tmp_path: Path) -> None:
    header = pet_header(decay_correction="NONE", corrected_image=("ATTN", "SCAT"))
    pet = write_pet(tmp_path / "pet", header, per_slice=set_tags(ActualFrameDuration=300000))
    check_case(tmp_path, pet, 2.80722e-4, "bw", "--allow_decay_none", allow_decay_none=True)


@pytest.mark.parametrize(
    ("weight", "height", "sex", "expected"),
    [
        (80, 1.80, "M", {"lbm": 2.43695e-4, "bw": 3.15813e-4, "bsa": 7.88121e-5}),  # K1 and K3 (male)
        (60, 1.65, "F", {"lbm": 1.55091e-4, "bw": 2.36860e-4, "bsa": 6.54782e-5}),  # K2 and K3 (female)
    ],
)
def test_k_sul_and_suvbsa(tmp_path: Path, weight: float, height: float, sex: str, expected: dict[str, float]) -> None:
    pet = write_pet(tmp_path / "pet", pet_header(weight_kg=weight, height_m=height, sex=sex))
    for kind, value in expected.items():
        prov = check_case(tmp_path / kind, pet, value, kind)
        assert prov.unit == ("cm2/ml" if kind == "bsa" else "g/ml")


def test_k_hand_worked_body_size_numbers() -> None:
    # The intermediate numbers of K1-K3, straight from the formulas' hand calculation.
    assert suv.lean_body_mass_janmahasatian(80, 1.80, "M") == pytest.approx(61.731410, abs=1e-6)
    assert suv.lean_body_mass_janmahasatian(60, 1.65, "F") == pytest.approx(39.286846, abs=1e-6)
    assert suv.body_surface_area_dubois(80, 1.80) == pytest.approx(1.996421, abs=1e-6)
    assert suv.body_surface_area_dubois(60, 1.65) == pytest.approx(1.658657, abs=1e-6)


def test_vendor_factor_converts_to_sul(tmp_path: Path) -> None:
    # Philips SUVbw factor x LBM/W: the SUL must equal the BQML route's K1 value when the factor is K1's SUVbw factor.
    header = with_private(pet_header(units="CNTS", weight_kg=80, height_m=1.80, sex="M"), 0x7053,
                          "Philips PET Private Group", 0x00, "DS", "3.158130e-4")
    factors, _, _ = library_factors(write_pet(tmp_path / "pet", header), "lbm")
    assert sig6(factors[0]) == 2.43695e-4


# ------------------------------------------------------------------------------------------------ X1..X8
X_CASES = {
    "X1": (lambda: pet_header(weight_kg=0), None, suv_errors.PatientWeightError),
    "X2": (lambda: pet_header(dose_bq=None), None, suv_errors.InjectedDoseError),
    "X3": (lambda: pet_header(half_life_s=0), None, suv_errors.HalfLifeError),
    "X4": (lambda: pet_header(units="PROPCPS"), None, suv_errors.UnsupportedUnitsError),
    "X5": (lambda: pet_header(injection=dt.datetime(2024, 1, 1, 10, 30)), None, suv_errors.DecayTimeError),
    "X6": (lambda: pet_header(decay_correction="NONE"), None, suv_errors.DecayCorrectionError),
    "X7": (lambda: pet_header(units="CNTS"), None, suv_errors.PhilipsScaleFactorError),
    "X8": (lambda: pet_header(corrected_image=("DECY", "SCAT")), None, suv_errors.NotCorrectedError),
}
X_CODES = {"X1": "E2", "X2": "E4", "X3": "E5", "X4": "E7", "X5": "E11", "X6": "E10", "X7": "E8", "X8": "E9"}


@pytest.mark.parametrize("case", sorted(X_CASES))
def test_x_rejections(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    make_header, per_slice, error = X_CASES[case]
    pet = write_pet(tmp_path / "pet", make_header(), per_slice=per_slice)
    with pytest.raises(error) as info:
        library_factors(pet)
    assert info.value.code == X_CODES[case]
    assert str(pet) in str(info.value)  # the message names the file

    out_dir = tmp_path / "out"
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["suv", str(pet), str(out_dir / "suv.nii.gz")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("cipa-bundle: error:")
    assert f"[{X_CODES[case]}]" in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_x1_real_subprocess_exit_code_and_one_line_stderr(tmp_path: Path) -> None:
    pet = write_pet(tmp_path / "pet", pet_header(weight_kg=0))
    out = tmp_path / "out" / "suv.nii.gz"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-m", "cipa_bundle", "suv", str(pet), str(out)],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "[E2]" in lines[0] and "PatientWeight (0010,1030)" in lines[0] and "'0.0'" in lines[0]
    assert not out.parent.exists() or not any(out.parent.iterdir())
