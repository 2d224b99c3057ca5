"""Memory pre-flight for training: measure one step at batch 1 (or 2), scale it to the configured batch, and refuse a run
that cannot fit before it starts, with one line that says what would fit.

Why measure instead of computing: the activation memory of a CIPA step depends on the selective-scan backend
(the numba kernels, the PyTorch fallback and mamba-ssm's fused kernel each keep different tensors for the backward
pass), on activation checkpointing and on AMP. One real step at batch 1 or 2 through the configured network, loss and
device captures all of that. The estimate errs on the safe side: the probe is usually the process's first step, so
its peak also holds one-time costs (compiling the numba kernels, first-touch of the allocator's arenas), which are
scaled with the batch as if they were activations. At the paper's size they are a few per cent of the estimate
(docs/performance.md, "Training at the paper's size"); at toy sizes they dominate it. What a step needs grows with the batch almost exactly linearly (every activation has
the batch as its first dimension); weights are already allocated when the probe runs, and the gradients and the
optimizer state (allocated on the first optimizer step) are counted from the parameters.

On the CPU the probe's peak is the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``);
on CUDA it is ``torch.cuda.max_memory_allocated``. What is available is ``MemAvailable`` (and the cgroup's limit,
where one is set) on the CPU, split evenly among the run's processes on the host (torchrun's ``LOCAL_WORLD_SIZE``:
CPU ranks all grow into the same memory, and each would otherwise count all of it as its own), and the device's free
memory on CUDA, or the configured budget.

The probe leaves no trace: the parameters' gradients, every buffer (batch-norm statistics) and the random-number
state are restored, the optimizer is not stepped, and on the CPU the memory it freed is handed back to the kernel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.nn as nn

from cipa_bundle.errors import CipaInputError
from cipa_bundle.networks.checkpointing import buffers_kept
from cipa_bundle.runtime import release_freed_memory

__all__ = ["InsufficientMemoryError", "MemoryEstimate", "TrainingMemoryPreflight", "available_memory", "local_ranks"]

GIB = float(1 << 30)

logger = logging.getLogger(__name__)

#: Headroom on the scaled activation memory: allocator fragmentation and the tensors of a real batch (the loader's
#: pinned copies, the post-processing and metrics) that the probe does not allocate.
ACTIVATION_HEADROOM = 1.15


class InsufficientMemoryError(CipaInputError, MemoryError):
    """The configured training run would not fit in the memory available to it."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """What a training step needs, from a measured step.

    Attributes:
        device: ``"cpu"`` or ``"cuda:N"``.
        batch_size: the batch the estimate is for.
        baseline_bytes: memory held before the probe (the process's resident set, or CUDA memory allocated).
        state_bytes: gradients plus optimizer state, which the first training step allocates.
        per_sample_bytes: the probe's peak above the baseline and the gradients: activations of one sample.
        available_bytes: memory the run may grow into above the baseline.
        probe_seconds: wall time of the probe step (at batch 2, or 1 when the run's batch is 1).
        shared_by: processes of the run on this host that share the CPU memory (``available_bytes`` is one share).
    """

    device: str
    batch_size: int
    baseline_bytes: int
    state_bytes: int
    per_sample_bytes: int
    available_bytes: int
    probe_seconds: float
    shared_by: int = 1

    def needed_bytes(self, batch_size: int | None = None) -> int:
        """Memory the process will reach, baseline included, at ``batch_size`` (default: the configured one)."""
        batch = self.batch_size if batch_size is None else batch_size
        return int(self.baseline_bytes + self.state_bytes + batch * self.per_sample_bytes * ACTIVATION_HEADROOM)

    @property
    def limit_bytes(self) -> int:
        """The most the process may reach: baseline plus what is available."""
        return self.baseline_bytes + self.available_bytes

    @property
    def fits(self) -> bool:
        return self.needed_bytes() <= self.limit_bytes

    def largest_batch(self) -> int:
        """The largest batch size whose estimate fits (0 if not even one sample does)."""
        room = self.limit_bytes - self.baseline_bytes - self.state_bytes
        per_sample = max(1.0, self.per_sample_bytes * ACTIVATION_HEADROOM)
        return max(0, int(room // per_sample))

    def summary(self) -> str:
        return (
            f"training step at batch_size {self.batch_size} on {self.device} needs about "
            f"{self.needed_bytes() / GIB:.1f} GiB (a measured step: {self.per_sample_bytes / GIB:.2f} GiB of "
            f"activations per sample, {self.probe_seconds:.1f} s; gradients and optimizer state "
            f"{self.state_bytes / GIB:.2f} GiB); {self.limit_bytes / GIB:.1f} GiB available"
            + (f" (this process's share: {self.shared_by} processes of the run on this host)" if self.shared_by > 1
               else "")
        )


def _read_proc_kib(path: str, field: str) -> int | None:
    """A ``kB`` field of a ``/proc`` status file in bytes, or None where there is no such file (not Linux)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup v2 memory limit, or None where no limit is set."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
    except (OSError, ValueError):
        return None
    return None if limit == "max" else max(0, int(limit) - current)


def local_ranks() -> int:
    """How many processes of this run share the host: ``LOCAL_WORLD_SIZE``, which torchrun sets; 1 otherwise."""
    value = os.environ.get("LOCAL_WORLD_SIZE", "1")
    try:
        ranks = int(value)
    except ValueError:
        raise CipaInputError(f"memory pre-flight: environment variable LOCAL_WORLD_SIZE={value!r}; expected the "
                             "number of processes on this host (a positive integer), as torchrun sets it") from None
    if ranks < 1:
        raise CipaInputError(f"memory pre-flight: environment variable LOCAL_WORLD_SIZE={ranks}; expected >= 1")
    return ranks


def available_memory(device: torch.device) -> int:
    """Bytes this process can still allocate on ``device``: free device memory on CUDA (plus what PyTorch's cache
    holds unused); on the CPU, the kernel's ``MemAvailable``, capped by the cgroup's limit where one is set, and
    divided among the run's processes on this host (:func:`local_ranks`), which all grow into that same memory.

    Raises:
        CipaInputError: the CPU's available memory cannot be read (no ``/proc/meminfo``): set a budget instead.
    """
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    available = _read_proc_kib("/proc/meminfo", "MemAvailable")
    if available is None:
        raise CipaInputError(
            "memory pre-flight: /proc/meminfo is not readable on this system; set the budget with --memory_limit_gib "
            "or turn the check off with --memory_preflight false"
        )
    room = _cgroup_room()
    return (available if room is None else min(available, room)) // local_ranks()


@contextlib.contextmanager
def _unchanged(network: nn.Module, device: torch.device) -> Iterator[None]:
    """Run the enclosed probe and restore the network's mode, buffers, gradients and the random-number state."""
    mode = network.training
    grads = [(p, p.grad) for p in network.parameters()]
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        with buffers_kept(network):
            yield
    finally:
        for parameter, grad in grads:
            parameter.grad = grad
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state(cuda_rng, device)
        network.train(mode)


class _PeakMeter:
    """Peak memory during a block: the process's resident-set high-water mark (CPU) or CUDA's peak allocation."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def current(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.memory_allocated(self.device))
        rss = _read_proc_kib("/proc/self/status", "VmRSS")
        if rss is None:
            raise CipaInputError(
                "memory pre-flight: /proc/self/status is not readable on this system; set --memory_preflight false"
            )
        return rss

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        # Writing 5 resets VmHWM to the current resident set (Linux >= 4.0, the process's own file). Where that is
        # not allowed the high-water mark of the whole process so far stands in: larger, so the estimate stays safe.
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def peak(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return int(_read_proc_kib("/proc/self/status", "VmHWM") or 0)


def _optimizer_state_bytes(optimizer: torch.optim.Optimizer | None, parameter_bytes: int) -> int:
    """State the optimizer will allocate on its first step: two moments for Adam(W), one buffer for SGD with
    momentum; two as a conservative default for others. Nothing if it already holds its state."""
    if optimizer is None or len(optimizer.state) > 0:
        return 0
    if isinstance(optimizer, torch.optim.SGD):
        momentum = any(group.get("momentum", 0) for group in optimizer.param_groups)
        return parameter_bytes if momentum else 0
    return 2 * parameter_bytes


class TrainingMemoryPreflight:
    """Measure a training step at batch 1 or 2 and refuse, before anything is written, a run that will not fit.

    Called with no arguments from the training workflow (``configs/train.json``, first item of ``training`` after the
    process settings). All arguments are plain config values.

    Args:
        network: the network as it will train (on its device, with its ``use_checkpoint`` setting).
        loss_function: ``loss(logits, label)``.
        batch_size: the training batch.
        input_shape: one sample's ``(C, H, W)`` input; the label is ``(out_channels, H, W)``.
        device: where the network trains.
        optimizer: its state (Adam's moments) is counted; it is never stepped.
        amp: run the probe under autocast, as the trainer will.
        memory_limit_gib: a budget for the whole process (e.g. on a shared machine) instead of what the system reports
            as available.
        enabled: ``False`` skips the check.
        label_channels: channels of the label tensor.

    Raises (when called):
        InsufficientMemoryError: one line with the estimate, what is available and overrides that would fit.
    """

    def __init__(
        self,
        network: nn.Module,
        loss_function: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batch_size: int,
        input_shape: Sequence[int],
        device: str | torch.device = "cpu",
        optimizer: torch.optim.Optimizer | None = None,
        amp: bool = False,
        memory_limit_gib: float | None = None,
        enabled: bool = True,
        label_channels: int = 1,
    ) -> None:
        if batch_size < 1:
            raise CipaInputError(f"batch_size must be >= 1, got {batch_size}")
        if memory_limit_gib is not None and memory_limit_gib <= 0:
            raise CipaInputError(f"memory_limit_gib must be positive (GiB), got {memory_limit_gib}")
        self.network = network
        self.loss_function = loss_function
        self.batch_size = int(batch_size)
        self.input_shape = tuple(int(s) for s in input_shape)
        self.device = torch.device(device)
        self.optimizer = optimizer
        self.amp = bool(amp)
        self.memory_limit_gib = memory_limit_gib
        self.enabled = bool(enabled)
        self.label_channels = int(label_channels)

    def estimate(self) -> MemoryEstimate:
        """Run the probe step and return the estimate for the configured batch (nothing is refused here)."""
        meter = _PeakMeter(self.device)
        parameters = [p for p in self.network.parameters() if p.requires_grad]
        parameter_bytes = sum(p.numel() * p.element_size() for p in parameters)
        gradient_bytes = sum(p.numel() * p.element_size() for p in parameters if p.grad is None)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        else:
            # Freed memory that the process keeps mapped (cipa_bundle.runtime.retain_freed_memory) would serve the
            # probe without raising the resident set, hiding what a step needs.
            release_freed_memory()
        baseline = meter.current()
        shared_by = 1  # a configured budget is this process's own, as is a CUDA device
        if self.memory_limit_gib is not None:
            available = int(self.memory_limit_gib * GIB) - baseline
        else:
            available = available_memory(self.device)
            if self.device.type == "cpu":
                shared_by = local_ranks()  # available_memory's divisor, named in the summary
        # Two samples where the run has them: batch norm in training mode needs more than one value per channel,
        # which one sample of a small network's deepest (1 x 1) feature map does not give.
        probe_batch = min(2, self.batch_size)
        generator = torch.Generator(self.device).manual_seed(0)  # leaves the global random state alone
        inputs = torch.randn(probe_batch, *self.input_shape, device=self.device, generator=generator)
        label = torch.zeros(probe_batch, self.label_channels, *self.input_shape[1:], device=self.device)
        label[..., : self.input_shape[1] // 4, : self.input_shape[2] // 4] = 1
        with _unchanged(self.network, self.device):
            self.network.train()
            meter.reset()
            start = time.perf_counter()
            with torch.autocast(self.device.type, enabled=self.amp):
                loss = self.loss_function(self.network(inputs), label)
            loss.backward()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - start
            peak = meter.peak()
            del loss
        if self.device.type == "cpu":
            release_freed_memory()  # the probe's activations: the run's own heap should not grow around them
        per_sample = max(0, peak - baseline - gradient_bytes) // probe_batch
        return MemoryEstimate(
            device=str(self.device),
            batch_size=self.batch_size,
            baseline_bytes=baseline,
            state_bytes=gradient_bytes + _optimizer_state_bytes(self.optimizer, parameter_bytes),
            per_sample_bytes=per_sample,
            available_bytes=available,
            probe_seconds=seconds,
            shared_by=shared_by,
        )

    def __call__(self) -> MemoryEstimate | None:
        """Check; returns the estimate when the run fits (None when disabled)."""
        if not self.enabled:
            return None
        estimate = self.estimate()
        if estimate.fits:
            logger.info(f"memory pre-flight: {estimate.summary()}: fits")
            return estimate
        options = []
        largest = estimate.largest_batch()
        if largest >= 1:
            options.append(f"--batch_size {largest}")
        switches = [m for m in self.network.modules() if getattr(m, "use_checkpoint", None) is False]
        if switches:
            # Measured, not guessed: the same probe with every block recomputed in the backward pass.
            for module in switches:
                module.use_checkpoint = True
            try:
                recomputed = self.estimate()
            finally:
                for module in switches:
                    module.use_checkpoint = False
            if recomputed.fits:
                options.append(f"--use_checkpoint true (about {recomputed.needed_bytes() / GIB:.1f} GiB)")
            elif recomputed.largest_batch() >= 1:
                options.append(f"--use_checkpoint true --batch_size {recomputed.largest_batch()}")
        options.append("""the demo overlay (--config_file "['configs/train.json','configs/demo.json']")""")
        raise InsufficientMemoryError(
            f"memory pre-flight: {estimate.summary()}, so the run would be killed for lack of memory. Would fit: "
            f"{'; '.join(options)}. (--memory_preflight false skips this check.)"
        )
