"""What the bundle's MONAI workflows (``configs/*.json``) call beyond MONAI's own handlers: the training memory
pre-flight, resumable within-epoch checkpoints, a progress bar with the run's remaining time, the handler of the
paper's dataset-level IoU / Dice / balanced accuracy, and the end of a distributed run."""

from __future__ import annotations

from cipa_bundle.workflows.distributed import end_distributed_run
from cipa_bundle.workflows.paper_confusion_handler import PaperConfusion
from cipa_bundle.workflows.preflight import InsufficientMemoryError, MemoryEstimate, TrainingMemoryPreflight
from cipa_bundle.workflows.progress import TrainingProgressBar
from cipa_bundle.workflows.resume import ResumableCheckpoint

__all__ = [
    "InsufficientMemoryError",
    "MemoryEstimate",
    "PaperConfusion",
    "ResumableCheckpoint",
    "TrainingMemoryPreflight",
    "TrainingProgressBar",
    "end_distributed_run",
]
