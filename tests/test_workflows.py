"""The training workflow's own pieces: the memory pre-flight against a real step's peak, the progress estimate."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss

from cipa_bundle.networks import CIPA, param_groups
from cipa_bundle.workflows.preflight import GIB, InsufficientMemoryError, TrainingMemoryPreflight
from cipa_bundle.workflows.progress import format_duration

needs_proc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not Path("/proc/self/clear_refs").exists(),
    reason="the CPU pre-flight reads the resident-set high-water mark from /proc (Linux)",
)

SMALL = dict(img_size=128, dims=30, depths=(1, 1, 2, 1), decoder_depths=(1, 1, 1, 1))


def _peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@needs_proc
def test_preflight_estimate_bounds_the_peak_of_a_real_training_step_and_leaves_the_model_untouched():
    torch.manual_seed(0)
    network = CIPA(**SMALL).train()
    loss_function = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.AdamW(param_groups(network, 0.01), lr=1e-4)
    batch = 6
    before = {k: v.clone() for k, v in network.state_dict().items()}
    rng = torch.get_rng_state()
    estimate = TrainingMemoryPreflight(network, loss_function, batch, (2, 128, 128), optimizer=optimizer).estimate()
    # The probe changed nothing: weights, batch-norm statistics, gradients, random state, optimizer.
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    assert all(p.grad is None for p in network.parameters()) and len(optimizer.state) == 0
    assert torch.equal(torch.get_rng_state(), rng)
    parameter_bytes = sum(p.numel() * 4 for p in network.parameters())
    assert estimate.state_bytes == 3 * parameter_bytes  # gradients + AdamW's two moments, counted by hand
    assert estimate.per_sample_bytes > 0

    # The real thing, measured independently of the pre-flight's code: one AdamW step at the full batch.
    baseline = _rss()
    Path("/proc/self/clear_refs").write_text("5")
    x = torch.randn(batch, 2, 128, 128)
    y = (torch.rand(batch, 1, 128, 128) > 0.8).float()
    loss_function(network(x), y).backward()
    optimizer.step()
    actual = _peak_rss()
    predicted_growth = estimate.needed_bytes() - estimate.baseline_bytes
    assert actual - baseline <= predicted_growth, (actual - baseline, predicted_growth)
    # Safe but not absurd: at this toy size the probe's one-time costs (numba compilation) weigh as much as the
    # activations themselves; at the paper's size the estimate is within a few per cent (benchmarks/bench_train.py).
    assert predicted_growth <= 3 * (actual - baseline) + 0.1 * GIB, (actual - baseline, predicted_growth)


@needs_proc
def test_preflight_refuses_with_the_batch_size_that_fits():
    torch.manual_seed(0)
    network = CIPA(**SMALL)
    probe = TrainingMemoryPreflight(network, DiceCELoss(sigmoid=True), 8, (2, 128, 128))
    estimate = probe.estimate()
    # A budget that holds 3 samples by the estimate's own arithmetic, and so not 8.
    room = estimate.state_bytes + 3.5 * estimate.per_sample_bytes * 1.15
    probe.memory_limit_gib = (estimate.baseline_bytes + room) / GIB
    with pytest.raises(InsufficientMemoryError) as refused:
        probe()
    message = str(refused.value)
    assert "\n" not in message and "batch_size 8" in message
    # Measurements vary a little between probes: the batch that fits is 3, give or take one.
    assert any(f"Would fit: --batch_size {n};" in message for n in (2, 3, 4)), message
    assert "--use_checkpoint true" in message or "configs/demo.json" in message
    probe.memory_limit_gib = None
    probe.batch_size = 2
    assert probe() is not None  # a run that fits passes


def test_cpu_ranks_on_one_host_each_get_their_share_of_the_available_memory(monkeypatch):
    """Two CPU ranks at the paper's size each need about 11 GiB: on a 23 GiB host each saw all of it and said "fits"."""
    from cipa_bundle.errors import CipaInputError
    from cipa_bundle.workflows import preflight

    monkeypatch.setattr(preflight, "_read_proc_kib", lambda path, field: 8 * 1024**3)  # MemAvailable: 8 GiB
    monkeypatch.setattr(preflight, "_cgroup_room", lambda: 6 * 1024**3)  # a cgroup with 6 GiB left
    cpu = torch.device("cpu")
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert preflight.available_memory(cpu) == 6 * 1024**3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert preflight.available_memory(cpu) == 6 * 1024**3 // 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    with pytest.raises(CipaInputError, match="LOCAL_WORLD_SIZE='two'"):
        preflight.available_memory(cpu)


@needs_proc
def test_preflight_names_the_share_when_cpu_ranks_share_the_host(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    probe = TrainingMemoryPreflight(CIPA(**SMALL), DiceCELoss(sigmoid=True), 2, (2, 128, 128))
    estimate = probe.estimate()
    assert estimate.shared_by == 2
    assert "2 processes of the run on this host" in estimate.summary()


def test_format_duration():
    assert format_duration(59.6) == "0:01:00"
    assert format_duration(3725) == "1:02:05"
    assert format_duration(90000) == "1d 1:00:00"


def test_run_left_counts_only_the_iterations_of_this_run_when_resumed_mid_epoch(monkeypatch):
    from ignite.engine import Engine, Events

    from cipa_bundle.workflows import progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])  # each iteration takes one minute

    def step(engine, batch):  # noqa: ANN001, ARG001
        clock[0] += 60.0

    engine = Engine(step)
    progress.TrainingProgressBar(persist=False).attach(engine)
    seen = []

    # Registered after the bar, as the resume handler is in the workflow: the state arrives after the bar's STARTED.
    @engine.on(Events.STARTED)
    def resume(trained: Engine) -> None:
        trained.load_state_dict({"iteration": 28, "epoch_length": 10, "max_epochs": 4})

    @engine.on(Events.ITERATION_COMPLETED)
    def record(trained: Engine) -> None:
        seen.append((trained.state.iteration, trained.state.run_left))

    engine.run(range(10), max_epochs=4)
    assert [i for i, _ in seen] == list(range(29, 41))  # the rest of epoch 3, then epoch 4
    # After iteration 29: one minute for one iteration of this run, 11 to go (not 29 iterations done in a minute).
    assert seen[0][1] == "0:11:00"
    assert seen[5][1] == "0:06:00" and seen[-1][1] == "0:00:00"
