"""PET -> CT resampling in physical space, the frame-of-reference check, and gated rigid refinement.

Geometry checks use hand-built volumes whose physical positions are computed here from the affines; the rigid tests
use the phantom (noise and PSF blur on) read back from its DICOM files, with the true displacement from truth.json.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from cipa_bundle.io.volume import Volume
from cipa_bundle.preprocessing.registration import (
    RigidGate,
    RigidResult,
    check_frame_of_reference,
    resample_to_reference,
    rigid_refine,
)
from cipa_bundle.preprocessing.suv_errors import FrameOfReferenceError

# PET: 4 mm voxels, axes flipped relative to RAS (the usual LPS-sorted DICOM layout), an off-grid origin.
PET_AFFINE = np.array([[-4.0, 0, 0, 61.3], [0, -4.0, 0, 47.9], [0, 0, 4.0, -30.2], [0, 0, 0, 1]])
# CT: 1.5 x 1.5 x 2 mm voxels in another orientation (i runs towards +R instead of -R) and origin.
CT_AFFINE = np.array([[1.5, 0, 0, -40.1], [0, -1.5, 0, 35.3], [0, 0, 2.0, -24.6], [0, 0, 0, 1]])


def _ras(affine: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def _centroid(volume: Volume) -> np.ndarray:
    ijk = np.argwhere(volume.array > 0).astype(np.float64)
    weights = volume.array[volume.array > 0].astype(np.float64)
    return _ras(volume.affine, (ijk * weights[:, None]).sum(0) / weights.sum())


def test_identity_resample_puts_point_source_in_place() -> None:
    pet = np.zeros((30, 30, 20), dtype=np.float32)
    source = np.array([14, 11, 9])
    pet[tuple(source)] = 100.0
    ct = Volume(np.zeros((60, 56, 30), dtype=np.float32), CT_AFFINE)
    out = resample_to_reference(Volume(pet, PET_AFFINE), ct)
    assert out.shape == ct.shape and out.array.dtype == np.float32
    np.testing.assert_array_equal(out.affine, CT_AFFINE)
    expected = _ras(PET_AFFINE, source.astype(np.float64))
    # Linear interpolation spreads the point into a symmetric tent: its centroid is the source position.
    assert np.all(np.abs(_centroid(out) - expected) <= 0.5 * np.abs(np.diag(CT_AFFINE)[:3]))
    peak = _ras(CT_AFFINE, np.argwhere(out.array == out.array.max())[0].astype(np.float64))
    assert np.all(np.abs(peak - expected) <= 0.5 * np.abs(np.diag(CT_AFFINE)[:3]) + 1e-9)


def test_outside_pet_field_of_view_is_zero_not_border() -> None:
    pet = Volume(np.full((10, 10, 10), 3.0, dtype=np.float32), PET_AFFINE)
    ct = Volume(np.zeros((90, 90, 50), dtype=np.float32), CT_AFFINE)  # larger than the PET in every direction
    out = resample_to_reference(pet, ct)
    points = _ras(CT_AFFINE, np.argwhere(np.ones(ct.shape, dtype=bool)).astype(np.float64))
    index = (points - PET_AFFINE[:3, 3]) / np.diag(PET_AFFINE)[:3]
    inside = np.all((index >= 0) & (index <= 9), axis=1).reshape(ct.shape)
    outside = np.all((index < -0.5) | (index > 9.5), axis=1).reshape(ct.shape)
    assert inside.any() and outside.any()
    np.testing.assert_allclose(out.array[inside], 3.0, rtol=1e-6)
    assert np.all(out.array[outside] == 0.0)
    filled = resample_to_reference(pet, ct, default_value=-1024.0)
    assert np.all(filled.array[outside] == -1024.0)


def test_nearest_keeps_labels_and_dtype() -> None:
    labels = np.zeros((30, 30, 20), dtype=np.uint8)
    labels[14:18, 6:10, 4:8] = 1
    labels[19:22, 11:14, 9:12] = 7
    out = resample_to_reference(Volume(labels, PET_AFFINE), Volume(np.zeros((60, 56, 30)), CT_AFFINE), "nearest")
    assert out.array.dtype == np.uint8
    assert set(np.unique(out.array)) == {0, 1, 7}
    # Nearest neighbour: every CT voxel takes the label of the PET voxel its centre falls in.
    points = _ras(CT_AFFINE, np.argwhere(np.ones(out.shape, dtype=bool)).astype(np.float64))
    index = np.rint((points - PET_AFFINE[:3, 3]) / np.diag(PET_AFFINE)[:3]).astype(int)
    valid = np.all((index >= 0) & (index < np.array(labels.shape)), axis=1)
    expected = np.zeros(len(points), dtype=np.uint8)
    expected[valid] = labels[tuple(index[valid].T)]
    assert np.mean(out.array.reshape(-1) == expected) > 0.999  # ties at exact voxel borders may round either way
    with pytest.raises(ValueError, match="interpolation"):
        resample_to_reference(Volume(labels, PET_AFFINE), Volume(np.zeros((4, 4, 4)), CT_AFFINE), "cubic")


def test_translation_transform_convention() -> None:
    # ITK convention: a transform maps CT (fixed) points to PET points, so translation t shows the PET moved by -t.
    pet = np.zeros((30, 30, 20), dtype=np.float32)
    pet[14, 11, 9] = 100.0
    t_lps = (6.0, -3.0, 8.0)
    result = RigidResult(t_lps, 0.0, (0.0, 0.0, 1.0), (0.0, 0.0, 0.0), True, "test", -1.0, -0.5, 0, 0.0, 0)
    ct = Volume(np.zeros((60, 56, 30), dtype=np.float32), CT_AFFINE)
    out = resample_to_reference(Volume(pet, PET_AFFINE), ct, transform=result)
    expected = _ras(PET_AFFINE, np.array([14.0, 11.0, 9.0])) - np.array([-t_lps[0], -t_lps[1], t_lps[2]])
    assert np.all(np.abs(_centroid(out) - expected) <= 0.5 * np.abs(np.diag(CT_AFFINE)[:3]))
    result.accepted = False  # a rejected result resamples with the identity
    unmoved = resample_to_reference(Volume(pet, PET_AFFINE), ct, transform=result)
    assert np.linalg.norm(_centroid(unmoved) - _ras(PET_AFFINE, np.array([14.0, 11.0, 9.0]))) < 1.0


def test_frame_of_reference_check() -> None:
    assert check_frame_of_reference("1.2.3", "1.2.3") == "1.2.3"
    with pytest.raises(FrameOfReferenceError, match=r"\(0020,0052\).*'1\.2\.3'.*'1\.2\.4'"):
        check_frame_of_reference("1.2.3", "1.2.4")
    with pytest.raises(FrameOfReferenceError):
        check_frame_of_reference("1.2.3", "")
    assert check_frame_of_reference("1.2.3", "1.2.4", allow_mismatch=True) is None


@pytest.mark.parametrize(
    ("translation", "rotation", "value", "accepted", "phrase"),
    [
        ((4.0, -3.0, 6.0), 0.2, -1.2, True, "applied"),
        ((9.9, 0.0, 0.0), 2.9, -1.2, True, "applied"),
        ((10.0, 0.0, 0.0), 0.0, -1.2, False, ">= 10 mm"),
        ((6.0, 6.0, 6.0), 0.0, -1.2, False, ">= 10 mm"),  # |t| = 10.4 mm although each axis is below 10
        ((1.0, 2.0, 0.0), 3.0, -1.2, False, ">= 3 deg"),
        ((4.0, -3.0, 6.0), 0.2, -1.0, False, "did not improve"),
        ((0.5, 0.5, 0.5), 0.3, -1.2, False, "registration precision"),
        ((0.5, 0.5, 0.5), 0.6, -1.2, True, "applied"),  # a real rotation is applied even without translation
        ((float("nan"), 0.0, 0.0), 0.0, -1.2, False, "diverged"),
    ],
)
def test_rigid_gate(translation: tuple, rotation: float, value: float, accepted: bool, phrase: str) -> None:
    decision, reason = RigidGate().decide(translation, rotation, value, metric_identity=-1.0)
    assert decision is accepted and phrase in reason


def test_rigid_gate_limits_are_configurable() -> None:
    strict = RigidGate(max_translation_mm=5.0, min_translation_mm=2.0)
    assert strict.decide((4.0, 3.0, 0.0), 0.1, -1.2, -1.0) == (False, "|t| = 5.00 mm >= 5 mm: identity kept")
    assert not strict.decide((1.5, 0.0, 0.0), 0.1, -1.2, -1.0)[0]  # 1.5 mm is now below the precision limit
    assert RigidGate().decide((1.5, 0.0, 0.0), 0.1, -1.2, -1.0)[0]


# --------------------------------------------------------------------------------------------------- rigid
def _study(root: Path, name: str, shift: tuple[float, float, float]) -> tuple[Volume, Volume, dict]:
    from cipa_bundle.synthetic.phantom import make_phantom_case
    from cipa_bundle.io.dicom import read_series
    from cipa_bundle.preprocessing.suv_series import pet_series_to_suv

    case = make_phantom_case(root, name, seed=4, shift=shift, vendor="siemens")
    ct = read_series(case / "dicom" / "ct").volume
    suv, _ = pet_series_to_suv(case / "dicom" / "pet")
    return ct, suv, json.loads((case / "truth.json").read_text())


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Volume, Volume, dict]]:
    root = tmp_path_factory.mktemp("rigid")
    return {
        "shifted": _study(root, "shifted", (4.0, -3.0, 6.0)),
        "aligned": _study(root, "aligned", (0.0, 0.0, 0.0)),
        "far": _study(root, "far", (13.0, 0.0, 0.0)),
    }


def test_rigid_recovers_known_shift(studies: dict) -> None:
    ct, suv, truth = studies["shifted"]
    result = rigid_refine(ct, suv, seed=0)
    error = np.asarray(result.translation_mm) - np.asarray(truth["shift_lps_mm"])
    assert np.linalg.norm(error) < 1.0, (result.translation_mm, result.reason)
    assert result.rotation_deg < 0.5
    assert result.accepted and "applied" in result.reason
    assert result.metric_value < result.metric_identity
    record = result.to_dict()
    assert record["translation_norm_mm"] == pytest.approx(math.sqrt(4**2 + 3**2 + 6**2), abs=1.0)


def test_rigid_without_shift_keeps_identity_deterministically(studies: dict) -> None:
    ct, suv, _ = studies["aligned"]
    first = rigid_refine(ct, suv, seed=5)
    second = rigid_refine(ct, suv, seed=5)
    np.testing.assert_allclose(first.translation_mm, second.translation_mm, rtol=0, atol=1e-6)
    assert first.rotation_deg == pytest.approx(second.rotation_deg, abs=1e-6)
    assert first.translation_norm_mm < 1.0 and first.rotation_deg < 0.5
    assert not first.accepted and "identity kept" in first.reason
    assert first.applied_transform() is None


def test_rigid_gate_rejects_large_translation(studies: dict) -> None:
    ct, suv, truth = studies["far"]
    result = rigid_refine(ct, suv, seed=0)
    assert result.translation_mm[0] == pytest.approx(truth["shift_lps_mm"][0], abs=1.5)
    assert not result.accepted and ">= 10 mm" in result.reason
