"""``configs/multi_gpu_train.json`` under torchrun: two CPU ranks on gloo, the tiny network, one short epoch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cipa_bundle.synthetic.dataset import build_synthetic_dataset
from tests.conftest import REPO_ROOT

CONFIGS = [str(REPO_ROOT / "configs" / name) for name in ("train.json", "demo.json", "multi_gpu_train.json")]
BATCH = 4
RANKS = 2

# Test-only overlay: each rank appends the slice indices of every batch its DataLoader yields to its own file. It
# wraps the collate function, so it sees exactly what the DistributedSampler handed that rank.
RECORDER = {
    "train#dataloader#collate_fn": (
        "$lambda items: (print(*[int(i['slice']) for i in items], flush=True, "
        "file=open(@bundle_root + f'/seen_rank{dist.get_rank()}.txt', 'a')), monai.data.list_data_collate(items))[1]"
    )
}


def shared_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 3-case synthetic dataset, built once per session and reused by the other bundle-run test modules."""
    root = tmp_path_factory.getbasetemp() / "bundle_runs_synthetic"
    if not (root / "datalist.json").is_file():
        build_synthetic_dataset(root, cases=3, seed=3, val_fraction=0.5)  # built aside and renamed: never half there
    return root


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    dataset = shared_dataset(tmp_path_factory)
    bundle = tmp_path_factory.mktemp("ddp")
    overlay = bundle / "record_ranks.json"
    overlay.write_text(json.dumps(RECORDER))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc_per_node={RANKS}",
        "-m", "monai.bundle", "run", "training",
        "--config_file", str([*CONFIGS, str(overlay)]),
        "--meta_file", str(REPO_ROOT / "configs" / "metadata.json"),
        "--logging_file", str(REPO_ROOT / "configs" / "logging.conf"),
        "--bundle_root", str(bundle), "--dataset_dir", str(dataset),
        "--epochs", "1", "--val_interval", "5", "--batch_size", str(BATCH),
    ]
    # One thread per rank: two ranks already fill the two cores CI has.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("CIPA_SCAN_BACKEND", None)
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    return bundle, dataset, result


def _seen(bundle: Path, rank: int) -> list[int]:
    path = bundle / f"seen_rank{rank}.txt"
    return [int(s) for s in path.read_text().split()] if path.is_file() else []


def test_torchrun_two_cpu_ranks_completes(distributed_run):
    _, _, result = distributed_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]


def test_ranks_receive_disjoint_shards_of_the_training_slices(distributed_run):
    bundle, dataset, result = distributed_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    training = json.loads((dataset / "datalist.json").read_text())["training"]
    assert len({item["image"] for item in training}) == 1  # one training case: the slice index names an item
    slices = [item["slice"] for item in training]
    # DistributedSampler gives each rank ceil(n / 2) items; drop_last keeps whole batches of 4 only.
    per_rank = (-(-len(slices) // RANKS)) // BATCH * BATCH
    seen = [_seen(bundle, rank) for rank in range(RANKS)]
    assert [len(s) for s in seen] == [per_rank] * RANKS, seen
    assert not set(seen[0]) & set(seen[1]), seen
    assert set(seen[0]) | set(seen[1]) <= set(slices)


def test_only_rank_zero_saves_one_checkpoint(distributed_run):
    bundle, dataset, result = distributed_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    saved = sorted(p.name for p in (bundle / "models").iterdir())
    assert saved == ["latest_checkpoint_epoch=1.pt"]  # no validation ran, so no best model.pt either
    checkpoint = torch.load(bundle / "models" / saved[0], map_location="cpu", weights_only=False)
    training = json.loads((dataset / "datalist.json").read_text())["training"]
    # The trainer counted the sharded iterations, not those of the whole list (which a non-distributed run takes).
    assert checkpoint["trainer"]["iteration"] == (-(-len(training) // RANKS)) // BATCH
    # CheckpointSaver unwraps DistributedDataParallel, so the weights load into a plain network.
    assert not any(key.startswith("module.") for key in checkpoint["model"])


def test_only_rank_zero_logs_training_loss(distributed_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    bundle, _, result = distributed_run
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    with_loss = []
    for path in sorted((bundle / "eval").glob("events.out.tfevents.*")):
        events = EventAccumulator(str(path))
        events.Reload()
        if "train_loss" in events.Tags()["scalars"]:
            with_loss.append(path.name)
    assert len(with_loss) == 1, with_loss


def test_end_distributed_run_destroys_the_group_after_the_barrier_and_is_a_no_op_outside_one(tmp_path):
    import torch.distributed as dist

    from cipa_bundle.workflows import end_distributed_run

    end_distributed_run()  # no group: nothing to wait for, and no error
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        gathered = [torch.zeros(2)]
        dist.all_gather(gathered, torch.ones(2))
        end_distributed_run()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert torch.equal(gathered[0], torch.ones(2))
