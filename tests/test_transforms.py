"""MONAI intensity transforms: CT window, SUV scaling, CIPA input normalisation, DICOM PET -> SUV loader.

Expected numbers are hand-worked (the PET-CT notes, section 4.2) or the official loader's formula evaluated directly.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirst

from cipa_bundle.preprocessing.transforms import (
    DEFAULT_CT_WINDOW_HU,
    DEFAULT_SUV_MAX,
    LoadDicomPETSUV,
    LoadDicomPETSUVd,
    NormalizeCIPAInput,
    NormalizeCIPAInputd,
    ScaleSUV,
    ScaleSUVd,
    WindowCT,
    WindowCTd,
)

REPO = Path(__file__).resolve().parents[1]


def test_ct_window_hand_worked_values() -> None:
    # Notes 4.2: u8 = 255 (clip(HU, -1200, -200) + 1200) / 1000, so [0, 1] = (clip + 1200) / 1000.
    hu = torch.tensor([-3024.0, -1200.0, -1000.0, -850.0, -700.0, -600.0, -200.0, 40.0, 1000.0])
    expected = torch.tensor([0.0, 0.0, 0.2, 0.35, 0.5, 0.6, 1.0, 1.0, 1.0])
    out = WindowCT()(hu)
    assert DEFAULT_CT_WINDOW_HU == (-1200.0, -200.0)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.as_tensor() if isinstance(out, MetaTensor) else out, expected, atol=1e-6, rtol=0)
    # The 8-bit values of the notes: -850 -> 89.25, -700 -> 127.5.
    assert float(out[3]) * 255 == pytest.approx(89.25, abs=1e-4)
    assert float(out[4]) * 255 == pytest.approx(127.5, abs=1e-4)


def test_ct_window_custom_and_invalid() -> None:
    out = WindowCT(-1350, 150)(np.array([-1350.0, -600.0, 150.0]))
    np.testing.assert_allclose(np.asarray(out), [0.0, 0.5, 1.0], atol=1e-6)
    with pytest.raises(ValueError, match="hu_max"):
        WindowCT(-200, -1200)


def test_suv_scale_hand_worked_values() -> None:
    # Notes 4.2 with SUV_max = 10: SUV 2.5 -> 63.75 -> 64 (8-bit), SUV 12 -> 255.
    assert DEFAULT_SUV_MAX == 10.0
    out = np.asarray(ScaleSUV()(np.array([-0.5, 0.0, 2.5, 10.0, 12.0])))
    np.testing.assert_allclose(out, [0.0, 0.0, 0.25, 1.0, 1.0], atol=1e-7)
    assert round(out[2] * 255) == 64 and round(out[4] * 255) == 255
    np.testing.assert_allclose(np.asarray(ScaleSUV(suv_max=5.0)(np.array([2.5, 7.0]))), [0.5, 1.0], atol=1e-7)
    with pytest.raises(ValueError, match="suv_max"):
        ScaleSUV(0.0)
    with pytest.raises(ValueError, match="suv_max"):
        ScaleSUVd("pet", suv_max=-1.0)


def test_normalize_matches_official_loader_formula() -> None:
    # The official loader: v / 255 * 3.2 - 1.6 on 8-bit values. Our inputs are already v / 255.
    v = np.arange(256, dtype=np.float64)
    official = v / 255.0 * 3.2 - 1.6
    ours = np.asarray(NormalizeCIPAInput(dtype=np.float64)(v / 255.0))
    np.testing.assert_allclose(ours, official, atol=1e-12)
    np.testing.assert_allclose(np.asarray(NormalizeCIPAInput()(np.array([0.0, 0.5, 1.0]))), [-1.6, 0.0, 1.6], atol=1e-6)


def test_dictionary_twins_match_arrays_and_keep_metadata() -> None:
    affine = torch.diag(torch.tensor([-0.9, -0.9, 2.0, 1.0], dtype=torch.float64))
    ct = MetaTensor(torch.linspace(-1500, 300, 24).reshape(1, 2, 3, 4), affine=affine)
    pet = MetaTensor(torch.linspace(-1, 14, 24).reshape(1, 2, 3, 4), affine=affine)
    chain = Compose([WindowCTd("ct"), ScaleSUVd("pet"), NormalizeCIPAInputd(["ct", "pet"])])
    out = chain({"ct": ct, "pet": pet})
    torch.testing.assert_close(out["ct"].as_tensor(), NormalizeCIPAInput()(WindowCT()(ct)).as_tensor())
    torch.testing.assert_close(out["pet"].as_tensor(), NormalizeCIPAInput()(ScaleSUV()(pet)).as_tensor())
    for key in ("ct", "pet"):
        assert isinstance(out[key], MetaTensor)
        torch.testing.assert_close(out[key].affine, affine)
        assert float(out[key].min()) >= -1.6 - 1e-6 and float(out[key].max()) <= 1.6 + 1e-6


def _float_constants(path: Path) -> set[float]:
    tree = ast.parse(path.read_text())
    floats = (node.value for node in ast.walk(tree) if isinstance(node, ast.Constant))
    return {abs(v) for v in floats if isinstance(v, float)}


def _json_numbers(obj: object) -> set[float]:
    if isinstance(obj, dict):
        return set().union(*(_json_numbers(v) for v in obj.values())) if obj else set()
    if isinstance(obj, list):
        return set().union(*(_json_numbers(v) for v in obj)) if obj else set()
    return {abs(float(obj))} if isinstance(obj, (int, float)) and not isinstance(obj, bool) else set()


def test_network_normalisation_lives_in_one_place() -> None:
    # Only transforms.py may hold both constants of x * 3.2 - 1.6 (docstrings do not count: they are strings).
    holders = [
        path.relative_to(REPO).as_posix()
        for path in sorted((REPO / "cipa_bundle").rglob("*.py"))
        if {3.2, 1.6} <= _float_constants(path)
    ]
    holders += [
        path.relative_to(REPO).as_posix()
        for path in sorted((REPO / "configs").rglob("*.json"))
        if {3.2, 1.6} <= _json_numbers(json.loads(path.read_text()))
    ]
    assert holders == ["cipa_bundle/preprocessing/transforms.py"]


@pytest.fixture(scope="module")
def phantom_pet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from cipa_bundle.synthetic.phantom import make_phantom_case

    case = make_phantom_case(tmp_path_factory.mktemp("phantom"), "t", seed=3, vendor="ge", noise=False, blur=False)
    return case / "dicom" / "pet", json.loads((case / "truth.json").read_text())


def test_load_dicom_pet_suv(phantom_pet: tuple[Path, dict]) -> None:
    folder, truth = phantom_pet
    image = LoadDicomPETSUV()(folder)
    assert isinstance(image, MetaTensor) and image.dtype == torch.float32
    assert tuple(image.shape) == tuple(truth["pet"]["shape"])
    np.testing.assert_allclose(image.affine.numpy(), np.asarray(truth["pet"]["affine_ras"]), atol=1e-4)
    assert image.meta["suv_provenance"]["factor"] == pytest.approx(truth["suv_factor"], rel=1e-9)
    # Every structure's SUV at a PET voxel wholly inside it (LPS -> RAS -> voxel index through the affine).
    inverse = np.linalg.inv(image.affine.numpy())
    for structure in truth["structures"]:
        x, y, z = structure["pet_probe_lps_mm"]
        ijk = np.rint(inverse @ np.array([-x, -y, z, 1.0]))[:3].astype(int)
        assert float(image[tuple(ijk)]) == pytest.approx(structure["suv"], rel=5e-3), structure["name"]
    # MONAI's EnsureChannelFirst understands the loader's metadata; the dictionary twin gives the same tensor.
    assert tuple(EnsureChannelFirst()(image).shape) == (1, *truth["pet"]["shape"])
    twin = LoadDicomPETSUVd("pet", ensure_channel_first=True)({"pet": folder})["pet"]
    assert tuple(twin.shape) == (1, *truth["pet"]["shape"])
    torch.testing.assert_close(twin[0].as_tensor(), image.as_tensor())


def test_load_dicom_pet_suv_rejects_ct(tmp_path: Path, phantom_pet: tuple[Path, dict]) -> None:
    from cipa_bundle.errors import CipaInputError

    with pytest.raises(CipaInputError, match="PT|PET"):
        LoadDicomPETSUV()(phantom_pet[0].parent / "ct")
    with pytest.raises(ValueError, match="kind"):
        LoadDicomPETSUV(kind="suv")
