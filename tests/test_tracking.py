"""Experiment tracking: ``--tracking mlflow`` offline (local SQLite store) and the TensorBoard event files.

One tiny training epoch is run through ``python -m monai.bundle``; the two logs are then read back through their
own readers (mlflow's client, tensorboard's EventAccumulator) and checked against each other and against the
iteration count the dataset implies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.test_multi_gpu import shared_dataset

BATCH = 4
ITEMS = 8  # training slices used: two iterations keep the run short and still give a loss history


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    pytest.importorskip("mlflow", reason="mlflow-skinny is in the test extra: pip install -e '.[test]'")
    dataset = shared_dataset(tmp_path_factory)
    bundle = tmp_path_factory.mktemp("tracked")
    configs = [str(REPO_ROOT / "configs" / name) for name in ("train.json", "demo.json")]
    command = [
        sys.executable, "-m", "monai.bundle", "run", "training",
        "--config_file", str(configs),
        "--meta_file", str(REPO_ROOT / "configs" / "metadata.json"),
        "--logging_file", str(REPO_ROOT / "configs" / "logging.conf"),
        "--bundle_root", str(bundle), "--dataset_dir", str(dataset),
        "--epochs", "1", "--val_interval", "5", "--batch_size", str(BATCH),
        "--train#dataset#data", f"$@train#data[:{ITEMS}]",
        "--tracking", "mlflow", "--experiment_name", "cipa_ci", "--run_name", "tiny",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("CIPA_SCAN_BACKEND", None)
    result = subprocess.run(command, cwd=bundle, env=env, capture_output=True, text=True, timeout=600)
    return bundle, dataset, result


def _iterations(dataset: Path) -> int:
    """Iterations in one epoch: whole batches (``drop_last``) of the training slices kept."""
    return min(ITEMS, len(json.loads((dataset / "datalist.json").read_text())["training"])) // BATCH


def _tensorboard_losses(bundle: Path) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses: dict[int, float] = {}
    for path in sorted((bundle / "eval").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        if "train_loss" in events.Tags()["scalars"]:
            losses.update({event.step: event.value for event in events.Scalars("train_loss")})
    return losses


def test_tensorboard_event_files_hold_the_training_loss(tracked_run):
    bundle, dataset, result = tracked_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    losses = _tensorboard_losses(bundle)
    assert sorted(losses) == list(range(1, _iterations(dataset) + 1))
    assert all(0.0 < value < 3.0 for value in losses.values()), losses  # BCE + soft Dice of a fresh network


def test_mlflow_sqlite_store_reads_back_the_logged_loss(tracked_run):
    from mlflow.tracking import MlflowClient

    bundle, dataset, result = tracked_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    store = bundle / "eval" / "mlruns.db"  # MONAI 1.6.1's default tracking_uri: sqlite:///<output_dir>/mlruns.db
    assert store.is_file()
    client = MlflowClient(tracking_uri=f"sqlite:///{store}")
    experiment = client.get_experiment_by_name("cipa_ci")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    assert [run.info.run_name for run in runs] == ["tiny"]
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    logged = {metric.step: metric.value for metric in history}
    assert sorted(logged) == list(range(1, _iterations(dataset) + 1))
    # The same per-iteration losses went to TensorBoard through a separate handler.
    tensorboard = _tensorboard_losses(bundle)
    assert logged == pytest.approx(tensorboard, rel=1e-6)
    # The epoch-level key metric (IoU of the training batches) is logged too, and is a ratio.
    (iou,) = client.get_metric_history(runs[0].info.run_id, "train_iou")
    assert 0.0 <= iou.value <= 1.0
    # MONAI logs the executed config as an artifact; it lands beside the store, not in the working directory.
    artifacts = [a.path for a in client.list_artifacts(runs[0].info.run_id)]
    assert len(artifacts) == 1 and artifacts[0].startswith("config_") and artifacts[0].endswith(".json"), artifacts
    assert list((bundle / "eval" / "mlruns").rglob(artifacts[0]))
