"""What the bundle's MONAI workflows (``configs/*.json``) call beyond MONAI's own handlers: the training memory
pre-flight, resumable within-epoch checkpoints and a progress bar with the run's remaining time."""

from __future__ import annotations

from cipa_bundle.workflows.preflight import InsufficientMemoryError, MemoryEstimate, TrainingMemoryPreflight
from cipa_bundle.workflows.progress import TrainingProgressBar
from cipa_bundle.workflows.resume import ResumableCheckpoint

__all__ = [
    "InsufficientMemoryError",
    "MemoryEstimate",
    "ResumableCheckpoint",
    "TrainingMemoryPreflight",
    "TrainingProgressBar",
]
