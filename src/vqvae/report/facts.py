"""What a run folder holds, read without changing it: its stage, config, command lines, logs,
kept checkpoints, final metrics, the prior runs inside it, and what is missing.

The report's only reader of run folders: everything on the page comes from a :class:`RunFacts`
(and the models its checkpoints hold). Nothing here writes, locks or prunes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, ConfigError, DataError
from ..fileio import read_json
from ..store import checkpoint as ckpt
from ..store import runs


@dataclass(frozen=True)
class RunFacts:
    """One run folder as it is on disk; ``missing`` says, a sentence each, what it lacks."""

    path: Path
    stage: str  # ckpt.VQVAE_KIND ("vqvae") or ckpt.PRIOR_KIND ("prior")
    config: Any  # RunConfig / PriorRunConfig; None when config.json cannot be read as one
    commands: list[str]
    train: list[dict[str, Any]]  # train.jsonl
    evals: list[dict[str, Any]]  # metrics.jsonl: held-out metrics at each checkpoint
    final: dict[str, Any] | None  # eval.json: the final held-out metrics
    checkpoints: list[Path]  # the kept, complete checkpoint folders, oldest first
    state: dict[str, Any]  # the latest checkpoint's state.json, less the optimizer
    missing: list[str] = field(default_factory=list)
    priors: list[RunFacts] = field(default_factory=list)  # prior runs inside a stage-1 run
    hardware: list[dict[str, Any]] = field(default_factory=list)  # hardware.jsonl: each start

    @property
    def latest(self) -> Path | None:
        return self.checkpoints[-1] if self.checkpoints else None

    @property
    def name(self) -> str:
        return "stage 1" if self.stage == ckpt.VQVAE_KIND else f"prior run {self.path.name}/"


def stage_of(run_dir: Path) -> str:
    """The stage of a run folder from its config.json's tag (untagged, older runs: a prior's
    config names its stage-1 checkpoint)."""
    kind, raw = ckpt.read_config(run_dir / runs.RUN_CONFIG)
    if kind is None:
        return ckpt.PRIOR_KIND if "stage1" in raw else ckpt.VQVAE_KIND
    return kind.removesuffix("-run")


def _jsonl(run_dir: Path, name: str, what: str, missing: list[str]) -> list[dict[str, Any]]:
    path = run_dir / name
    if not path.is_file():
        missing.append(f"{path} is missing: no {what}")
        return []
    return runs.read_jsonl(path)


def _checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / ckpt.CHECKPOINTS
    if not root.is_dir():
        return []
    return [p for p in ckpt.step_folders(root)
            if (p / ckpt.MODEL_FILE).is_file() and (p / ckpt.CONFIG_FILE).is_file()]


def _state(checkpoint: Path | None) -> dict[str, Any]:
    """The latest checkpoint's training facts (step, seconds, processes, global batch)."""
    if checkpoint is None or not (checkpoint / ckpt.STATE_META).is_file():
        return {}
    try:
        meta = read_json(checkpoint / ckpt.STATE_META)
    except (CheckpointError, DataError, OSError, ValueError):
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: v for k, v in meta.items() if k not in ("optimizer", ckpt.STATE_SHA256)}


def read_run(run_dir: Path, with_priors: bool = True) -> RunFacts:
    """The facts of the run folder ``run_dir`` (see :func:`find`)."""
    stage = stage_of(run_dir)
    missing: list[str] = []
    try:
        config = runs.read_run_config(run_dir, stage)
    except (CheckpointError, ConfigError, DataError) as e:
        config = None
        missing.append(f"its config cannot be read ({e}): no config, data or budget")
    commands_file = run_dir / runs.COMMANDS
    if commands_file.is_file():
        commands = [c for c in commands_file.read_text(errors="replace").splitlines() if c]
    else:
        commands = []
        missing.append(f"{commands_file} is missing: no command lines")
    train = _jsonl(run_dir, runs.TRAIN_LOG, "training curves", missing)
    evals = _jsonl(run_dir, runs.METRICS_LOG, "held-out curves", missing)
    final = None
    if (run_dir / runs.EVAL_FILE).is_file():
        try:
            final = read_json(run_dir / runs.EVAL_FILE)
        except (CheckpointError, DataError, OSError, ValueError):
            missing.append(f"{run_dir / runs.EVAL_FILE} cannot be read: no final metrics")
    else:
        missing.append(f"{run_dir / runs.EVAL_FILE} is missing: no final held-out metrics "
                       f"(the run did not finish)")
    checkpoints = _checkpoints(run_dir)
    if not checkpoints:
        missing.append(f"{run_dir} holds no checkpoint: nothing to draw from its model")
    priors = []
    if with_priors and stage == ckpt.VQVAE_KIND:
        for sub in sorted(p for p in run_dir.iterdir() if p.is_dir()):
            try:
                if runs.find_run(sub) == sub and stage_of(sub) == ckpt.PRIOR_KIND:
                    priors.append(read_run(sub, False))
            except CheckpointError as e:  # a sub-folder's config.json that cannot be read
                missing.append(f"{sub} is skipped: {e}")
    hardware = (runs.read_jsonl(run_dir / runs.HARDWARE) if (run_dir / runs.HARDWARE).is_file()
                else [])  # runs from before it was recorded have none: the page says so
    return RunFacts(run_dir, stage, config, commands, train, evals,
                    final if isinstance(final, dict) else None, checkpoints,
                    _state(checkpoints[-1] if checkpoints else None), missing, priors, hardware)


def find(path: str | Path) -> RunFacts:
    """The facts of the run folder at ``path`` (or holding the checkpoint ``path``): a stage-1
    run with the prior runs inside it, or a prior run. A path that is no run folder: a
    :class:`CheckpointError`."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} not found")
    run_dir = runs.find_run(path)
    if run_dir is None:
        raise CheckpointError(f"{path} is not a run folder (no config.json of a `vqvae train` or "
                              f"`vqvae train-prior` run)")
    return read_run(run_dir)


def stage1_of(prior: RunFacts) -> tuple[Path | None, str | None]:
    """A prior run's stage-1 checkpoint if it still exists, else None and why."""
    if prior.config is None:
        return None, "its config cannot be read: its stage-1 checkpoint is unknown"
    checkpoint = Path(prior.config.stage1)
    if not (checkpoint / ckpt.MODEL_FILE).is_file():
        return None, f"its stage-1 checkpoint {checkpoint} is gone: no samples can be drawn"
    return checkpoint, None
