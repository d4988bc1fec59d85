"""Run folders, the same for both stages: a tagged config, checkpoints, logs and where they go.

A run folder is written config first, then checkpoints, logs and pictures (minGPT's
``setup_logging``). Its ``config.json`` has the format of a checkpoint's (``{"kind", "format",
"config"}``, kind ``vqvae-run`` or ``prior-run``) and one reader, which also finds the run above a
checkpoint folder. The training loop itself is :func:`vqvae.training.loop.fit`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import sys
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from ..config import LoopConfig, PriorRunConfig, RunConfig, from_dict, to_dict
from ..distributed import Runtime, main_does
from ..errors import CheckpointError, ConfigError, NonFiniteError, RunLockedError
from ..fileio import named, write_bytes, write_json
from . import checkpoint as ckpt

RUN_CONFIG = ckpt.CONFIG_FILE  # config.json, tagged "<stage>-run"; a checkpoint's is "<stage>"
TRAIN_LOG, METRICS_LOG, EVAL_FILE, COMMANDS = ("train.jsonl", "metrics.jsonl", "eval.json",
                                               "command.txt")
TENSORBOARD_DIR, LOCK = "tensorboard", ".lock"
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
        if ((folder / RUN_CONFIG).is_file() and not (folder / ckpt.MODEL_FILE).exists()
                and not ckpt.diffusers_class(folder)):
            kind, _ = ckpt.read_config(folder / RUN_CONFIG)
            if kind is None or kind.endswith("-run"):
                return folder
    return None


def beside(path: str | Path, name: str) -> Path:
    """``name`` in the run folder holding ``path`` (a run, its checkpoints, one checkpoint), or
    beside a checkpoint outside any run: where a command on ``path`` writes by default."""
    return (find_run(path) or Path(path)) / name


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
        raise CheckpointError(f"{path} is not a {stage} run folder (nor a checkpoint inside "
                                   f"one)")
    kind, raw = ckpt.read_config(run_dir / RUN_CONFIG)
    if kind is None:
        raw = _untagged(raw)
    elif kind != run_kind(stage):
        raise CheckpointError(f"{run_dir} is a {kind.removesuffix('-run')} run folder, "
                                   f"not a {stage} one")
    return from_dict(STAGES[stage], raw, f"{stage} run config")



class RunLock:
    """An advisory lock on a run folder: ``RUN/.lock`` names the holder's pid and host. A lock
    whose process is gone (same host) is taken over with a warning; one from another host is
    respected (its owner may be alive), and the message says how to clear it."""

    STALE_EMPTY_S = 60.0  # a lock file left empty this long: its writer died before writing

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK
        self.held = False

    def acquire(self) -> None:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self._stale():
                    raise RunLockedError(self._refusal()) from None
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise RunLockedError(f"could not take {self.path}: other processes keep taking it")

    def _refusal(self) -> str:
        """Why the lock is refused, and how to clear it: a live pid on this host may be another
        program that reused a dead run's pid (its command line is named where it can be read)."""
        holder = self._holder()
        pid, host = holder.get("pid", "?"), holder.get("host", "?")
        where = f"{self.path.parent} is in use by pid {pid} on {host}"
        if host == socket.gethostname() and isinstance(pid, int):
            command = _command_line(pid)
            return (f"{where}{f' ({command})' if command else ''}, which is alive but may not "
                    f"be vqvae: wait for it to finish, or delete {self.path} if no vqvae run "
                    f"uses this folder")
        return f"{where}: wait for it to finish, or delete {self.path} if that process is gone"

    def _holder(self) -> dict[str, Any]:
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _stale(self) -> bool:
        """True (and the lock removed, with a warning) when its holder is known to be gone."""
        holder = self._holder()
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True  # released meanwhile: try again
        if not holder:
            gone = age > self.STALE_EMPTY_S
        elif holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        else:
            gone = not _alive(holder["pid"])
        if gone:
            warnings.warn(f"taking over {self.path} from pid {holder.get('pid', '?')}, which is "
                          f"no longer running")
            self.path.unlink(missing_ok=True)
        return gone

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _command_line(pid: int, limit: int = 60) -> str | None:
    """A process's command line, shortened (Linux's /proc); None where it cannot be read."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    text = " ".join(part.decode(errors="replace") for part in raw.split(b"\0") if part)
    return (text if len(text) <= limit else text[:limit - 3] + "...") or None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


HARDWARE = "hardware.jsonl"  # a line per start of a run: what ran it (record_hardware)
# What a start writes before its first step (prepare_run, record_hardware), and the lock.
STARTED_BY_PREPARE = (RUN_CONFIG, COMMANDS, TRAIN_LOG, METRICS_LOG, HARDWARE)


def _never_started(run_dir: Path) -> bool:
    """True for a run folder holding only what a start writes (:func:`prepare_run`'s run config,
    command line and empty logs, :func:`record_hardware`'s line), a lock and a killed writer's
    temporary files: a run whose start failed (its data's first batch, say) before it trained
    a step."""
    names = {p.name for p in run_dir.iterdir()
             if not (p.name.startswith(".") and ".tmp" in p.name and p.is_file())}
    if RUN_CONFIG not in names or not names <= {*STARTED_BY_PREPARE, LOCK}:
        return False
    if any(not (run_dir / name).is_file() for name in names):
        return False
    if any((run_dir / log).stat().st_size for log in (TRAIN_LOG, METRICS_LOG) if log in names):
        return False
    try:
        kind, _ = ckpt.read_config(run_dir / RUN_CONFIG)
    except (CheckpointError, OSError):
        return False
    return kind is not None and kind.endswith("-run")


@contextmanager
def opened(run_dir: Path, resume: bool, runtime: Runtime) -> Iterator[None]:
    """Hold ``run_dir`` for the block (rank 0): a new run folder must be empty (it is created), a
    resumed one must exist; its lock is taken first and what a killed writer left is removed."""
    lock = RunLock(run_dir)

    def take() -> None:
        if run_dir.exists() and not run_dir.is_dir():
            raise FileExistsError(f"{run_dir} is a file, not a run folder")
        if resume and not run_dir.is_dir():
            raise CheckpointError(f"{run_dir} not found: nothing to resume")
        if not resume and run_dir.exists() and any(run_dir.iterdir()):
            if _never_started(run_dir):
                lock.acquire()  # a run starting there now still holds it: refused
                for name in STARTED_BY_PREPARE:
                    (run_dir / name).unlink(missing_ok=True)
                ckpt.clean_stale(run_dir)
                warnings.warn(f"{run_dir} held only the config of a run whose start failed "
                              f"before its first step: it is reused")
                return
            raise FileExistsError(f"{run_dir} already exists and is not empty: pass --resume "
                                  f"{run_dir} to continue it, or choose another --out")
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
        ckpt.clean_stale(run_dir)

    main_does(take, runtime, "take the run folder")
    try:
        yield
    finally:
        lock.release()


def check_steps(start: int, steps: int, seconds: float = 0.0,
                minutes: float | None = None) -> None:
    """A resume must have steps left to train, and time left of a --minutes budget (the run's
    training ``seconds`` so far count against it)."""
    if start >= steps:
        raise ConfigError(f"the run is already at step {start}: give --steps above {start} to "
                          f"train on")
    if minutes is not None and seconds >= 60 * minutes:
        raise ConfigError(f"the run has spent its --minutes {minutes:g} budget (it trained "
                          f"{seconds / 60:.2f} minutes): give --minutes above {seconds / 60:.2f} "
                          f"to train on")


def record_hardware(run_dir: Path, start: int, runtime: Runtime) -> None:
    """Append what this start of the run (at step ``start``) runs on: the device and its name,
    the processes, CPU cores and the torch version (for reports; nothing reads it back)."""
    device = runtime.device
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else platform.processor() or platform.machine())
    append_jsonl(run_dir / HARDWARE, {"step": start, "device": str(device), "name": name,
                                      "processes": runtime.world_size,
                                      "cpus": os.cpu_count(), "torch": torch.__version__})


def prepare_run(run_dir: Path, stage: str, cfg: Any, start: int) -> None:
    """Write a held run folder's tagged config and the command line (first, before anything
    else); logs written after ``start`` (the step resumed from) are dropped."""
    ckpt.write_config(run_dir / RUN_CONFIG, run_kind(stage), to_dict(cfg))
    append_line(run_dir / COMMANDS, " ".join(sys.argv))
    for log in (TRAIN_LOG, METRICS_LOG):
        truncate_log(run_dir / log, start)



@dataclass
class TrainingState:
    """What a run's checkpoint holds: the model (saved with its ``kind`` tag and its config), its
    optimizer, fp16's loss scaler and the modules trained beside it (the GAN's discriminator)."""

    kind: str
    model: nn.Module
    config: Any  # the model's config dataclass
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None = None
    companions: ckpt.Companions = field(default_factory=dict)


def _tensors(state: TrainingState) -> Iterator[tuple[str, torch.Tensor]]:
    """(what it is, tensor) for every floating-point tensor a checkpoint of ``state`` holds."""
    parts = {"": (state.model, state.optimizer),
             **{f"{name} ": pair for name, pair in state.companions.items()}}
    for prefix, (module, optimizer) in parts.items():
        names = {id(p): n for n, p in module.named_parameters()}
        yield from ((f"{prefix}parameter {n}", p) for n, p in module.named_parameters())
        yield from ((f"{prefix}buffer {n}", b) for n, b in module.named_buffers())
        for param, slots in (optimizer.state.items() if optimizer is not None else ()):
            yield from ((f"{prefix}optimizer state {key} of {names.get(id(param), '?')}", v)
                        for key, v in slots.items() if torch.is_tensor(v))


def non_finite(state: TrainingState) -> str | None:
    """What in ``state`` is not finite (``"buffer encoder.1.running_var"``, ``"parameter ..."``,
    ``"optimizer state exp_avg of ..."``, a companion's prefixed by its name), or None: one
    host sync when everything is finite."""
    tensors = [(what, t) for what, t in _tensors(state) if t.is_floating_point()]
    if not tensors:
        return None
    device = tensors[0][1].device  # the model's: CPU-held flags (Adam's step) copy over, no sync
    flags = [t.detach().isfinite().all().to(device, non_blocking=True) for _, t in tensors]
    if bool(torch.stack(flags).all()):
        return None
    return next(what for what, t in tensors if not bool(t.detach().isfinite().all()))


def save_checkpoint(run_dir: Path, step: int, state: TrainingState, loop: LoopConfig,
                    runtime: Runtime, seconds: float = 0.0) -> Path:
    """``RUN/checkpoints/step-N``: weights and config, optimizer and RNG state, fp16's loss scale,
    the run's training ``seconds`` so far (its --minutes budget spans invocations) and the batch
    layout, so a resume with another process count can say what changed.
    Nothing non-finite is ever written (a parameter, a buffer such as BatchNorm's statistics or
    the EMA codebook's, a companion's, the optimizer's state): :class:`NonFiniteError` naming it,
    and ``latest`` stays on the last good checkpoint."""
    bad = non_finite(state)
    if bad is not None:
        raise NonFiniteError(f"{bad} became non-finite by step {step} (lower --lr?); stopped "
                             f"without saving it: {run_dir / ckpt.CHECKPOINTS} keeps the last "
                             f"good checkpoint as latest")
    scaler = state.scaler
    return ckpt.write_checkpoint(
        run_dir, step, state.model, state.kind, to_dict(state.config), state.optimizer, extra={
            "world_size": runtime.world_size,
            "global_batch": loop.batch_size * runtime.world_size, "seconds": round(seconds, 3),
            **({"loss_scaler": scaler.state_dict()} if scaler is not None and scaler.is_enabled()
               else {})},
        keep=loop.keep, keep_every=loop.keep_every, companions=state.companions)


def restore(run_dir: Path, state: TrainingState, batch_size: int,
            runtime: Runtime) -> tuple[int, float]:
    """Every rank loads the latest checkpoint (weights, optimizer, rank 0's RNG state, fp16's loss
    scale, companions); returns its step and the run's training seconds by then (0 from a
    checkpoint that predates them). Warns when the global batch changes (another process
    count). A run killed before its first checkpoint starts again from step 0."""
    try:
        directory = ckpt.resolve(run_dir)  # once: a bad `latest` warns once
    except CheckpointError:
        if not (run_dir / RUN_CONFIG).is_file():
            raise
        if runtime.is_main:
            warnings.warn(f"{run_dir} has no checkpoint yet: starting it from step 0")
        return 0, 0.0
    meta = ckpt.restore(directory, state.model, state.optimizer, state.kind, state.config,
                        state.companions)
    scaler = state.scaler
    if scaler is not None and scaler.is_enabled() and isinstance(meta.get("loss_scaler"), dict):
        scaler.load_state_dict(meta["loss_scaler"])
    before, now = int(meta.get("global_batch", batch_size)), batch_size * runtime.world_size
    if before != now and runtime.is_main:
        keep = (f"; --batch-size {before // runtime.world_size} would keep it"
                if before % runtime.world_size == 0 else "")
        warnings.warn(f"the global batch changes from {before} ({meta.get('world_size', 1)} "
                      f"process(es)) to {now} ({runtime.world_size} x --batch-size {batch_size}); "
                      f"the data order continues from another point{keep}")
    seconds = meta.get("seconds", 0.0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not (
            math.isfinite(seconds) and seconds >= 0):
        raise CheckpointError(f"{directory / ckpt.STATE_META}: seconds must be a number "
                                   f">= 0, got {seconds!r}")
    return int(meta["step"]), float(seconds)


def write_eval(run_dir: Path, step: int, metrics: dict[str, float]) -> None:
    write_json(run_dir / EVAL_FILE, {"step": step, "split": "test", **metrics})


# --- jsonl logs ---------------------------------------------------------------------------------


def append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path``; an :class:`OSError` (a full disk) names ``path``."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
    except OSError as e:
        raise named(e, path) from None


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    append_line(path, json.dumps(record))


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) of every whole JSON object line; a line torn by a kill is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append((line, record))
    return out


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [record for _, record in _records(path)]


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` (the checkpoint a resume restarts from), and any
    torn line."""
    if path.exists():
        kept = [line for line, record in _records(path) if record.get("step", 0) <= step]
        write_bytes(path, "".join(line + "\n" for line in kept).encode())
