"""The one training loop both stages share: ``fit`` over a stage's step and save hooks, with the
budget (steps, minutes, signals) and a progress bar whose ETA is true.

Training is setup -> :func:`fit` -> a final evaluation, as in nanoGPT and litgpt; the run driver
(:mod:`vqvae.training.driver`) does all of it around :func:`fit` for both stages, which bring
only what differs (:mod:`vqvae.training.stage1`, :mod:`vqvae.training.stage2`).
"""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from tqdm import tqdm

from ..config import LoopConfig
from ..distributed import Runtime, any_rank, mean_over_ranks, stop_and_seconds
from ..errors import DataError, NonFiniteError
from .loggers import Logger
from .schedule import RunClock

LOG_EVERY = 10  # steps averaged into one train.jsonl line


# --- budget and progress ------------------------------------------------------------------------


def projected_total(step: int, steps: int, done: int, elapsed: float, left: float) -> int:
    """The step a run at ``step`` will stop at: ``steps``, or the step the deadline (``left``
    seconds away) arrives at when ``done`` steps took ``elapsed`` seconds."""
    if done <= 0 or elapsed <= 0:
        return steps
    return min(steps, step + max(0, int(done / elapsed * max(left, 0.0))))


class Progress:
    """A progress bar over the binding budget: ``steps``, or with a deadline the step it will be
    reached at (re-projected as the run goes), so its ETA is true for --minutes runs too.
    Sparse lines when stderr is not a terminal."""

    def __init__(self, start: int, steps: int, deadline: float | None, desc: str, enabled: bool):
        self.start, self.steps, self.deadline = start, steps, deadline
        self.t0 = time.monotonic()
        self.bar = tqdm(total=steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                        disable=not enabled, mininterval=0.1 if sys.stderr.isatty() else 15.0)

    def update(self, step: int) -> None:
        if self.deadline is not None:
            now = time.monotonic()
            self.bar.total = projected_total(step, self.steps, step - self.start, now - self.t0,
                                             self.deadline - now)
        self.bar.update(1)

    def set_postfix(self, values: dict[str, str]) -> None:
        self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()  # also on an error, so its message starts on a line of its own


class Budget:
    """When a training loop saves and stops: every ``every`` steps and at ``steps``, and early when
    the run's wall-clock ``minutes`` (``clock``'s, counted over its invocations) run out or
    SIGINT/SIGTERM arrives (a checkpoint first; a second SIGINT aborts). All ranks take the stop
    decision together, so they stop at the same step, and tick the clock with the same seconds."""

    def __init__(self, steps: int, every: int, clock: RunClock, runtime: Runtime):
        self.steps, self.every, self.runtime, self.clock = steps, every, runtime, clock
        clock.start()
        left = clock.remaining()
        self.deadline = None if left is None else time.monotonic() + left
        self.signum: int | None = None  # the first SIGINT/SIGTERM received
        self._previous: dict[int, Any] = {}

    def check(self, step: int) -> tuple[bool, bool]:
        """(save, stop) after ``step`` steps."""
        stop, seconds = stop_and_seconds(self.clock.out_of_time() or self.signum is not None,
                                         self.clock.elapsed(), self.runtime)
        self.clock.tick(seconds)
        return step % self.every == 0 or step == self.steps or stop, stop

    def progress(self, start: int, desc: str, enabled: bool = True) -> Progress:
        """The progress bar (main process only)."""
        return Progress(start, self.steps, self.deadline, desc, enabled and self.runtime.is_main)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def __enter__(self) -> Budget:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no signal handling
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# --- the loop -----------------------------------------------------------------------------------


class Saved(NamedTuple):
    metrics: dict[str, float]  # held-out metrics at this checkpoint (every rank)
    pictures: dict[str, Path]  # name -> PNG written with it (main process)


class Stage(Protocol):
    """What a stage brings to :func:`fit`."""

    # Set (on every rank alike) when the stage's data went bad: fit saves, then stops with it.
    halt: str | None

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step after ``step`` steps -> its loss terms (0-d tensors on the
        device, never read here: the loop reads their window means at log time)."""

    def describe(self, step: int, means: dict[str, float]) -> dict[str, float]:
        """More fields for the log line at ``step`` (e.g. codebook health, learning rate)."""

    def save(self, step: int) -> Saved:
        """Checkpoint, pictures and held-out metrics; called on every rank."""

    def postfix(self, record: dict[str, float], metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows from the last log line and held-out metrics."""


class Finished(NamedTuple):
    step: int  # the step reached (and saved)
    signal: int | None  # the signal that stopped the run early (SIGINT, SIGTERM), if one did


def fit(stage: Stage, loop: LoopConfig, runtime: Runtime, start: int, logger: Logger,
        desc: str, progress: bool = True, clock: RunClock | None = None) -> Finished:
    """Run ``stage`` from step ``start`` until ``loop.steps``, the ``loop.minutes`` budget (of
    ``clock``: the one the stage's schedule reads and its checkpoints save) or a signal: a log
    line every :data:`LOG_EVERY` steps, a save every ``loop.every`` steps and at the end. A
    non-finite loss term raises :class:`NonFiniteError` before anything after the last good
    checkpoint is saved (checked at every save and log line, one host sync each); a stage that
    sets ``halt`` is saved, then stopped with a :class:`DataError` saying why."""
    clock = clock or RunClock(loop.steps, loop.minutes)
    step, metrics, saved = start, {}, start
    window: dict[str, torch.Tensor] = {}
    window_steps, t_window = 0, time.perf_counter()
    with (Budget(loop.steps, loop.every, clock, runtime) as budget,
          budget.progress(start, desc, progress) as bar):
        while step < loop.steps:
            for name, value in stage.step(step).items():  # summed on the device: no host sync
                # a copy, not the tensor itself: a CUDA graph overwrites its outputs on replay
                window[name] = (value.detach() + window[name] if name in window
                                else value.detach().clone())
            step += 1
            window_steps += 1
            if step % LOG_EVERY == 0 or step == loop.steps:
                record = _log_line(stage, step, window, window_steps,
                                   time.perf_counter() - t_window, runtime)
                window, window_steps, t_window = {}, 0, time.perf_counter()
                if not all(math.isfinite(v) for v in record.values()):
                    raise NonFiniteError(_diverged(step, saved))
                logger.train(record)
                bar.set_postfix(stage.postfix(record, metrics))
            bar.update(step)
            save, stop = budget.check(step)
            save = save or stage.halt is not None
            if save and window and any_rank(not _finite(window), runtime):
                raise NonFiniteError(_diverged(step, saved))
            if save:
                metrics, pictures = stage.save(step)
                saved = step
                logger.eval(step, metrics)
                logger.pictures(step, pictures)
            if stage.halt is not None:
                raise DataError(f"{stage.halt}: stopped; step {step} is saved (resume with "
                                f"--resume once the data is whole)")
            if stop:
                break
    return Finished(step, budget.signum)


def _finite(window: dict[str, torch.Tensor]) -> bool:
    return bool(torch.stack([v.float() for v in window.values()]).isfinite().all())


def _diverged(step: int, saved: int) -> str:
    last = f"step {saved} stays the latest checkpoint" if saved else "no checkpoint was written"
    return f"the loss became non-finite by step {step} (lower --lr?): stopped; {last}"


def _log_line(stage: Stage, step: int, window: dict[str, torch.Tensor], steps: int,
              seconds: float, runtime: Runtime) -> dict[str, float]:
    """The window's mean loss terms over steps and ranks (one host sync), the stage's fields and
    the speed."""
    names = list(window)
    sums = torch.stack([window[name].float() for name in names]).cpu().tolist()
    means = mean_over_ranks({name: s / steps for name, s in zip(names, sums)}, runtime)
    record = {"step": step, **means, **stage.describe(step, means),
              "steps_per_s": steps / max(seconds, 1e-9)}
    return record
