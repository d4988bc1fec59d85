"""The one run driver both stages share: take the run folder, restore, prepare it, fit, evaluate,
report (litgpt's setup -> fit -> validate -> save, written once for both stages).

A stage brings a :class:`Stage`: its model, optimizer and companions as a
:class:`~vqvae.store.runs.TrainingState`, one training step, its log fields, pictures and
held-out metrics, and what it does after a save or at the end (stage 2 keeps its best
checkpoint). Everything else, in this order, is here.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ContextManager, NamedTuple, Protocol

import torch

from ..config import LoopConfig
from ..distributed import Runtime, main_does
from ..models.ema import EMA, WeightEMA
from ..precision import numerics
from ..store.runs import (TrainingState, check_steps, opened, record_hardware, restore,
                          save_checkpoint, write_eval)
from .loggers import check_loggers, open_logger
from .loop import Saved, fit
from .schedule import RunClock


class Scored(NamedTuple):
    metrics: dict[str, float]  # held-out metrics (every rank)
    extra: Any = None  # what else the evaluation found (stage 1: per-code counts)


class Stage(Protocol):
    """What a stage brings to :func:`run`."""

    run_dir: Path
    runtime: Runtime
    state: TrainingState
    desc: str  # the progress bar's label
    halt: str | None  # why to stop after the next save (data gone bad), set alike on every rank

    @property
    def loop(self) -> LoopConfig: ...

    def prepare(self, start: int) -> None:
        """Write the run folder's config and whatever else must be there first (rank 0)."""

    def begin(self, clock: RunClock) -> None:
        """After the restore: whatever reads the restored state or the run's clock."""

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step (:class:`vqvae.training.loop.Stage`)."""

    def describe(self, step: int, means: dict[str, float]) -> dict[str, float]: ...

    def postfix(self, record: dict[str, float], metrics: dict[str, float]) -> dict[str, str]: ...

    def curves(self, train: list[dict], evals: list[dict]) -> Any:
        """Redraw the run's curves from its logs (rank 0, after every evaluation)."""

    def pictures(self, step: int | None) -> dict[str, Path]:
        """The pictures of a checkpoint at ``step``, or the run's final ones (None); rank 0."""

    def evaluate(self, limit: int) -> Scored:
        """Held-out metrics of the first ``limit`` examples (0: all); on every rank."""

    def saved(self, step: int, scored: Scored, checkpoint: Path) -> dict[str, Path]:
        """After a checkpoint is written and scored (rank 0): more pictures."""

    def finished(self, step: int, scored: Scored) -> dict[str, Path]:
        """After the final evaluation (rank 0): more pictures, warnings."""

    def headline(self, step: int, metrics: dict[str, float]) -> str: ...


@dataclass(frozen=True)
class RunResult:
    """What a training function returns: where, how far, the final held-out metrics, pictures."""

    run_dir: Path
    step: int
    metrics: dict[str, float]
    pictures: dict[str, Path]
    headline: str = ""  # what was trained, how far, where, and the held-out metrics
    signal: int | None = None  # the signal that stopped the run before its --steps

    def summary(self) -> str:
        """What ``vqvae train`` / ``train-prior`` print: the headline, then the files."""
        files = {**self.pictures, "curves": self.run_dir / "curves.png",
                 "metrics": self.run_dir / "eval.json"}
        return "\n".join([self.headline, *(f"  {name}: {path}" for name, path in files.items())])


class _Hooks:
    """:func:`fit`'s view of a stage: its step, log fields and progress postfix, and a save that
    writes the checkpoint (rank 0), the pictures (rank 0) and scores it (every rank)."""

    def __init__(self, stage: Stage, clock: RunClock):
        self.stage, self.clock = stage, clock
        self.describe, self.postfix = stage.describe, stage.postfix
        self.ema = weight_ema(stage.state)

    @property
    def halt(self) -> str | None:
        return self.stage.halt

    def step(self, step: int) -> dict[str, torch.Tensor]:
        losses = self.stage.step(step)
        if self.ema is not None:
            self.ema.update(self.stage.state.model, step + 1)
        return losses

    def save(self, step: int) -> Saved:
        stage, main = self.stage, self.stage.runtime.is_main
        checkpoint = (save_checkpoint(stage.run_dir, step, stage.state, stage.loop,
                                      stage.runtime, self.clock.seconds) if main else None)
        with averaged(stage.state):
            pictures = stage.pictures(step) if main else {}
            scored = stage.evaluate(stage.loop.eval_count)  # every rank: sharded
            if checkpoint is not None:
                pictures |= stage.saved(step, scored, checkpoint)
        return Saved(scored.metrics, pictures)


def add_weight_ema(state: TrainingState, decay: float) -> None:
    """With ``decay`` (``--weight-ema``), keep the weights' moving average beside the model: a
    companion, so checkpoints save and resumes restore it."""
    if decay:
        state.companions[EMA] = (WeightEMA(state.model, decay), None)


def weight_ema(state: TrainingState) -> WeightEMA | None:
    ema = state.companions.get(EMA)
    return None if ema is None else ema[0]  # type: ignore[return-value]


def averaged(state: TrainingState) -> ContextManager[None]:
    """The model holds its moving average inside the block (when it keeps one)."""
    ema = weight_ema(state)
    return nullcontext() if ema is None else ema.applied(state.model)


def run(stage: Stage, *, resume: bool = False, progress: bool = True) -> RunResult:
    """Train ``stage`` in its run folder (a new one, or with ``resume`` the one it continues)
    until its steps, its minutes or a signal; returns the final held-out metrics."""
    tc, runtime, run_dir = stage.loop, stage.runtime, stage.run_dir
    check_loggers(tc)
    add_weight_ema(stage.state, tc.weight_ema)
    with numerics(tc.precision, runtime.device, tc.deterministic), opened(run_dir, resume,
                                                                           runtime):
        start, seconds = (restore(run_dir, stage.state, tc.batch_size, runtime) if resume
                          else (0, 0.0))
        check_steps(start, tc.steps, seconds, tc.minutes)
        main_does(lambda: stage.prepare(start), runtime, "prepare the run folder")
        main_does(lambda: record_hardware(run_dir, start, runtime), runtime, "record the hardware")
        clock = RunClock(tc.steps, tc.minutes, seconds)
        stage.begin(clock)
        stage.state.model.train()
        with open_logger(run_dir, tc, start, runtime, stage.curves) as logger:
            step, signum = fit(_Hooks(stage, clock), tc, runtime, start, logger, stage.desc,
                               progress, clock)
        with averaged(stage.state):
            pictures = stage.pictures(None) if runtime.is_main else {}
            final = stage.evaluate(0)
        if runtime.is_main:
            pictures |= stage.finished(step, final)
            write_eval(run_dir, step, final.metrics)
    return RunResult(run_dir, step, final.metrics, pictures,
                     stage.headline(step, final.metrics), signum)

