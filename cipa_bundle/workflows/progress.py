"""A training progress bar that shows the run's remaining time beside the epoch's.

ignite's :class:`~ignite.handlers.ProgressBar` shows the epoch's elapsed and remaining time (tqdm's
``[elapsed<remaining]``). On a CPU a paper-size run lasts days, so the bar also shows ``run_left``: the wall time
per iteration since this run started (validation included once one has run), times the iterations still to go.
"""

from __future__ import annotations

import time

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

__all__ = ["TrainingProgressBar", "format_duration"]


def format_duration(seconds: float) -> str:
    """``3725.0`` -> ``"1:02:05"``; ``90000`` -> ``"1d 1:00:00"``."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    clock = f"{hours}:{minutes:02d}:{secs:02d}"
    return f"{days}d {clock}" if days else clock


class TrainingProgressBar:
    """ignite's progress bar with the run's remaining time (``run_left``) in its postfix.

    Args:
        persist: keep each epoch's finished bar on screen.
    """

    def __init__(self, persist: bool = True) -> None:
        self.bar = ProgressBar(persist=persist)
        self._start_time = 0.0
        self._start_iteration: int | None = None

    def _started(self, engine: Engine) -> None:
        self._start_iteration = None
        engine.state.run_left = "?"

    def _iteration_started(self, engine: Engine) -> None:
        # The first iteration of this run, known only now: a resumed run's state is loaded by another STARTED handler.
        if self._start_iteration is None:
            self._start_iteration = engine.state.iteration - 1
            self._start_time = time.monotonic()

    def _update(self, engine: Engine) -> None:
        done = engine.state.iteration - (self._start_iteration or 0)
        total = (engine.state.max_epochs or 0) * (engine.state.epoch_length or 0)
        if done > 0 and total:
            per_iteration = (time.monotonic() - self._start_time) / done
            engine.state.run_left = format_duration(per_iteration * max(0, total - engine.state.iteration))

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.ITERATION_STARTED, self._iteration_started)
        # Registered before the bar's own handler, so the bar shows this iteration's estimate.
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._update)
        self.bar.attach(engine, state_attributes=["run_left"])
