"""Run folders and the one training loop both stages share: tagged config, logs, budget, ``fit``.

A run folder is written config first, then checkpoints, logs and pictures (minGPT's
``setup_logging``); training is setup -> :func:`fit` (a stage's step and save hooks) -> a final
evaluation, as in nanoGPT and litgpt. Stage 1 (:mod:`vqvae.train`) and stage 2
(:mod:`vqvae.train_prior`) each bring only their setup, step and save.
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Protocol

import torch
from torch import nn
from tqdm import tqdm

from . import checkpoint as ckpt
from .config import ConfigError, LoopConfig, PriorRunConfig, RunConfig, from_dict, to_dict
from .distributed import Runtime, any_rank, mean_over_ranks

RUN_CONFIG = ckpt.CONFIG_FILE  # config.json, tagged "<stage>-run"; a checkpoint's is "<stage>"
TRAIN_LOG, METRICS_LOG, EVAL_FILE, COMMANDS = ("train.jsonl", "metrics.jsonl", "eval.json",
                                               "command.txt")
TENSORBOARD_DIR = "tensorboard"
LOG_EVERY = 10  # steps averaged into one train.jsonl line
STAGES: dict[str, type] = {ckpt.VQVAE_KIND: RunConfig, ckpt.PRIOR_KIND: PriorRunConfig}


def run_kind(stage: str) -> str:
    return f"{stage}-run"


# --- the run folder ----------------------------------------------------------------------------


def find_run(path: str | Path) -> Path | None:
    """The run folder that holds ``path``: the folder itself, or the run above ``RUN/checkpoints``
    or ``RUN/checkpoints/step-N``; None for a checkpoint outside any run folder."""
    path = Path(path)
    candidates = [path]
    if path.name == ckpt.CHECKPOINTS:
        candidates.append(path.parent)
    elif path.parent.name == ckpt.CHECKPOINTS:
        candidates.append(path.parent.parent)
    for folder in candidates:
        if (folder / RUN_CONFIG).is_file() and not (folder / ckpt.MODEL_FILE).exists():
            kind, _ = ckpt.read_config(folder / RUN_CONFIG)
            if kind is None or kind.endswith("-run"):
                return folder
    return None


def _untagged(raw: dict[str, Any]) -> dict[str, Any]:
    """A run config written before run configs were tagged: the loop's eval count had one name
    per stage."""
    train = dict(raw.get("train") or {})
    for old in ("eval_images", "eval_codes"):
        if old in train:
            train["eval_count"] = train.pop(old)
    return {**raw, "train": train}


def read_run_config(path: str | Path, stage: str) -> Any:
    """The run config of the ``stage`` run folder that holds ``path`` (a run folder, its
    ``checkpoints`` folder or one checkpoint in it): :class:`RunConfig` or
    :class:`PriorRunConfig`. A folder of the other stage is named as such."""
    run_dir = find_run(path)
    if run_dir is None:
        raise ckpt.CheckpointError(f"{path} is not a {stage} run folder (nor a checkpoint inside "
                                   f"one)")
    kind, raw = ckpt.read_config(run_dir / RUN_CONFIG)
    if kind is None:
        raw = _untagged(raw)
    elif kind != run_kind(stage):
        raise ckpt.CheckpointError(f"{run_dir} is a {kind.removesuffix('-run')} run folder, "
                                   f"not a {stage} one")
    return from_dict(STAGES[stage], raw, f"{stage} run config")


def prepare_run(run_dir: Path, stage: str, cfg: Any, resume: bool, start: int) -> None:
    """Create (or, resuming from step ``start``, reuse) a run folder: its tagged config and the
    command line first; logs written after ``start`` are dropped."""
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} already exists and is not empty: pass --resume "
                              f"{run_dir} to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_config(run_dir / RUN_CONFIG, run_kind(stage), to_dict(cfg))
    with open(run_dir / COMMANDS, "a") as f:
        f.write(" ".join(sys.argv) + "\n")
    for log in (TRAIN_LOG, METRICS_LOG):
        truncate_log(run_dir / log, start)


def save_checkpoint(run_dir: Path, step: int, module: nn.Module, stage: str, model_cfg: Any,
                    opt: torch.optim.Optimizer, batch_size: int, runtime: Runtime) -> Path:
    """``RUN/checkpoints/step-N``: weights and config, optimizer and RNG state, and the batch
    layout, so a resume with another process count can say what changed."""
    return ckpt.write_checkpoint(run_dir, step, module, stage, to_dict(model_cfg), opt, extra={
        "world_size": runtime.world_size, "global_batch": batch_size * runtime.world_size})


def restore(run_dir: Path, module: nn.Module, opt: torch.optim.Optimizer, stage: str,
            model_cfg: Any, batch_size: int, runtime: Runtime) -> int:
    """Every rank loads the latest checkpoint (weights, optimizer, rank 0's RNG state); returns
    its step. Warns when the global batch changes (another process count)."""
    meta = ckpt.restore(run_dir, module, opt, stage, model_cfg)
    before, now = int(meta.get("global_batch", batch_size)), batch_size * runtime.world_size
    if before != now and runtime.is_main:
        keep = (f"; --batch-size {before // runtime.world_size} would keep it"
                if before % runtime.world_size == 0 else "")
        warnings.warn(f"the global batch changes from {before} ({meta.get('world_size', 1)} "
                      f"process(es)) to {now} ({runtime.world_size} x --batch-size {batch_size}); "
                      f"the data order continues from another point{keep}")
    return int(meta["step"])


def write_eval(run_dir: Path, step: int, metrics: dict[str, float]) -> None:
    ckpt.write_json(run_dir / EVAL_FILE, {"step": step, "split": "test", **metrics})


# --- jsonl logs ---------------------------------------------------------------------------------


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` (the checkpoint a resume restarts from)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


# --- where the loop's numbers and pictures go ---------------------------------------------------


class Logger:
    """The loop's logging seam: training lines, held-out metrics, pictures. This base class drops
    everything (ranks other than 0); :class:`JsonlLogger` and :class:`TensorBoardLogger` write."""

    def train(self, record: dict[str, float]) -> None:
        pass

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def pictures(self, step: int, paths: dict[str, Path]) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> Logger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


@dataclass
class JsonlLogger(Logger):
    """``train.jsonl`` and ``metrics.jsonl`` in the run folder, and ``curves`` (a function of
    both logs, e.g. a plot) redrawn after every evaluation."""

    run_dir: Path
    curves: Callable[[list[dict], list[dict]], Any] | None = None

    def train(self, record: dict[str, float]) -> None:
        append_jsonl(self.run_dir / TRAIN_LOG, record)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        append_jsonl(self.run_dir / METRICS_LOG, {"step": step, "split": "test", **metrics})
        if self.curves is not None:
            self.curves(read_jsonl(self.run_dir / TRAIN_LOG),
                        read_jsonl(self.run_dir / METRICS_LOG))


class TensorBoardLogger(Logger):
    """Scalars under ``train/`` and ``test/`` and every picture of a checkpoint under
    ``pictures/``, in ``RUN/tensorboard``; a resume drops the events written after its step."""

    def __init__(self, run_dir: Path, start: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("--tensorboard needs the tensorboard package: pip install "
                              "'vqvae[tensorboard]'") from None
        self.writer = SummaryWriter(str(run_dir / TENSORBOARD_DIR),
                                    purge_step=start + 1 if start else None)

    def train(self, record: dict[str, float]) -> None:
        for name, value in record.items():
            if name != "step":
                self.writer.add_scalar(f"train/{name}", value, record["step"])

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"test/{name}", value, step)

    def pictures(self, step: int, paths: dict[str, Path]) -> None:
        from PIL import Image
        import numpy as np

        for name, path in paths.items():
            with Image.open(path) as image:
                self.writer.add_image(f"pictures/{name}", np.asarray(image.convert("RGB")), step,
                                      dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


@dataclass
class Loggers(Logger):
    """Several loggers as one."""

    loggers: list[Logger] = field(default_factory=list)

    def train(self, record: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.train(record)

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        for logger in self.loggers:
            logger.eval(step, metrics)

    def pictures(self, step: int, paths: dict[str, Path]) -> None:
        for logger in self.loggers:
            logger.pictures(step, paths)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def open_logger(run_dir: Path, loop: LoopConfig, start: int, runtime: Runtime,
                curves: Callable[[list[dict], list[dict]], Any] | None = None) -> Logger:
    """The run's loggers on the main process (jsonl, and TensorBoard with ``loop.tensorboard``);
    a logger that drops everything on the other ranks."""
    if not runtime.is_main:
        return Logger()
    loggers: list[Logger] = [JsonlLogger(run_dir, curves)]
    if loop.tensorboard:
        loggers.append(TensorBoardLogger(run_dir, start))
    return Loggers(loggers)


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


class Budget:
    """When a training loop saves and stops: every ``every`` steps and at ``steps``, and early when
    the wall-clock ``minutes`` run out or SIGINT/SIGTERM arrives (a checkpoint first; a second
    SIGINT aborts). All ranks take the stop decision together, so they stop at the same step."""

    def __init__(self, steps: int, every: int, minutes: float | None, runtime: Runtime):
        self.steps, self.every, self.runtime = steps, every, runtime
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.signalled = False
        self._previous: dict[int, Any] = {}

    def check(self, step: int) -> tuple[bool, bool]:
        """(save, stop) after ``step`` steps."""
        out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
        stop = any_rank(out_of_time or self.signalled, self.runtime)
        return step % self.every == 0 or step == self.steps or stop, stop

    def progress(self, start: int, desc: str, enabled: bool = True) -> Progress:
        """The progress bar (main process only)."""
        return Progress(start, self.steps, self.deadline, desc, enabled and self.runtime.is_main)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = True

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

    def step(self, step: int) -> dict[str, torch.Tensor]:
        """One optimisation step after ``step`` steps -> its loss terms (0-d tensors on the
        device, never read here: the loop reads their window means at log time)."""

    def describe(self, step: int, means: dict[str, float]) -> dict[str, float]:
        """More fields for the log line at ``step`` (e.g. codebook health, learning rate)."""

    def save(self, step: int) -> Saved:
        """Checkpoint, pictures and held-out metrics; called on every rank."""

    def postfix(self, record: dict[str, float], metrics: dict[str, float]) -> dict[str, str]:
        """What the progress bar shows from the last log line and held-out metrics."""


def fit(stage: Stage, loop: LoopConfig, runtime: Runtime, start: int, logger: Logger,
        desc: str, progress: bool = True) -> int:
    """Run ``stage`` from step ``start`` until ``loop.steps``, the ``loop.minutes`` budget or a
    signal: a log line every :data:`LOG_EVERY` steps, a save every ``loop.every`` steps and at
    the end. Returns the step reached. A non-finite loss stops the run before it is saved."""
    step, metrics = start, {}
    window: dict[str, torch.Tensor] = {}
    window_steps, t_window = 0, time.perf_counter()
    with Budget(loop.steps, loop.every, loop.minutes, runtime) as budget:
        bar = budget.progress(start, desc, progress)
        while step < loop.steps:
            for name, value in stage.step(step).items():  # summed on the device: no host sync
                window[name] = value.detach() + window[name] if name in window else value.detach()
            step += 1
            window_steps += 1
            if step % LOG_EVERY == 0 or step == loop.steps:
                record = _log_line(stage, step, window, window_steps,
                                   time.perf_counter() - t_window, runtime)
                window, window_steps, t_window = {}, 0, time.perf_counter()
                logger.train(record)
                bar.set_postfix(stage.postfix(record, metrics))
            bar.update(step)
            save, stop = budget.check(step)
            if save:
                metrics, pictures = stage.save(step)
                logger.eval(step, metrics)
                logger.pictures(step, pictures)
            if stop:
                break
        bar.close()
    return step


def _log_line(stage: Stage, step: int, window: dict[str, torch.Tensor], steps: int,
              seconds: float, runtime: Runtime) -> dict[str, float]:
    """The window's mean loss terms over steps and ranks (one host sync), the stage's fields and
    the speed; a non-finite value raises."""
    names = list(window)
    sums = torch.stack([window[name].float() for name in names]).cpu().tolist()
    means = mean_over_ranks({name: s / steps for name, s in zip(names, sums)}, runtime)
    record = {"step": step, **means, **stage.describe(step, means),
              "steps_per_s": steps / max(seconds, 1e-9)}
    if not all(math.isfinite(v) for v in record.values()):
        raise FloatingPointError(f"loss became non-finite at step {step}: {record}")
    return record


@dataclass(frozen=True)
class RunResult:
    """What a training function returns: where, how far, the final held-out metrics, pictures."""

    run_dir: Path
    step: int
    metrics: dict[str, float]
    pictures: dict[str, Path]
