"""The learning-rate schedule both stages' loops follow: linear warm-up, then constant or a
cosine to zero at the end of the run (by steps, or by the share of a --minutes budget spent), and
the clock that says how far a run is."""

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


class Schedule:
    """A loop config's schedule (``lr``, ``warmup``, ``schedule``, ``steps``, ``minutes``)
    applied to an optimizer step by step; ``lr`` is the last rate set."""

    def __init__(self, tc: LoopConfig, opt: torch.optim.Optimizer,
                 clock: RunClock | None = None):
        self.tc, self.opt, self.lr = tc, opt, tc.lr
        self.clock = clock or RunClock(tc.steps, tc.minutes)

    def set(self, step: int) -> float:
        tc = self.tc
        self.lr = learning_rate(step, tc.lr, tc.warmup, tc.schedule, self.clock.progress(step))
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        return self.lr
