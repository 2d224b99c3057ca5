"""train.json trains on every datalist source this project builds: autoPET NIfTI (CT in HU + SUV, per-slice items)
and PCLT20K PNG pairs, through ``python -m monai.bundle run training`` at the tiny demo configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from cipa_bundle.data.datalist import build_datalist

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE, DEPTH = 48, 6


def _body_and_tumour(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """An elliptic body with a spherical tumour: (body, tumour) boolean masks of shape (SIZE, SIZE, DEPTH)."""
    i, j, k = np.meshgrid(np.arange(SIZE), np.arange(SIZE), np.arange(DEPTH), indexing="ij")
    body = ((i - SIZE / 2) / (0.4 * SIZE)) ** 2 + ((j - SIZE / 2) / (0.3 * SIZE)) ** 2 <= 1
    ci, cj = rng.integers(18, 30, size=2)
    tumour = (i - ci) ** 2 + (j - cj) ** 2 + (2.5 * (k - DEPTH / 2)) ** 2 <= 16
    return body, tumour & body


def _autopet_root(root: Path) -> Path:
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for case in ("PETCT_a/s1", "PETCT_b/s1", "PETCT_c/s1"):
        body, tumour = _body_and_tumour(rng)
        ct = np.where(body, -800.0, -1000.0) + np.where(tumour, 850.0, 0.0)  # lung -800 HU, tumour +50 HU
        suv = np.where(body, 0.8, 0.0) + np.where(tumour, 7.0, 0.0)
        folder = root / case
        folder.mkdir(parents=True)
        for name, data in (("CTres", ct), ("SUV", suv), ("SEG", tumour.astype(np.uint8))):
            nib.save(nib.Nifti1Image(data.astype(np.float32 if name != "SEG" else np.uint8), affine),
                     str(folder / f"{name}.nii.gz"))
    return root


def _pclt20k_root(root: Path) -> Path:
    rng = np.random.default_rng(1)
    ids = []
    for patient in ("P1", "P2", "P3", "P4"):
        body, tumour = _body_and_tumour(rng)
        (root / patient).mkdir(parents=True)
        for k in (2, 3):
            item_id = f"{patient}_{k}"
            ids.append(item_id)
            ct = np.where(body[:, :, k], 60, 0) + np.where(tumour[:, :, k], 150, 0)
            pet = np.where(body[:, :, k], 20, 0) + np.where(tumour[:, :, k], 200, 0)
            for suffix, data in (("CT", ct), ("PET", pet), ("mask", np.where(tumour[:, :, k], 255, 0))):
                Image.fromarray(data.astype(np.uint8)).save(root / patient / f"{item_id}_{suffix}.png")
    (root / "train.txt").write_text("\n".join(i for i in ids if not i.startswith("P4")) + "\n")
    (root / "test.txt").write_text("\n".join(i for i in ids if i.startswith("P4")) + "\n")
    return root


@pytest.mark.parametrize("source", ["autopet", "pclt20k"])
def test_train_json_trains_on_each_datalist_source(tmp_path, source):
    root = _autopet_root(tmp_path / "autopet") if source == "autopet" else _pclt20k_root(tmp_path / "pclt20k")
    datalist = build_datalist(source, root, tmp_path / "datalist.json", val_fraction=0.34, seed=0, slices=source == "autopet",
                              tumour_free_fraction=0.5)
    doc = json.loads(datalist.read_text())
    assert doc["training"] and doc["validation"]
    assert {"ct", "pet", "label"} <= set(doc["training"][0])
    bundle = tmp_path / "bundle"
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str([str(REPO_ROOT / "configs" / "train.json"), str(REPO_ROOT / "configs" / "demo.json")]),
        "--meta_file", str(REPO_ROOT / "configs" / "metadata.json"),
        "--logging_file", str(REPO_ROOT / "configs" / "logging.conf"),
        "--bundle_root", str(bundle),
        "--dataset_dir", str(root),
        "--datalist", str(datalist),
        "--synthesize_if_missing", "False",
        "--epochs", "1", "--batch_size", "2", "--num_workers", "0",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    checkpoints = sorted(p.name for p in (bundle / "models").glob("*.pt"))
    assert any(name.startswith("latest_checkpoint_epoch=1") for name in checkpoints), checkpoints
    assert "model.pt" in checkpoints  # the best-metric checkpoint: validation ran on this source too
