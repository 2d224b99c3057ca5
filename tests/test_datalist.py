"""Datalist builders on tiny PCLT20K, convert-study and autoPET trees built in tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from PIL import Image

from cipa_bundle.cli import main
from cipa_bundle.data.datalist import (
    build_autopet_datalist,
    build_datalist,
    build_pclt20k_datalist,
    build_studies_datalist,
    read_id_list,
    split_patients,
)
from cipa_bundle.errors import CipaInputError

AFFINE = np.diag([-1.0, -1.0, 2.0, 1.0])


# ------------------------------------------------------------------------------------------- PCLT20K
def _pclt_item(root: Path, item_id: str, size: tuple[int, int] = (8, 8)) -> None:
    patient = item_id.split("_")[0]
    for suffix in ("CT", "PET", "mask"):
        path = root / patient / f"{item_id}_{suffix}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.zeros(size, np.uint8)).save(path)


def _pclt_tree(root: Path) -> tuple[list[str], list[str]]:
    train = [f"{p:04d}_{s}" for p in range(1, 6) for s in (10, 11)]  # 5 patients, 2 slices each
    test = ["0007_1", "0008_1", "0008_2"]
    for item_id in train + test:
        _pclt_item(root, item_id)
    # CRLF endings, a blank line and no trailing newline: the official loader would cut the last id to "0005_1".
    (root / "train.txt").write_bytes(("\r\n".join(train[:4]) + "\r\n\r\n" + "\n".join(train[4:])).encode())
    (root / "test.txt").write_text("\n".join(test) + "\n")
    return train, test


def _patients(items: list[dict], key: str = "ct") -> set[str]:
    return {item[key].split("/")[0] for item in items}


def test_pclt20k_split_is_by_patient_from_train_txt(tmp_path):
    train, test = _pclt_tree(tmp_path)
    doc = build_pclt20k_datalist(tmp_path, val_fraction=0.2, seed=0)
    assert doc["numTraining"] + doc["numValidation"] == len(train) and doc["numTest"] == 3
    # round(0.2 * 5) = 1 validation patient, both of its slices, none of its slices in training
    assert len(doc["validation_patients"]) == 1 and doc["numValidation"] == 2
    assert _patients(doc["validation"]) == set(doc["validation_patients"])
    assert not _patients(doc["training"]) & _patients(doc["validation"])
    assert _patients(doc["training"]) | _patients(doc["validation"]) == {f"{p:04d}" for p in range(1, 6)}
    # the test list is exactly test.txt and never feeds validation
    assert [it["ct"] for it in doc["testing"]] == [f"{i.split('_')[0]}/{i}_CT.png" for i in test]
    assert not _patients(doc["validation"]) & {"0007", "0008"}
    # the last id survives the missing trailing newline
    assert any(it["label"] == "0005/0005_11_mask.png" for it in doc["training"] + doc["validation"])
    assert doc["modality"] == {"0": "CT", "1": "PET"}


def test_pclt20k_seeded_and_written_relative(tmp_path):
    _pclt_tree(tmp_path)
    out = build_datalist("pclt20k", tmp_path, tmp_path / "lists" / "pclt.json", val_fraction=0.4, seed=3)
    doc = json.loads(out.read_text())
    assert doc == build_pclt20k_datalist(tmp_path, 0.4, 3)  # reproducible for a seed
    picks = {tuple(build_pclt20k_datalist(tmp_path, 0.4, s)["validation_patients"]) for s in range(8)}
    assert len(picks) > 1  # the seed matters
    assert all(not Path(v).is_absolute() for it in doc["training"] for v in it.values())
    items = load_decathlon_datalist(out, data_list_key="validation", base_dir=tmp_path)
    assert all(Path(it[k]).is_file() for it in items for k in ("ct", "pet", "label"))


def test_read_id_list_strips_properly(tmp_path):
    (tmp_path / "ids.txt").write_bytes(b"\xef\xbb\xbfa_1\r\n  b_2 \n\nc_3")
    with pytest.warns(UserWarning, match="more than once"):
        (tmp_path / "dup.txt").write_text("a_1\na_1\n")
        assert read_id_list(tmp_path / "dup.txt") == ["a_1"]
    assert read_id_list(tmp_path / "ids.txt") == ["a_1", "b_2", "c_3"]


def test_pclt20k_errors_name_the_case(tmp_path):
    _pclt_tree(tmp_path)
    (tmp_path / "0003" / "0003_10_PET.png").unlink()
    with pytest.raises(CipaInputError, match="0003_10.*missing"):
        build_pclt20k_datalist(tmp_path)
    _pclt_item(tmp_path, "0003_10")
    Image.fromarray(np.zeros((8, 9), np.uint8)).save(tmp_path / "0002" / "0002_11_mask.png")
    with pytest.raises(CipaInputError, match="0002_11.*sizes differ"):
        build_pclt20k_datalist(tmp_path)
    _pclt_item(tmp_path, "0002_11")
    (tmp_path / "test.txt").write_text("../outside_1\n")
    with pytest.raises(CipaInputError, match="outside"):
        build_pclt20k_datalist(tmp_path)
    (tmp_path / "test.txt").unlink()
    with pytest.raises(CipaInputError, match="test.txt"):
        build_pclt20k_datalist(tmp_path)


def test_pclt20k_warns_when_test_patients_overlap(tmp_path):
    _pclt_tree(tmp_path)
    _pclt_item(tmp_path, "0001_99")
    (tmp_path / "test.txt").write_text("0001_99\n")
    with pytest.warns(UserWarning, match="both train.txt and test.txt"):
        build_pclt20k_datalist(tmp_path)


def test_split_patients_rules():
    train, val = split_patients(["p3", "p1", "p2", "p1"], 0.5, seed=1)
    assert sorted(train + val) == ["p1", "p2", "p3"] and len(val) == 2 and not set(train) & set(val)
    assert split_patients(["a", "b"], 0.01, 0)[1] != []  # a positive fraction holds out at least one patient
    assert len(split_patients(["a", "b"], 0.9, 0)[0]) == 1  # and leaves at least one for training
    assert split_patients(["a"], 0.0, 0) == (["a"], [])
    with pytest.raises(CipaInputError, match="val_fraction"):
        split_patients(["a", "b"], 1.0, 0)
    with pytest.raises(CipaInputError, match="at least 2"):
        split_patients(["a"], 0.2, 0)


# ------------------------------------------------------------------------------------------- 3-D studies
def _nii(path: Path, shape: tuple[int, ...], affine: np.ndarray = AFFINE) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros(shape, np.float32), affine), str(path))


def _study(root: Path, case: str, shape=(4, 4, 3), channels: int = 2, label_shape=None) -> None:
    _nii(root / case / "image.nii.gz", (*shape, channels))
    _nii(root / case / "label.nii.gz", label_shape or shape)


def test_studies_group_a_patients_studies(tmp_path):
    for case in ("p1/s1", "p1/s2", "p2/s1", "p3/s1", "p4/s1"):
        _study(tmp_path, case)
    doc = build_studies_datalist(tmp_path, val_fraction=0.25, seed=2)
    assert doc["numTraining"] + doc["numValidation"] == 5 and doc["numTest"] == 0
    train, val = _patients(doc["training"], "image"), _patients(doc["validation"], "image")
    assert len(val) == 1 and not train & val
    assert doc["training"][0] == {
        "image": f"{sorted(train)[0]}/s1/image.nii.gz",
        "label": f"{sorted(train)[0]}/s1/label.nii.gz",
    }
    test = build_studies_datalist(tmp_path, 0.25, 2, test_list=_ids(tmp_path, ["p1"]))
    assert [it["image"] for it in test["testing"]] == ["p1/s1/image.nii.gz", "p1/s2/image.nii.gz"]
    assert "p1" not in _patients(test["training"] + test["validation"], "image")


def _ids(root: Path, ids: list[str]) -> Path:
    path = root / "test_ids.txt"
    path.write_text("\n".join(ids) + "\n")
    return path


def test_studies_errors_name_the_case(tmp_path):
    _study(tmp_path, "c1")
    _study(tmp_path, "c2", label_shape=(4, 4, 2))
    with pytest.raises(CipaInputError, match="c2.*spatial shape"):
        build_studies_datalist(tmp_path, 0.0)
    _study(tmp_path, "c2", channels=1)
    with pytest.raises(CipaInputError, match=r"c2.*\(I, J, K, 2\)"):
        build_studies_datalist(tmp_path, 0.0)
    _study(tmp_path, "c2")
    (tmp_path / "c1" / "label.nii.gz").unlink()
    with pytest.raises(CipaInputError, match="c1.*label.*missing"):
        build_studies_datalist(tmp_path, 0.0)
    with pytest.raises(CipaInputError, match="outside"):
        build_studies_datalist(tmp_path, 0.0, label_name="../../label.nii.gz")
    with pytest.raises(CipaInputError, match="match no case"):
        build_studies_datalist(tmp_path, 0.0, label_name="label.nii.gz", test_list=_ids(tmp_path, ["zz"]))
    with pytest.raises(CipaInputError, match="one folder per case"):
        build_studies_datalist(tmp_path / "c1")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CipaInputError, match="no image.nii.gz"):
        build_studies_datalist(tmp_path / "empty")


def test_studies_of_different_ct_windows_are_refused(tmp_path):
    for case in ("c1", "c2", "c3"):
        _study(tmp_path, case)
    record = {"image": {"ct_window_hu": [-1200.0, -200.0]}}
    (tmp_path / "c1" / "provenance.json").write_text(json.dumps(record))
    (tmp_path / "c2" / "provenance.json").write_text(json.dumps(record))
    assert len(build_studies_datalist(tmp_path, 0.0)["training"]) == 3  # one window (c3 has no record)
    (tmp_path / "c2" / "provenance.json").write_text(json.dumps({"image": {"ct_window_hu": [-160, 240]}}))
    with pytest.raises(CipaInputError, match=r"case c2: .* CT window \[-160.0, 240.0\] HU, case c1 with "
                                             r"\[-1200.0, -200.0\] HU .*expected one window"):
        build_studies_datalist(tmp_path, 0.0)


def test_studies_affine_mismatch(tmp_path):
    _study(tmp_path, "c1")
    shifted = AFFINE.copy()
    shifted[2, 3] = 4.0
    _nii(tmp_path / "c1" / "label.nii.gz", (4, 4, 3), shifted)
    with pytest.raises(CipaInputError, match="c1.*affines differ"):
        build_studies_datalist(tmp_path, 0.0)


def test_grid_mismatch_is_the_one_grid_rule() -> None:
    from cipa_bundle.io.nifti import AFFINE_ATOL_MM, grid_mismatch

    affine = np.diag([0.98, 0.98, 2.0, 1.0])
    assert grid_mismatch((4, 4, 3), affine, (4, 4, 3, 1), affine) is None  # a trailing channel axis is not the grid
    nudged = affine.copy()
    nudged[0, 3] += AFFINE_ATOL_MM / 2  # float rounding of a resampled grid
    assert grid_mismatch((4, 4, 3), affine, (4, 4, 3), nudged) is None
    nudged[0, 3] += AFFINE_ATOL_MM
    assert "affines differ by up to 0.015 mm" in grid_mismatch((4, 4, 3), affine, (4, 4, 3), nudged)
    assert grid_mismatch((4, 4, 3), affine, (4, 4, 2), affine) == "spatial shape (4, 4, 3) vs (4, 4, 2)"
    broken = affine.copy()
    broken[1, 1] = np.nan
    assert "affines differ" in grid_mismatch((4, 4, 3), affine, (4, 4, 3), broken)


def test_studies_slices_option(tmp_path):
    for case, k in (("a", 1), ("b", 2)):
        _study(tmp_path, case)
        label = np.zeros((4, 4, 3), np.uint8)
        label[0, 0, k] = 1
        nib.save(nib.Nifti1Image(label, AFFINE), str(tmp_path / case / "label.nii.gz"))
    out = build_datalist(
        "studies", tmp_path, tmp_path / "dl.json", val_fraction=0.5, seed=0, slices=True, tumour_free_fraction=0.0
    )
    doc = json.loads(out.read_text())
    slices = {it["image"].split("/")[0]: it["slice"] for it in doc["training"] + doc["validation"]}
    assert slices == {"a": 1, "b": 2}


# ------------------------------------------------------------------------------------------- autoPET
def _autopet(root: Path, case: str, pet_shape=(4, 4, 3), with_seg: bool = True) -> None:
    _nii(root / case / "CTres.nii.gz", (4, 4, 3))
    _nii(root / case / "SUV.nii.gz", pet_shape)
    if with_seg:
        _nii(root / case / "SEG.nii.gz", (4, 4, 3))


def test_autopet_layout(tmp_path):
    for case in ("PETCT_a/01-study", "PETCT_a/02-study", "PETCT_b/01-study", "PETCT_c/01-study"):
        _autopet(tmp_path, case)
    doc = build_autopet_datalist(tmp_path, val_fraction=0.34, seed=0)
    assert doc["numTraining"] + doc["numValidation"] == 4
    assert not _patients(doc["training"]) & _patients(doc["validation"])
    item = doc["training"][0]
    assert set(item) == {"ct", "pet", "label"}
    assert item["ct"].endswith("/CTres.nii.gz") and item["pet"].endswith("/SUV.nii.gz")
    assert item["label"].endswith("/SEG.nii.gz")


def test_autopet_errors_name_the_case(tmp_path):
    _autopet(tmp_path, "PETCT_a/s1")
    _autopet(tmp_path, "PETCT_b/s1", pet_shape=(4, 4, 5))
    with pytest.raises(CipaInputError, match="PETCT_b/s1.*CTres.nii.gz.*SUV.nii.gz"):
        build_autopet_datalist(tmp_path, 0.0)
    _autopet(tmp_path, "PETCT_b/s1")
    (tmp_path / "PETCT_a" / "s1" / "SEG.nii.gz").unlink()
    with pytest.raises(CipaInputError, match="PETCT_a/s1.*SEG.nii.gz.*missing"):
        build_autopet_datalist(tmp_path, 0.0)


# ------------------------------------------------------------------------------------------- CLI
def test_cli_datalist(tmp_path, capsys):
    _pclt_tree(tmp_path)
    main(["datalist", "pclt20k", str(tmp_path), str(tmp_path / "dl.json"), "--val_fraction", "0.2"])
    assert json.loads((tmp_path / "dl.json").read_text())["numTest"] == 3
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["datalist", "nnunet", str(tmp_path), str(tmp_path / "x.json")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "nnunet" in err and "pclt20k" in err and "\n" not in err
    assert not (tmp_path / "x.json").exists()
