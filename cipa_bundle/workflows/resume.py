"""Resumable training: the whole training state saved at a fixed interval within each epoch and at each epoch's end,
and picked up again by the next run.

One epoch of the paper's configuration lasts about an hour on a 2-core CPU, so saving only at epoch ends would lose up
to an hour to a kill. :class:`ResumableCheckpoint` saves every ``interval_minutes`` of training (or every
``interval_iterations``) and at each epoch's end, keeping one file in ``save_dir``:

* ``latest_checkpoint_epoch=E.pt`` after epoch E completed;
* ``latest_checkpoint_epoch=E_iteration=I.pt`` during epoch E, after the trainer's I-th iteration (counted over the
  whole run).

A run started while such a file exists continues from it only if it holds unfinished work for the requested
``max_epochs``: an epoch-end file of an epoch below ``max_epochs``, or a within-epoch file of an epoch up to it.
A finished run's file is not resumed (a new request for the same or fewer epochs starts afresh, as MONAI Label's
retraining does). Loading is MONAI's :class:`~monai.handlers.CheckpointLoader` at ``Events.STARTED``; ignite then
continues from the saved iteration, and a within-epoch resume runs only that epoch's remaining iterations.

Saving goes through ignite's :class:`~ignite.handlers.Checkpoint` (which unwraps DDP) with an atomic
:class:`~ignite.handlers.DiskSaver`: a kill during a save leaves the previous file intact. Each save removes the
files of earlier runs, so ``save_dir`` holds one resume file at a time.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader

from cipa_bundle.errors import CipaInputError

__all__ = ["ResumableCheckpoint"]


class ResumableCheckpoint:
    """Save the training state every ``interval_minutes`` (or ``interval_iterations``) and at each epoch's end;
    resume an unfinished run from the newest saved state.

    Args:
        save_dir: folder of the resume file (created on the first save).
        save_dict: the objects to save and restore, e.g. ``{"model": ..., "optimizer": ..., "lr_scheduler": ...,
            "trainer": ...}``; each needs ``state_dict`` / ``load_state_dict``.
        interval_minutes: wall-clock minutes of training between saves within an epoch (``0``: only at epoch ends,
            unless ``interval_iterations`` is set).
        interval_iterations: iterations between saves within an epoch (``0``: by time only). Both may be set.
        file_prefix: resume files are ``{file_prefix}_checkpoint_epoch=...``.
        map_location: where loaded tensors go (the training device).
        save: ``False`` only resumes (the other ranks of a multi-GPU run, where rank 0 saves).
    """

    def __init__(
        self,
        save_dir: str | Path,
        save_dict: Mapping[str, Any],
        interval_minutes: float = 10.0,
        interval_iterations: int = 0,
        file_prefix: str = "latest",
        map_location: str | torch.device | None = None,
        save: bool = True,
    ) -> None:
        if interval_minutes < 0 or interval_iterations < 0:
            raise CipaInputError(
                f"checkpoint interval must be >= 0, got interval_minutes={interval_minutes}, "
                f"interval_iterations={interval_iterations}"
            )
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.interval_seconds = 60.0 * float(interval_minutes)
        self.interval_iterations = int(interval_iterations)
        self.file_prefix = file_prefix
        self.map_location = map_location
        self.save = bool(save)
        self._last_save = time.monotonic()
        self._pattern = re.compile(re.escape(file_prefix) + r"_checkpoint_epoch=(\d+)(?:_iteration=(\d+))?\.pt")

    def saved(self) -> list[Path]:
        """Resume files in ``save_dir``, oldest first (by modification time, as a restarted run wrote them)."""
        if not self.save_dir.is_dir():
            return []
        return sorted((p for p in self.save_dir.iterdir() if self._pattern.fullmatch(p.name)), key=os.path.getmtime)

    def resumable(self, max_epochs: int) -> Path | None:
        """The newest resume file if it holds unfinished work for ``max_epochs``, else None."""
        saved = self.saved()
        if not saved:
            return None
        match = self._pattern.fullmatch(saved[-1].name)
        epoch, within_epoch = int(match.group(1)), match.group(2) is not None
        unfinished = epoch <= max_epochs if within_epoch else epoch < max_epochs
        return saved[-1] if unfinished else None

    @staticmethod
    def _label(engine: Engine, _event: Any = None) -> str:
        """``epoch=E`` at an epoch's end, ``epoch=E_iteration=I`` within it."""
        state = engine.state
        if state.epoch_length and state.iteration % state.epoch_length == 0:
            return f"epoch={state.epoch}"
        return f"epoch={state.epoch}_iteration={state.iteration}"

    def _due(self, engine: Engine, event: int) -> bool:
        """Within-epoch filter on ``ITERATION_COMPLETED``: enough time or iterations since the last save."""
        if self.interval_iterations and engine.state.iteration % self.interval_iterations == 0:
            return True
        return self.interval_seconds > 0 and time.monotonic() - self._last_save >= self.interval_seconds

    def attach(self, engine: Engine) -> ResumableCheckpoint:
        """Resume ``engine`` from an unfinished run's file (if any) when it starts, and save from then on."""
        latest = self.resumable(engine.state.max_epochs)
        if latest is not None:
            CheckpointLoader(str(latest), self.save_dict, map_location=self.map_location).attach(engine)
        if not self.save:
            return self
        saver = Checkpoint(
            self.save_dict,
            DiskSaver(str(self.save_dir), require_empty=False, atomic=True, create_dir=True),
            filename_prefix=self.file_prefix,
            score_function=lambda trained: trained.state.iteration,  # a later save always supersedes
            global_step_transform=self._label,
            filename_pattern="{filename_prefix}_{name}_{global_step}.{ext}",
            n_saved=1,
        )

        def save(trained: Engine) -> None:
            saver(trained)  # skipped by ignite when this iteration was saved already
            self._last_save = time.monotonic()
            for stale in self.saved():  # files of earlier runs
                if stale.name != Path(saver.last_checkpoint).name:
                    stale.unlink(missing_ok=True)

        engine.add_event_handler(Events.STARTED, lambda _: setattr(self, "_last_save", time.monotonic()))
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=self._due), save)
        engine.add_event_handler(Events.EPOCH_COMPLETED, save)
        return self
