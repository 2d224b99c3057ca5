"""Axial slice extraction, PCLT20K PNG loading and tumour-aware slice sampling."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import Dataset, MetaTensor, load_decathlon_datalist
from PIL import Image

from cipa_bundle.data.slices import (
    ExtractAxialSlice,
    ExtractAxialSliced,
    LoadPCLT20Kd,
    LoadPETCTSliced,
    ReadGrayPNG,
    sample_axial_slices,
    write_slice_datalist,
)
from cipa_bundle.errors import CipaInputError
from cipa_bundle.io.volume import axial_axis

NI, NJ, NK = 5, 4, 6
LPS_LIKE = np.diag([-0.8, -0.9, 2.0, 1.0])  # what convert writes for a standard axial DICOM series: i -> L, j -> P
LPS_LIKE[:3, 3] = (10.0, 20.0, -30.0)


def _volume(channels: int | None = None) -> np.ndarray:
    """Distinct values everywhere, so every voxel can be located after slicing."""
    shape = (NI, NJ, NK) if channels is None else (NI, NJ, NK, channels)
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape)


def _save(path: Path, data: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


# ------------------------------------------------------------------------------------------- orientation
def test_axial_axis_follows_the_affine():
    assert axial_axis(LPS_LIKE) == 2
    coronal = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    assert axial_axis(coronal) == 1


def test_fused_image_slice_is_channel_first_display_view(tmp_path):
    data = _volume(2)  # (I, J, K, 2) = convert's [CT, PET]
    path = _save(tmp_path / "image.nii.gz", data, LPS_LIKE)
    out = ExtractAxialSlice()(path, 3)
    assert isinstance(out, MetaTensor) and out.shape == (2, NJ, NI)
    # LPS voxel order is already the display orientation: rows = j, columns = i, no flips
    np.testing.assert_array_equal(out[0].numpy(), data[:, :, 3, 0].T)
    np.testing.assert_array_equal(out[1].numpy(), data[:, :, 3, 1].T)
    assert out.meta["slice_index"] == 3 and out.meta["filename_or_obj"] == str(path)


@pytest.mark.parametrize(
    "affine",
    [
        np.diag([1.5, 1.5, 3.0, 1.0]),  # RAS voxel order: both in-plane axes must flip
        np.array([[0, 1.0, 0, 0], [-1.0, 0, 0, 0], [0, 0, 2.0, 0], [0, 0, 0, 1]]),  # i -> P, j -> R
        np.diag([-1.0, 1.0, -2.5, 1.0]),  # i -> L, j -> A, slices run inferior
    ],
)
def test_display_orientation_from_any_in_plane_order(tmp_path, affine):
    data = _volume()
    path = _save(tmp_path / "ct.nii.gz", data, affine)
    k = 2
    out = ExtractAxialSlice()(path, k)[0].numpy()
    out_affine = ExtractAxialSlice()(path, k).affine.numpy()
    # Every displayed pixel maps (through the slice affine) onto the volume voxel holding the same value.
    for r in range(out.shape[0]):
        for c in range(out.shape[1]):
            i, j, kk = np.argwhere(data == out[r, c])[0]
            assert kk == k
            np.testing.assert_allclose(out_affine @ [r, c, 0, 1], affine @ [i, j, k, 1], atol=1e-9)
    # Display convention: going down a column moves posterior (RAS y falls), going right moves to the
    # patient's left (RAS x falls).
    row_step = out_affine[:3, 0]
    col_step = out_affine[:3, 1]
    assert row_step[1] < 0 and abs(row_step[0]) < 1e-9
    assert col_step[0] < 0 and abs(col_step[1]) < 1e-9


def test_loaded_volume_gives_the_same_slice_as_the_path(tmp_path):
    data = _volume(2)
    path = _save(tmp_path / "image.nii.gz", data, LPS_LIKE)
    from_path = ExtractAxialSlice()(path, 4)
    loaded = MetaTensor(torch.as_tensor(np.moveaxis(data, -1, 0)), affine=torch.as_tensor(LPS_LIKE))
    np.testing.assert_array_equal(ExtractAxialSlice()(loaded, 4).numpy(), from_path.numpy())
    # a plain array carries no affine and is taken to be in DICOM (LPS) voxel order
    plain = np.moveaxis(data, -1, 0)
    np.testing.assert_array_equal(ExtractAxialSlice()(plain, 4).numpy(), from_path.numpy())
    # display=False keeps the stored (C, I, J) order, as SliceInferer would see it
    raw = ExtractAxialSlice(display=False)(path, 4)
    np.testing.assert_array_equal(raw.numpy(), np.moveaxis(data[:, :, 4, :], -1, 0))


def test_extract_errors(tmp_path):
    path = _save(tmp_path / "ct.nii.gz", _volume(), LPS_LIKE)
    with pytest.raises(CipaInputError, match="slice 6"):
        ExtractAxialSlice()(path, NK)
    with pytest.raises(CipaInputError, match="does not exist"):
        ExtractAxialSlice()(tmp_path / "missing.nii.gz", 0)
    coronal = np.array([[1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    with pytest.raises(CipaInputError, match="axial"):
        ExtractAxialSlice()(_save(tmp_path / "cor.nii.gz", _volume(), coronal), 0)


def test_dictionary_transform_on_image_and_label(tmp_path):
    image = _save(tmp_path / "image.nii.gz", _volume(2), LPS_LIKE)
    label_data = np.zeros((NI, NJ, NK), np.uint8)
    label_data[1, 2, 3] = 1
    label = _save(tmp_path / "label.nii.gz", label_data, LPS_LIKE)
    out = ExtractAxialSliced(["image", "label"])({"image": str(image), "label": str(label), "slice": 3})
    assert out["image"].shape == (2, NJ, NI) and out["label"].shape == (1, NJ, NI)
    assert out["label"][0, 2, 1] == 1 and out["label"].sum() == 1  # (i=1, j=2) -> row 2, column 1
    with pytest.raises(CipaInputError, match="'slice'"):
        ExtractAxialSliced(["image"])({"image": str(image)})


# ------------------------------------------------------------------------------------------- PCLT20K PNGs
def _png(path: Path, array: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)
    return str(path)


def test_pclt20k_pair_is_ct_then_pet_in_unit_range(tmp_path):
    ct = np.full((6, 4), 51, np.uint8)  # 51 / 255 = 0.2
    ct[1, 3] = 255  # non-square and asymmetric: rows and columns must not be swapped
    pet = np.zeros((6, 4), np.uint8)
    pet[5, 0] = 102  # 0.4
    mask = np.zeros((6, 4), np.uint8)
    mask[2, 1], mask[2, 2], mask[3, 3] = 255, 128, 127  # >= 128 is tumour (the loader's /255 >= 0.5)
    item = {
        "ct": _png(tmp_path / "ct.png", ct),
        "pet": _png(tmp_path / "pet.png", pet),
        "label": _png(tmp_path / "mask.png", mask),
    }
    out = LoadPCLT20Kd()(item)
    image, label = out["image"], out["label"]
    assert image.shape == (2, 6, 4) and label.shape == (1, 6, 4)
    assert image[0, 0, 0].item() == pytest.approx(0.2) and image[0, 1, 3].item() == pytest.approx(1.0)
    assert image[1, 5, 0].item() == pytest.approx(0.4) and image[1].sum().item() == pytest.approx(0.4)
    assert label[0].nonzero().tolist() == [[2, 1], [2, 2]]
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0


def test_pclt20k_errors(tmp_path):
    ct = _png(tmp_path / "ct.png", np.zeros((6, 4)))
    pet = _png(tmp_path / "pet.png", np.zeros((6, 5)))
    with pytest.raises(CipaInputError, match="same size"):
        LoadPCLT20Kd()({"ct": ct, "pet": pet})
    with pytest.raises(CipaInputError, match="does not exist"):
        ReadGrayPNG()(tmp_path / "none.png")
    sixteen = tmp_path / "deep.png"
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(sixteen)
    with pytest.raises(CipaInputError, match="8-bit"):
        ReadGrayPNG()(sixteen)


# ------------------------------------------------------------------------------------------- any item kind
def test_load_petct_slice_from_separate_hu_and_suv_volumes(tmp_path):
    # autoPET-style item: CT in HU and PET in SUV on one grid. Hand-computed: window [-1200, -200] HU and SUV / 10.
    ct = np.full((NI, NJ, NK), -700.0, np.float32)  # -> 0.5
    ct[1, 2, 3] = 300.0  # above the window -> 1
    pet = np.zeros((NI, NJ, NK), np.float32)
    pet[4, 0, 3] = 2.5  # -> 0.25
    pet[0, 3, 3] = 14.0  # above SUV 10 -> 1
    label = np.zeros((NI, NJ, NK), np.uint8)
    label[4, 0, 3] = 1
    item = {
        "ct": str(_save(tmp_path / "CTres.nii.gz", ct, LPS_LIKE)),
        "pet": str(_save(tmp_path / "SUV.nii.gz", pet, LPS_LIKE)),
        "label": str(_save(tmp_path / "SEG.nii.gz", label, LPS_LIKE)),
        "slice": 3,
    }
    out = LoadPETCTSliced()(item)
    image = out["image"]
    assert image.shape == (2, NJ, NI) and out["label"].shape == (1, NJ, NI)
    assert "ct" not in out and "pet" not in out
    # LPS voxel order is the display view: (i, j) -> row j, column i
    assert image[0, 0, 0].item() == pytest.approx(0.5) and image[0, 2, 1].item() == pytest.approx(1.0)
    assert image[1, 0, 4].item() == pytest.approx(0.25) and image[1, 3, 0].item() == pytest.approx(1.0)
    assert image[1].sum().item() == pytest.approx(1.25)
    assert out["label"][0].nonzero().tolist() == [[0, 4]]
    np.testing.assert_allclose(image.affine.numpy(), ExtractAxialSlice()(item["ct"], 3).affine.numpy())
    # A custom window and SUV scale are honoured.
    custom = LoadPETCTSliced(ct_window_hu=(-700.0, 300.0), suv_max=5.0)(item)["image"]
    assert custom[0, 0, 0].item() == pytest.approx(0.0) and custom[1, 0, 4].item() == pytest.approx(0.5)


def test_load_petct_slice_from_fused_image_and_pclt20k_pngs(tmp_path):
    fused = _save(tmp_path / "image.nii.gz", _volume(2), LPS_LIKE)
    item = {"image": str(fused), "slice": 2}
    got = LoadPETCTSliced()(item)["image"]
    np.testing.assert_array_equal(got.numpy(), ExtractAxialSliced(["image"])(item)["image"].numpy())
    pngs = {
        "ct": _png(tmp_path / "p_CT.png", np.full((6, 4), 51)),
        "pet": _png(tmp_path / "p_PET.png", np.full((6, 4), 102)),
        "label": _png(tmp_path / "p_mask.png", np.zeros((6, 4))),
    }
    out = LoadPETCTSliced()(pngs)
    np.testing.assert_array_equal(out["image"].numpy(), LoadPCLT20Kd()(pngs)["image"].numpy())
    assert out["image"][1, 0, 0].item() == pytest.approx(0.4)


def test_load_petct_slice_errors_name_the_files(tmp_path):
    ct = _save(tmp_path / "CTres.nii.gz", np.zeros((NI, NJ, NK), np.float32), LPS_LIKE)
    pet = _save(tmp_path / "SUV.nii.gz", np.zeros((NI + 1, NJ, NK), np.float32), LPS_LIKE)
    with pytest.raises(CipaInputError, match=r"CTres\.nii\.gz.*SUV\.nii\.gz.*resampled onto the CT grid"):
        LoadPETCTSliced()({"ct": str(ct), "pet": str(pet), "slice": 1})
    with pytest.raises(CipaInputError, match="expected 'image'"):
        LoadPETCTSliced()({"ct": str(ct), "slice": 1})
    two_channels = _save(tmp_path / "SUV2.nii.gz", np.zeros((NI, NJ, NK, 2), np.float32), LPS_LIKE)
    expected = r"CTres\.nii\.gz .* 1 channel\(s\) and PET .*SUV2\.nii\.gz has 2; expected one"
    with pytest.raises(CipaInputError, match=expected):
        LoadPETCTSliced()({"ct": str(ct), "pet": str(two_channels), "slice": 1})


# ------------------------------------------------------------------------------------------- sampling
def _case(root: Path, name: str, tumour_slices: list[int], depth: int = 20) -> dict[str, str]:
    label = np.zeros((4, 4, depth), np.uint8)
    for k in tumour_slices:
        label[1, 2, k] = 1
    _save(root / name / "label.nii.gz", label, LPS_LIKE)
    _save(root / name / "image.nii.gz", np.zeros((4, 4, depth, 2), np.float32), LPS_LIKE)
    return {"image": f"{name}/image.nii.gz", "label": f"{name}/label.nii.gz"}


def test_sampling_keeps_every_tumour_slice_and_a_seeded_share(tmp_path):
    cases = [_case(tmp_path, "a", [2, 3, 7]), _case(tmp_path, "b", [0])]
    items = sample_axial_slices(cases, tumour_free_fraction=0.25, seed=5, base_dir=tmp_path)
    a = [it["slice"] for it in items if it["label"] == "a/label.nii.gz"]
    b = [it["slice"] for it in items if it["label"] == "b/label.nii.gz"]
    # a: 17 tumour-free slices -> round(4.25) = 4 kept; b: 19 -> round(4.75) = 5 kept
    assert {2, 3, 7} <= set(a) and len(a) == 3 + 4 and a == sorted(a)
    assert 0 in b and len(b) == 1 + 5
    assert all(it["image"].endswith("image.nii.gz") for it in items)  # other keys travel with each slice
    assert sample_axial_slices(cases, 0.25, seed=5, base_dir=tmp_path) == items  # reproducible
    other_seeds = [
        [it["slice"] for it in sample_axial_slices(cases[:1], 0.25, seed=s, base_dir=tmp_path)] for s in range(6, 11)
    ]
    assert any(choice != a for choice in other_seeds)
    # a case's choice does not depend on which other cases are listed
    assert [it["slice"] for it in sample_axial_slices(cases[:1], 0.25, seed=5, base_dir=tmp_path)] == a
    only_tumour = sample_axial_slices(cases, 0.0, base_dir=tmp_path)
    assert [it["slice"] for it in only_tumour] == [2, 3, 7, 0]
    assert len(sample_axial_slices(cases, 1.0, base_dir=tmp_path)) == 40


def test_sampling_errors(tmp_path):
    cases = [_case(tmp_path, "a", [1])]
    with pytest.raises(CipaInputError, match="tumour_free_fraction"):
        sample_axial_slices(cases, 1.5, base_dir=tmp_path)
    with pytest.raises(CipaInputError, match="does not exist"):
        sample_axial_slices([{"image": "x", "label": "x/label.nii.gz"}], base_dir=tmp_path)
    with pytest.raises(CipaInputError, match="'label'"):
        sample_axial_slices([{"image": "x"}], base_dir=tmp_path)


def test_slice_datalist_feeds_a_monai_dataset(tmp_path):
    cases = [_case(tmp_path, "a", [2, 3]), _case(tmp_path, "b", [5])]
    doc = {"training": cases[:1], "validation": cases[1:], "testing": cases[1:]}
    (tmp_path / "datalist.json").write_text(json.dumps(doc))
    out = write_slice_datalist(tmp_path / "datalist.json", tmp_path / "slices.json", tumour_free_fraction=0.0)
    written = json.loads(out.read_text())
    assert written["testing"] == cases[1:]  # 3-D evaluation keeps whole volumes
    items = load_decathlon_datalist(out, data_list_key="training", base_dir=tmp_path)
    ds = Dataset(items, transform=ExtractAxialSliced(["image", "label"]))
    assert len(ds) == 2
    for sample in ds:
        assert sample["image"].shape == (2, 4, 4)
        assert sample["label"].sum() == 1  # each sampled slice holds its tumour voxel
