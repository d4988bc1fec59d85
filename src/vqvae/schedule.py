"""The learning-rate schedule both stages' loops follow: linear warm-up, then constant or a
cosine to zero at the end of the run (by steps, or by the share of a --minutes budget spent)."""

from __future__ import annotations

import math
import time

import torch

from .config import LoopConfig


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
    """How far a run is, for the schedule: ``step / steps``, or when a ``minutes`` budget ends
    the run first, the share of it spent (this invocation's: a resumed --minutes run anneals
    again over its own budget). Runs bounded by --steps alone depend on the step only, so they
    resume exactly."""

    def __init__(self, steps: int, minutes: float | None):
        self.steps, self.seconds = steps, None if minutes is None else 60.0 * minutes
        self.t0 = time.monotonic()

    def progress(self, step: int) -> float:
        done = step / self.steps
        if self.seconds is not None:
            done = max(done, (time.monotonic() - self.t0) / self.seconds)
        return min(done, 1.0)


class Schedule:
    """A loop config's schedule (``lr``, ``warmup``, ``schedule``, ``steps``, ``minutes``)
    applied to an optimizer step by step; ``lr`` is the last rate set."""

    def __init__(self, tc: LoopConfig, opt: torch.optim.Optimizer):
        self.tc, self.opt, self.lr = tc, opt, tc.lr
        self.clock = RunClock(tc.steps, tc.minutes)

    def set(self, step: int) -> float:
        tc = self.tc
        self.lr = learning_rate(step, tc.lr, tc.warmup, tc.schedule, self.clock.progress(step))
        for group in self.opt.param_groups:
            group["lr"] = self.lr
        return self.lr
