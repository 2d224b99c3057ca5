"""The bundle in MONAI Label's ``monaibundle`` app with PET-CT, and the studies folder ``convert`` writes for it.

Input contract: one MONAI Label ``image`` per study is the fused, co-registered 2-channel NIfTI (channel 0 windowed
CT, channel 1 scaled SUV) that ``cipa-bundle convert`` writes; ``convert --studies_dir`` lays it out as MONAI Label's
local datastore reads it (``<studies>/<case>.nii.gz``, ``<studies>/labels/final/<case>.nii.gz``).

Two kinds of tests:

* ``convert --studies_dir`` (main environment, always run): the layout, the bytes, the refusals.
* MONAI Label itself: monailabel 0.8.5 cannot share the main environment (torch 2.14.1, torchvision 0.29.1,
  numpy < 2), so ``tests/monailabel_driver.py`` runs in the interpreter named by ``CIPA_MONAILABEL_PYTHON`` (the
  ``.venv-label`` of README.md) and these tests assert on its JSON report. They are skipped only when that variable is
  unset or names no file, i.e. when the optional MONAI Label environment is absent.

The MONAI Label bundle is the real packaged bundle (``cipa-bundle package``, unzipped into ``<app>/model/<name>``),
with the tiny demo-size network written into its configs and a random tiny ``models/model.pt``; its post-processing
size filters are off so that the random network's mask is not empty and the comparison below means something.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from cipa_bundle.cli import main
from cipa_bundle.errors import CipaInputError
from cipa_bundle.preprocessing.convert import convert_study
from tests.conftest import REPO_ROOT

LABEL_PYTHON = os.environ.get("CIPA_MONAILABEL_PYTHON", "")
needs_monailabel = pytest.mark.skipif(
    not LABEL_PYTHON or not Path(LABEL_PYTHON).is_file(),
    reason="CIPA_MONAILABEL_PYTHON is unset or names no file: the optional MONAI Label environment (the 'label' "
    "extra, built as .venv-label, see README.md) is absent",
)
TINY = {"img_size": 128, "network_width": 30, "encoder_depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1, 1]}
CASES = 3


def _gunzip(path: Path) -> bytes:
    return gzip.decompress(path.read_bytes())


# --------------------------------------------------------------------------------------------- studies folder
@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> dict[str, Path]:
    """Three small phantom studies converted with ``--studies_dir`` (labels taken from each case folder)."""
    from cipa_bundle.synthetic.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("monailabel")
    cases = make_phantom_dataset(root / "dicom", CASES, seed=5)
    for case in cases:
        convert_study(case, root / "converted" / case.name, progress=False, studies_dir=root / "studies",
                      label=case / "label.nii.gz")
    return {"root": root, "studies": root / "studies", "converted": root / "converted", "dicom": root / "dicom"}


def test_convert_writes_the_monailabel_studies_layout(studies: dict[str, Path]) -> None:
    folder = studies["studies"]
    top = sorted(p.name for p in folder.glob("*.nii.gz"))
    assert top == [f"phantom_{n:03d}.nii.gz" for n in range(CASES)]  # flat: what LocalDatastore lists
    assert [p.name for p in folder.iterdir() if p.is_dir()] == ["labels"]
    assert sorted(p.name for p in (folder / "labels" / "final").iterdir()) == top
    for name in top:
        case = name[: -len(".nii.gz")]
        # The studies image is the converted image.nii.gz byte for byte, not a second encoding of it.
        assert (folder / name).read_bytes() == (studies["converted"] / case / "image.nii.gz").read_bytes()
        assert _gunzip(folder / "labels" / "final" / name) == _gunzip(studies["dicom"] / case / "label.nii.gz")
        image, label = nib.load(folder / name), nib.load(folder / "labels" / "final" / name)
        assert image.shape[3:] == (2,) and label.shape == image.shape[:3]
        np.testing.assert_allclose(label.affine, image.affine, atol=1e-4)
        record = json.loads((studies["converted"] / case / "provenance.json").read_text())["monailabel_studies"]
        assert record["image"] == str(folder / name) and record["label"] == str(folder / "labels" / "final" / name)


def test_convert_rerun_is_accepted_and_a_different_case_is_refused(studies: dict[str, Path], tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    folder = studies["studies"]
    first = studies["dicom"] / "phantom_000"
    before = {p: p.stat().st_mtime_ns for p in folder.rglob("*.nii.gz")}
    # The same study again, from the CLI, into its own case id: identical content is not a conflict.
    main(["convert", str(first), str(tmp_path / "again" / "phantom_000"), "--studies_dir", str(folder),
          "--label", str(first / "label.nii.gz")])
    assert "studies_image" in capsys.readouterr().out
    # Another study under an existing case id: exit 2, one line naming the file, and nothing written anywhere.
    with pytest.raises(SystemExit) as info:
        main(["convert", str(studies["dicom"] / "phantom_001"), str(tmp_path / "other"), "--studies_dir", str(folder),
              "--case_id", "phantom_000", "--label", str(studies["dicom"] / "phantom_001" / "label.nii.gz")])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("cipa-bundle: error:")]
    assert len(lines) == 1 and str(folder / "phantom_000.nii.gz") in lines[0] and "--case_id" in lines[0]
    assert not list((tmp_path / "other").glob("*"))
    assert _gunzip(folder / "phantom_000.nii.gz") == _gunzip(studies["converted"] / "phantom_000" / "image.nii.gz")
    assert not list(folder.rglob("*.tmp*"))
    assert set(before) == set(folder.rglob("*.nii.gz"))


def test_convert_studies_refusals(studies: dict[str, Path], tmp_path: Path) -> None:
    case = studies["dicom"] / "phantom_002"
    cropped = tmp_path / "cropped_label.nii.gz"
    label = nib.load(case / "label.nii.gz")
    nib.save(label.slicer[:, :, 2:], cropped)  # one slice short of the CT grid
    with pytest.raises(CipaInputError, match=r"cropped_label\.nii\.gz and .* differ \(spatial shape .* expected the same grid"):
        convert_study(case, tmp_path / "o", progress=False, studies_dir=tmp_path / "s", label=cropped)
    with pytest.raises(CipaInputError, match="case id 'a/b' cannot name a MONAI Label study"):
        convert_study(case, tmp_path / "o", progress=False, studies_dir=tmp_path / "s", case_id="a/b")
    with pytest.raises(CipaInputError, match="label .*missing.nii.gz does not exist"):
        convert_study(case, tmp_path / "o", progress=False, studies_dir=tmp_path / "s",
                      label=tmp_path / "missing.nii.gz")
    with pytest.raises(CipaInputError, match="need studies_dir"):
        convert_study(case, tmp_path / "o", progress=False, label=case / "label.nii.gz")
    assert not (tmp_path / "o").exists() and not (tmp_path / "s").exists()


# --------------------------------------------------------------------------------------------- volume items
def test_slice_dataset_expands_volume_items_like_the_datalist_sampler(studies: dict[str, Path]) -> None:
    """BundleTrainTask's ``{"image", "label"}`` items become exactly the slices ``datalist --slices`` would list."""
    from cipa_bundle.data.slice_dataset import AxialSliceCacheDataset
    from cipa_bundle.data.slices import ExtractAxialSliced, sample_axial_slices

    folder = studies["studies"]
    volumes = [{"image": str(folder / f"phantom_{n:03d}.nii.gz"),
                "label": str(folder / "labels" / "final" / f"phantom_{n:03d}.nii.gz")} for n in range(2)]
    png = {"ct": "P1/P1_3_CT.png", "pet": "P1/P1_3_PET.png", "label": "P1/P1_3_mask.png"}  # PCLT20K: already 2-D
    per_slice = {**volumes[1], "slice": 3}
    dataset = AxialSliceCacheDataset([volumes[0], png, per_slice, volumes[1]], transform=None, tumour_free_fraction=0.2,
                                     seed=7, cache_rate=0.0)
    first, second = (sample_axial_slices([v], 0.2, 7) for v in volumes)
    assert first and second and all(item["slice"] is not None for item in first)
    assert dataset.data == [*first, png, per_slice, *second] and len(dataset) == len(dataset.data)
    # The slices it chose really are the tumour slices (plus a share of others) of each label.
    label = np.asarray(nib.load(volumes[0]["label"]).dataobj)
    tumour = {int(k) for k in np.nonzero(label.any(axis=(0, 1)))[0]}
    assert tumour <= {item["slice"] for item in first}
    # And the cached transform chain sees them as per-slice items.
    cached = AxialSliceCacheDataset(volumes[:1], transform=ExtractAxialSliced(["image", "label"]), cache_rate=1.0)
    assert tuple(cached[0]["image"].shape) == (2, 64, 64) and tuple(cached[0]["label"].shape) == (1, 64, 64)


def test_slice_dataset_refuses_items_it_cannot_slice(studies: dict[str, Path]) -> None:
    from cipa_bundle.data.slice_dataset import AxialSliceCacheDataset

    with pytest.raises(CipaInputError, match=r"item 1 has neither 'slice' nor 'label' \(keys: \['image'\]\)"):
        AxialSliceCacheDataset([{"image": "a.nii.gz", "slice": 0}, {"image": "b.nii.gz"}], cache_rate=0.0)
    with pytest.raises(CipaInputError, match="item 0 is a str"):
        AxialSliceCacheDataset(["image.nii.gz"], cache_rate=0.0)
    empty = studies["root"] / "empty_label.nii.gz"
    reference = nib.load(studies["studies"] / "labels" / "final" / "phantom_000.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(reference.shape, np.uint8), reference.affine), empty)
    with pytest.raises(CipaInputError, match="1 volume item.* gave no axial slices"):
        AxialSliceCacheDataset([{"image": "x.nii.gz", "label": str(empty)}], tumour_free_fraction=0.0, cache_rate=0.0)


# --------------------------------------------------------------------------------------------- MONAI Label
@pytest.fixture(scope="module")
def bundle(studies: dict[str, Path]) -> Path:
    """The packaged bundle unzipped where the monaibundle app looks for it, with tiny values in its configs."""
    from cipa_bundle.networks import CIPA
    from cipa_bundle.package import BUNDLE_NAME, package_bundle

    root = studies["root"]
    archive = package_bundle(root / "bundle.zip", REPO_ROOT, include_weights=False)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(root / "app" / "model")
    path = root / "app" / "model" / BUNDLE_NAME
    overrides = {
        "train.json": {**TINY, "batch_size": 4, "num_workers": 0},
        # Random weights cover air as readily as tissue: with the size/body filters on, nothing would survive.
        "inference.json": {**TINY, "min_lesion_ml": 0.0, "min_body_fraction": 0.0},
    }
    for name, values in overrides.items():
        config = json.loads((path / "configs" / name).read_text())
        config.update(values)
        (path / "configs" / name).write_text(json.dumps(config, indent=4))
    torch.manual_seed(0)
    network = CIPA(img_size=128, dims=30, depths=[1, 1, 1, 1], decoder_depths=[1, 1, 1, 1])
    (path / "models").mkdir(exist_ok=True)
    torch.save(network.state_dict(), path / "models" / "model.pt")  # a bare state_dict, as import-official writes
    return path


@pytest.fixture(scope="module")
def report(bundle: Path, studies: dict[str, Path]) -> dict:
    """Run tests/monailabel_driver.py once in the MONAI Label environment; its JSON report."""
    work = studies["root"] / "driver"
    out = work / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the bundle brings its own code
    env.update(OMP_NUM_THREADS="2", BUNDLE_DOWNLOAD_SRC="ngc")
    command = [LABEL_PYTHON, str(REPO_ROOT / "tests" / "monailabel_driver.py"), "--bundle", str(bundle),
               "--studies", str(studies["studies"]), "--work", str(work), "--out", str(out)]
    result = subprocess.run(command, cwd=studies["root"], env=env, capture_output=True, text=True, timeout=900)
    if not out.is_file():
        pytest.fail(f"the driver wrote no report (exit {result.returncode}):\n{result.stderr[-4000:]}")
    return json.loads(out.read_text())


def _step(report: dict, name: str) -> dict:
    step = report[name]
    assert "error" not in step, f"{name} failed in MONAI Label:\n{step['error']}"
    return step


@needs_monailabel
def test_bundle_infer_task_is_valid_and_runs_the_bundle_code(report: dict, bundle: Path) -> None:
    infer = _step(report, "infer")
    assert infer["valid"] and infer["type"].lower().endswith("segmentation") and infer["dimension"] == 2
    assert Path(infer["cipa_bundle_file"]).is_relative_to(bundle)  # the bundle's code, from its own folder
    assert report["versions"]["monailabel"] == "0.8.5"


@needs_monailabel
def test_bundle_infer_task_names_the_tumour_label_1(report: dict) -> None:
    """MONAI Label takes label names and values from metadata.json's outputs.pred.channel_def (background dropped)."""
    infer = _step(report, "infer")
    assert infer["labels"] == {"tumor": 1}, (
        f"MONAI Label reads the label names {infer['labels']} from configs/metadata.json "
        "network_data_format.outputs.pred.channel_def; the mask stores tumour as 1, so that needs "
        '{"0": "background", "1": "tumor"}'
    )


@needs_monailabel
def test_bundle_infer_task_returns_the_bundle_mask_on_the_ct_grid(report: dict) -> None:
    infer, reference = _step(report, "infer"), _step(report, "bundle_run")
    image = nib.load(report["image"])
    mask_img = nib.load(infer["label_file"])
    assert mask_img.shape == image.shape[:3]
    np.testing.assert_allclose(mask_img.affine, image.affine, atol=1e-4)
    mask = np.asarray(mask_img.dataobj)
    assert set(np.unique(mask).tolist()) <= {0.0, 1.0} and 0 < mask.sum() < mask.size
    # Voxel for voxel what the bundle's own inference workflow writes for the same image and weights.
    assert len(reference["masks"]) == 1
    own = nib.load(reference["masks"][0])
    assert np.array_equal(np.asarray(own.dataobj), mask)
    np.testing.assert_allclose(own.affine, mask_img.affine, atol=1e-4)


@needs_monailabel
def test_bundle_train_task_loads_our_checkpoint_through_its_checkpoint_loader(report: dict, bundle: Path) -> None:
    check = _step(report, "checkpoint_loader")
    assert check["loader_config"] == {"_target_": "CheckpointLoader", "load_path": str(bundle / "models" / "model.pt"),
                                      "load_dict": {"model": "$@network"}, "strict": False}
    assert check["same_keys"] and check["checkpoint_keys"] == check["network_keys"]
    assert check["differed_before"] and check["all_equal_after"]  # every tensor came from model.pt


@needs_monailabel
def test_bundle_train_task_trains_on_volume_items_and_retrains(report: dict) -> None:
    first, second = _step(report, "train_2_epochs"), _step(report, "train_1_epoch_after")
    assert first["valid"] and len(first["datalist"]) == CASES  # volume items {"image", "label"}, no "slice"
    assert all(set(item) == {"image", "label"} for item in first["datalist"])
    assert first["first_train_handler"]["_target_"] == "CheckpointLoader"  # pretrained: model.pt prepended
    assert first["trainer_restored_from"] == ["model.pt"]
    assert first["models_after"]["model.pt"] != first["models_before"]["model.pt"]  # best val IoU saved
    assert "latest_checkpoint_epoch=2.pt" in first["models_after"]
    # A later request for fewer epochs starts again from model.pt. Resuming the finished 2-epoch run instead would
    # fail in MONAI's CheckpointLoader ("Epoch count (2) in checkpoint is larger than ... max_epochs (1)").
    assert second["trainer_restored_from"] == ["model.pt"]
    assert "latest_checkpoint_epoch=1.pt" in second["models_after"]
    assert second["models_after"]["model.pt"] != second["models_before"]["model.pt"]


@needs_monailabel
def test_monaibundle_app_loads_the_bundle_and_lists_the_studies(report: dict, bundle: Path,
                                                               studies: dict[str, Path]) -> None:
    app = _step(report, "app")
    if "skipped" in app:
        pytest.skip(f"monaibundle app not checked: {app['skipped']} (see docs/README.md, MONAI Label)")
    name = bundle.name
    assert app["models"][name]["type"].lower().endswith("segmentation") and name in app["trainers"]
    folder = studies["studies"].resolve()
    expected = {(str(folder / f"phantom_{n:03d}.nii.gz"), str(folder / "labels" / "final" / f"phantom_{n:03d}.nii.gz"))
                for n in range(CASES)}
    assert {(d["image"], d["label"]) for d in app["datastore_datalist"]} == expected  # MONAI Label's LocalDatastore
    same = np.asarray(nib.load(app["label_file"]).dataobj)
    assert np.array_equal(same, np.asarray(nib.load(report["infer"]["label_file"]).dataobj))
