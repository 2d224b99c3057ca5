"""Model Zoo export and packaging: TorchScript through ``monai.bundle ckpt_export``, the export paths that cannot
work (each pinned to its failure), and the ``cipa-bundle package`` archive run from where it is unpacked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from cipa_bundle.cli import main
from cipa_bundle.errors import CipaInputError
from cipa_bundle.networks import CIPA
from cipa_bundle.package import BUNDLE_NAME, package_bundle
from tests.conftest import REPO_ROOT
from tests.test_multi_gpu import shared_dataset

TINY = {"img_size": 128, "dims": 30, "depths": [1, 1, 1, 1], "decoder_depths": [1, 1, 1, 1]}  # configs/demo.json
CONFIGS = [str(REPO_ROOT / "configs" / "inference.json"), str(REPO_ROOT / "configs" / "demo.json")]
META = str(REPO_ROOT / "configs" / "metadata.json")


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", **extra}
    if "CIPA_SCAN_BACKEND" not in extra:
        env.pop("CIPA_SCAN_BACKEND", None)
    return env


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> tuple[CIPA, Path]:
    """The demo-sized network with seeded random weights, and its state_dict saved as a bundle's model.pt."""
    torch.manual_seed(0)
    net = CIPA(**TINY).eval()
    path = tmp_path_factory.mktemp("weights") / "model.pt"
    torch.save(net.state_dict(), path)
    return net, path


# ----------------------------------------------------------------------------------------------------------- export


def test_ckpt_export_traces_torchscript_through_the_torch_scan_backend(tiny_weights, tmp_path):
    net, weights = tiny_weights
    target = tmp_path / "model.ts"
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(target), "--ckpt_file", str(weights), "--meta_file", META,
        "--config_file", str(CONFIGS), "--bundle_root", str(tmp_path),
        "--use_trace", "true", "--input_shape", "[1, 2, 128, 128]",
        "--converter_kwargs", "{'check_trace': False}",  # we compare outputs below, on another batch size
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(CIPA_SCAN_BACKEND="torch"), capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    embedded = {"metadata.json": "", "inference.json": ""}
    scripted = torch.jit.load(str(target), _extra_files=embedded)
    assert json.loads(embedded["metadata.json"])["version"] == json.loads(Path(META).read_text())["version"]
    assert json.loads(embedded["inference.json"])["network_def"]["_target_"] == "cipa_bundle.networks.CIPA"
    # The trace was taken at batch 1; SliceInferer feeds sw_batch_size slices, so the batch axis must stay free.
    torch.manual_seed(1)
    x = torch.rand(2, 2, 128, 128) * 3.2 - 1.6
    with torch.no_grad(), torch.jit.optimized_execution(False):
        traced = scripted(x)
        eager = net(x)  # this process's default backend (numba on CPU): the same function, another implementation
    assert traced.shape == (2, 1, 128, 128)
    torch.testing.assert_close(traced, eager, rtol=1e-4, atol=1e-4)


def test_ckpt_export_scripting_fails_in_the_scan_dispatcher(tiny_weights, tmp_path):
    """The Zoo's default ``ckpt_export`` (``torch.jit.script``) cannot compile the backend dispatcher: it chooses a
    kernel from an environment variable and formats shapes into messages, which TorchScript cannot type."""
    from monai.bundle import ckpt_export

    _, weights = tiny_weights
    with pytest.raises(RuntimeError, match="selective_scan"):
        ckpt_export(net_id="network_def", filepath=str(tmp_path / "model.ts"), ckpt_file=str(weights),
                    meta_file=META, config_file=CONFIGS, bundle_root=str(tmp_path))
    assert not (tmp_path / "model.ts").exists()


def test_tracing_the_numba_backend_fails(tiny_weights, monkeypatch):
    """The numba kernels take NumPy arrays; under the tracer, shapes are traced tensors that numba cannot type. This
    is why export must select ``CIPA_SCAN_BACKEND=torch``."""
    numba_errors = pytest.importorskip("numba.core.errors")
    net, _ = tiny_weights
    monkeypatch.setenv("CIPA_SCAN_BACKEND", "numba")
    with pytest.raises(numba_errors.TypingError), torch.no_grad():
        torch.jit.trace(net, torch.zeros(1, 2, 128, 128), check_trace=False)


@pytest.mark.slow
@pytest.mark.xfail(
    raises=RuntimeError, strict=True,
    reason="torch.export (step 1 of torch.onnx.export(dynamo=True)) does not yet export CIPA through the pure-PyTorch "
    "scan: it raises RuntimeError (see docs/README.md, Export)",
)
def test_torch_export_for_onnx(tiny_weights, monkeypatch):
    net, _ = tiny_weights
    monkeypatch.setenv("CIPA_SCAN_BACKEND", "torch")
    torch.export.export(net, (torch.zeros(1, 2, 128, 128),))


# -------------------------------------------------------------------------------------------------------- packaging


def _bundle_copy(root: Path, weights: Path | None = None) -> Path:
    """A minimal bundle folder: the package, configs, docs, licence (and weights plus a training checkpoint)."""
    shutil.copytree(REPO_ROOT / "cipa_bundle", root / "cipa_bundle", ignore=shutil.ignore_patterns("__pycache__"))
    for folder in ("configs", "docs"):
        shutil.copytree(REPO_ROOT / folder, root / folder)
    shutil.copyfile(REPO_ROOT / "LICENSE", root / "LICENSE")
    (root / "models").mkdir()
    if weights is not None:
        shutil.copyfile(weights, root / "models" / "model.pt")
        (root / "models" / "latest_checkpoint_epoch=3.pt").write_bytes(b"optimizer state: not for release")
    return root


def test_archive_unpacks_into_the_bundle_folder_with_code_configs_and_no_dev_files(tmp_path):
    archive = package_bundle(tmp_path / "dist" / "bundle.zip", REPO_ROOT)
    assert sorted(p.name for p in archive.parent.iterdir()) == ["bundle.zip"]  # no temporary left behind
    with zipfile.ZipFile(archive) as z:
        names = z.namelist()
        assert z.read(f"{BUNDLE_NAME}/configs/train.json") == (REPO_ROOT / "configs" / "train.json").read_bytes()
    assert all(n.startswith(f"{BUNDLE_NAME}/") for n in names)
    inside = {n.removeprefix(f"{BUNDLE_NAME}/") for n in names}
    expected = {"LICENSE", "README.md", "large_files.yml", "models/", "docs/README.md", "cipa_bundle/__init__.py",
                "cipa_bundle/schemas/meta_schema_20240725.json"}
    expected |= {f"configs/{p.name}" for p in (REPO_ROOT / "configs").iterdir()}
    assert expected <= inside, expected - inside
    assert not [n for n in inside if n.startswith(("tests/", "benchmarks/", "eval/", ".")) or "__pycache__" in n]
    assert ("models/model.pt" in inside) == (REPO_ROOT / "models" / "model.pt").is_file()


def test_weights_ship_but_training_checkpoints_do_not_and_bytes_are_reproducible(tmp_path, tiny_weights):
    _, weights = tiny_weights
    root = _bundle_copy(tmp_path / "src", weights)
    first = package_bundle(tmp_path / "a.zip", root)
    second = package_bundle(tmp_path / "b.zip", root, verify=False)
    assert first.read_bytes() == second.read_bytes()
    with zipfile.ZipFile(first) as z:
        models = sorted(n for n in z.namelist() if "/models/" in n)
        assert z.read(f"{BUNDLE_NAME}/models/model.pt") == weights.read_bytes()
    assert models == [f"{BUNDLE_NAME}/models/", f"{BUNDLE_NAME}/models/model.pt"]
    with zipfile.ZipFile(package_bundle(tmp_path / "c.zip", root, include_weights=False)) as z:
        assert [n for n in z.namelist() if "/models/" in n] == [f"{BUNDLE_NAME}/models/"]


def test_bad_output_names_and_incomplete_bundles_are_refused(tmp_path, capsys):
    with pytest.raises(CipaInputError, match=r"'\.tar'.*'\.zip'"):
        package_bundle(tmp_path / "bundle.tar", REPO_ROOT)
    with pytest.raises(CipaInputError, match="plain folder name"):
        package_bundle(tmp_path / "bundle.zip", REPO_ROOT, name="../escape")
    root = _bundle_copy(tmp_path / "src")
    (root / "LICENSE").unlink()
    with pytest.raises(CipaInputError, match="LICENSE"):
        package_bundle(tmp_path / "bundle.zip", root)
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob(".*tmp"))
    with pytest.raises(SystemExit) as exited:
        main(["package", str(tmp_path / "bundle.7z")])
    assert exited.value.code == 2
    assert "expected '.zip'" in capsys.readouterr().err


def test_unpacked_archive_trains_with_only_its_own_folder_on_the_path(tmp_path, tmp_path_factory):
    dataset = shared_dataset(tmp_path_factory)
    main(["package", str(tmp_path / "bundle.zip"), "--noweights"])
    with zipfile.ZipFile(tmp_path / "bundle.zip") as z:
        z.extractall(tmp_path / "unpacked")
    bundle = tmp_path / "unpacked" / BUNDLE_NAME
    env = _env(PYTHONPATH=str(bundle))
    located = subprocess.run([sys.executable, "-c", "import cipa_bundle; print(cipa_bundle.__file__)"], cwd=tmp_path,
                             env=env, capture_output=True, text=True, check=True)
    assert Path(located.stdout.strip()).is_relative_to(bundle)  # the unpacked code, not the installed checkout
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", "['configs/train.json','configs/demo.json']",
        "--bundle_root", ".", "--dataset_dir", str(dataset),
        "--epochs", "1", "--val_interval", "5", "--batch_size", "4", "--train#dataset#data", "$@train#data[:4]",
    ]
    result = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert (bundle / "models" / "latest_checkpoint_epoch=1.pt").is_file()
