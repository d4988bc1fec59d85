"""The learning-rate schedule both stages' loops follow: linear warm-up, then constant or a
cosine to zero at the end of the run (by steps, or by the share of a --minutes budget spent), the
clock that says how far a run is, and a run's budget split into a main and a last phase."""

from __future__ import annotations

import math
import time

import torch

from ..config import LoopConfig


def learning_rate(step: int, peak: float, warmup: int, schedule: str = "constant",
                  progress: float = 0.0) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then ``peak`` (constant) or a cosine
    that reaches zero when ``progress`` (the share of the run done, in [0, 1]) does: a run whose
    end is known gains from annealing into it, most of all a short one."""
    if warmup and step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


class RunClock:
    """How far a run is: its step out of ``steps`` and, with a ``minutes`` budget, its training
    seconds out of it (counted over all the run's invocations: ``spent`` before this one, saved
    in its checkpoints), whichever is further. The schedule reads the seconds recorded at the
    last :meth:`tick` (which the loop makes after every step, with the value all ranks agreed
    on), so every rank sets the same rate, and a resumed run goes on from where its time share
    stopped. Runs bounded by --steps alone depend on the step only: they resume exactly."""

    def __init__(self, steps: int, minutes: float | None, spent: float = 0.0):
        self.steps, self.budget = steps, None if minutes is None else 60.0 * minutes
        self.spent = spent  # the run's training seconds before this invocation
        self.t0 = time.monotonic()
        self.seconds = spent  # the run's training seconds at the last tick

    def start(self) -> None:
        """This invocation's training starts now (the loop's; setup before it does not count)."""
        self.t0 = time.monotonic()

    def elapsed(self) -> float:
        """The run's training seconds now, by this process's clock."""
        return self.spent + time.monotonic() - self.t0

    def out_of_time(self) -> bool:
        return self.budget is not None and self.elapsed() >= self.budget

    def remaining(self) -> float | None:
        """Seconds left of the budget (None: no time budget)."""
        return None if self.budget is None else self.budget - self.elapsed()

    def tick(self, seconds: float | None = None) -> None:
        """Record the run's seconds now (``seconds``: the value the ranks agreed on)."""
        self.seconds = self.elapsed() if seconds is None else seconds

    def progress(self, step: int) -> float:
        done = step / self.steps
        if self.budget is not None:
            done = max(done, self.seconds / self.budget)
        return min(done, 1.0)


class Phases:
    """A run's budget in two phases: the main one, then the last ``share`` of its steps or
    minutes (stage 1's ``--sharpen``). Which phase a step is in follows from the clock alone (its
    progress only grows, and a resumed run restores it), so the split resumes exactly."""

    def __init__(self, clock: RunClock, share: float = 0.0):
        self.clock, self.share = clock, share

    def last(self, step: int) -> bool:
        """Whether ``step`` trains in the last phase."""
        return self.share > 0 and self.clock.progress(step) >= 1.0 - self.share

    def progress(self, step: int) -> float:
        """The share of ``step``'s own phase done, in [0, 1]."""
        done = self.clock.progress(step)
        if not self.last(step):
            return done / (1.0 - self.share)
        return (done - (1.0 - self.share)) / self.share


class Schedule:
    """A loop config's schedule (``lr``, ``warmup``, ``schedule``, ``steps``, ``minutes``)
    applied to an optimizer step by step; ``lr`` is the last rate set. With ``phases`` of a
    last share, each phase has its own: the main one warms up and anneals within its share, the
    last one starts at ``last_scale`` x ``lr`` (no warm-up) and anneals within its own."""

    def __init__(self, tc: LoopConfig, opt: torch.optim.Optimizer,
                 clock: RunClock | None = None, phases: Phases | None = None,
                 last_scale: float = 1.0):
        self.tc, self.opt, self.lr = tc, opt, tc.lr
        self.clock = clock or RunClock(tc.steps, tc.minutes)
        self.phases = phases or Phases(self.clock)
        self.last_scale = last_scale

    def set(self, step: int) -> float:
        tc, progress = self.tc, self.phases.progress(step)
        if self.phases.last(step):
            self.lr = learning_rate(step, tc.lr * self.last_scale, 0, tc.schedule, progress)
        else:
            self.lr = learning_rate(step, tc.lr, tc.warmup, tc.schedule, progress)
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        return self.lr
