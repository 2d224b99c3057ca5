"""The bundle's training workflows, run through MONAI's own tooling on the synthetic dataset."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cipa_bundle.synthetic.dataset import build_synthetic_dataset, prepare_datalist
from cipa_bundle.errors import CipaInputError
from tests.conftest import REPO_ROOT

TINY_OVERLAY = str(REPO_ROOT / "configs" / "demo.json")
TRAIN = str(REPO_ROOT / "configs" / "train.json")


@pytest.fixture(scope="module")
def synthetic_dataset(tmp_path_factory) -> Path:
    """Three phantom studies (train, validation, held-out test), converted and listed once for the module."""
    root = tmp_path_factory.mktemp("data") / "synthetic"
    build_synthetic_dataset(root, cases=3, seed=3, val_fraction=0.5)
    return root


def _bundle_command(bundle_root: Path, dataset: Path, *extra: str, configs: list[str] | None = None) -> list[str]:
    files = configs or [TRAIN, TINY_OVERLAY]
    return [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(files),
        "--meta_file", str(REPO_ROOT / "configs" / "metadata.json"),
        "--logging_file", str(REPO_ROOT / "configs" / "logging.conf"),
        "--bundle_root", str(bundle_root),
        "--dataset_dir", str(dataset),
        "--batch_size", "4",
        *extra,
    ]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "2", **extra}
    env.pop("CIPA_SCAN_BACKEND", None)
    return env


@pytest.fixture(scope="module")
def trained_copy(tmp_path_factory, synthetic_dataset) -> tuple[Path, subprocess.CompletedProcess]:
    """One epoch of training through ``python -m monai.bundle``, from an unrelated working directory, on a copy of
    the bundle that is not pip-installed: only its root is on ``sys.path``."""
    tmp = tmp_path_factory.mktemp("bundle")
    bundle = tmp / "cipa_bundle_copy"
    shutil.copytree(REPO_ROOT / "cipa_bundle", bundle / "cipa_bundle", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO_ROOT / "configs", bundle / "configs", symlinks=True)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    env = _env(PYTHONPATH=str(bundle))
    located = subprocess.run([sys.executable, "-c", "import cipa_bundle; print(cipa_bundle.__file__)"], cwd=elsewhere,
                             env=env, capture_output=True, text=True, check=True)
    assert Path(located.stdout.strip()).is_relative_to(bundle)
    configs = [str(bundle / "configs" / "train.json"), str(bundle / "configs" / "demo.json")]
    command = _bundle_command(bundle, synthetic_dataset, "--epochs", "1", configs=configs)
    result = subprocess.run(command, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    return bundle, result


def test_training_runs_through_monai_bundle_from_anywhere_and_writes_checkpoints(trained_copy):
    bundle, result = trained_copy
    assert result.returncode == 0, result.stderr[-3000:]
    assert (bundle / "models" / "model.pt").is_file()  # best by validation IoU
    assert (bundle / "models" / "latest_checkpoint_epoch=1.pt").is_file()  # the finished run's resume file
    assert list((bundle / "eval").glob("events.out.tfevents.*"))  # TensorBoard
    assert "val_iou" in result.stderr + result.stdout


def test_evaluate_overlay_scores_the_best_checkpoint(trained_copy, synthetic_dataset):
    bundle, trained = trained_copy
    assert trained.returncode == 0, trained.stderr[-3000:]
    configs = [str(bundle / "configs" / name) for name in ("train.json", "demo.json", "evaluate.json")]
    command = _bundle_command(bundle, synthetic_dataset, configs=configs)
    command[command.index("training")] = "run"
    result = subprocess.run(command, cwd=bundle, env=_env(PYTHONPATH=str(bundle)), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = (bundle / "eval" / "metrics.csv").read_text()
    assert {"val_iou", "val_dice", "val_acc"} <= {line.replace("\t", ",").split(",")[0] for line in saved.splitlines()}


def _kill_when(process: subprocess.Popen, path: Path, log: Path, timeout: float = 600) -> None:
    """Wait for ``path`` to appear (an atomic rename), then kill the whole training process group."""
    deadline = time.time() + timeout
    while not path.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert path.exists(), log.read_text()[-3000:]


def _iterations_logged(output: str, epoch: int) -> list[int]:
    """The iterations StatsHandler logged for ``epoch`` ("Epoch: 1/2, Iter: 3/5 -- train_loss: ...")."""
    return [int(m) for m in re.findall(rf"Epoch: {epoch}/\d+, Iter: (\d+)/\d+ ", output)]


def test_training_resumes_mid_epoch_after_a_kill_and_finishes_with_one_resume_file(tmp_path, synthetic_dataset):
    # A within-epoch save every 2 iterations stands in for the default 10 minutes of work.
    command = _bundle_command(tmp_path, synthetic_dataset, "--epochs", "2", "--val_interval", "5",
                              "--checkpoint_interval_iterations", "2", "--batch_size", "2")
    models = tmp_path / "models"
    log = tmp_path / "first.log"
    with open(log, "w") as stream:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=stream, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        _kill_when(process, models / "latest_checkpoint_epoch=1_iteration=2.pt", log)
    first = log.read_text()
    epoch_length = int(re.search(r"Epoch: 1/2, Iter: \d+/(\d+) ", first).group(1))
    assert epoch_length > 2, "the test needs an epoch longer than the save interval"
    assert not (models / "latest_checkpoint_epoch=1.pt").exists()  # killed inside epoch 1

    # A resume file left by an earlier, longer run (older than the interrupted run's) is superseded.
    stale = models / "latest_checkpoint_epoch=7.pt"
    stale.write_bytes(b"state of an earlier run")
    os.utime(stale, (os.path.getmtime(models / "latest_checkpoint_epoch=1_iteration=2.pt") - 3600,) * 2)

    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    # Epoch 1 continued after the saved iteration 2, and epoch 2 ran whole.
    assert _iterations_logged(output, 1) == list(range(3, epoch_length + 1))
    assert _iterations_logged(output, 2) == list(range(1, epoch_length + 1))
    assert sorted(p.name for p in models.glob("latest_checkpoint_*.pt")) == ["latest_checkpoint_epoch=2.pt"]

    # The finished run's file is not resumed: the same request trains both epochs again, from the start.
    again = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    assert _iterations_logged(again.stdout + again.stderr, 1) == list(range(1, epoch_length + 1))


def test_a_run_that_cannot_fit_stops_before_its_first_iteration_with_one_line_and_writes_nothing(
    tmp_path, synthetic_dataset
):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    # A budget below what the process already holds: the measured step cannot fit, whatever the machine.
    command = _bundle_command(bundle, synthetic_dataset, "--memory_limit_gib", "0.2", "--use_checkpoint", "false")
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("cipa-bundle: error: memory pre-flight: training step at batch_size 4 on cpu needs about")
    assert "0.2 GiB available" in last and "configs/demo.json" in last
    assert "Traceback" not in result.stderr
    assert list(bundle.iterdir()) == []  # no models/, no eval/, no TensorBoard file


def test_evaluate_without_weights_ends_with_the_one_line_that_predict_gives(tmp_path, synthetic_dataset):
    from cipa_bundle.inference.predict import require_checkpoint

    configs = [str(REPO_ROOT / "configs" / name) for name in ("train.json", "demo.json", "evaluate.json")]
    command = _bundle_command(tmp_path, synthetic_dataset, configs=configs)
    command[command.index("training")] = "run"
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    with pytest.raises(CipaInputError) as expected:
        require_checkpoint(tmp_path / "models" / "model.pt")
    assert result.stderr.strip().splitlines()[-1] == f"cipa-bundle: error: {expected.value}"
    assert "import-official" in str(expected.value) and "Traceback" not in result.stderr


@pytest.mark.parametrize("files", [["train.json"], ["train.json", "evaluate.json"], ["train.json", "demo.json"]])
def test_check_properties_is_clean(files, tmp_path, synthetic_dataset):
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=[str(REPO_ROOT / "configs" / f) for f in files], workflow_type="train", logging_file=False,
        meta_file=str(REPO_ROOT / "configs" / "metadata.json"),
        bundle_root=str(tmp_path), dataset_dir=str(synthetic_dataset),
    )
    workflow.initialize()
    assert workflow.check_properties() == []


def test_train_defines_the_run_ids_monai_and_users_call():
    config = json.loads((REPO_ROOT / "configs" / "train.json").read_text())
    assert "training" in config and config["run"] == "%training"
    # The bundle root joins sys.path only in run(): nothing evaluated before that may import cipa_bundle.
    assert not any("cipa_bundle" in line for line in config["imports"] + config["initialize"])
    assert any("retain_freed_memory" in line for line in config["training"])


def test_prepare_datalist_refuses_to_write_into_user_data(tmp_path):
    (tmp_path / "my_scans").mkdir()
    (tmp_path / "my_scans" / "patient1.nii.gz").write_bytes(b"not ours")
    with pytest.raises(CipaInputError, match="not empty"):
        prepare_datalist(tmp_path / "my_scans" / "datalist.json", tmp_path / "my_scans")
    with pytest.raises(CipaInputError, match="cipa-bundle datalist"):
        prepare_datalist(tmp_path / "nothing" / "datalist.json", tmp_path / "nothing", synthesize_if_missing=False)


def test_prepare_datalist_builds_once_when_two_processes_ask_at_once(tmp_path):
    """The ranks of ``torchrun ... multi_gpu_train.json`` on a fresh clone all ask for the missing synthetic dataset;
    before the lock they built it in one folder at once and one failed on the other's half-written DICOM files."""
    dataset = tmp_path / "cache" / "synthetic_petct"
    code = (
        "import sys; from cipa_bundle.synthetic.dataset import prepare_datalist; "
        "print(prepare_datalist(sys.argv[1] + '/datalist.json', sys.argv[1], cases=3, seed=3))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", code, str(dataset)], cwd=REPO_ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    results = [(rank.communicate(timeout=300), rank.returncode) for rank in ranks]
    for (out, err), returncode in results:
        assert returncode == 0, err[-3000:]
        assert out.strip().splitlines()[-1] == str(dataset / "datalist.json")
    document = json.loads((dataset / "datalist.json").read_text())
    cases = {Path(item["image"]).parts[0] for part in ("training", "validation", "testing") for item in document[part]}
    assert cases == {"phantom_000", "phantom_001", "phantom_002"}
    assert sorted(p.name for p in dataset.parent.iterdir()) == [".synthetic_petct.lock", "synthetic_petct"]
