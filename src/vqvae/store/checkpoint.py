"""Checkpoints as folders: ``model.safetensors`` + ``config.json``, training state beside them.

Writes are atomic and durable (a temporary folder, fsynced, renamed into place, then a ``latest``
pointer replaced), so a process killed at any moment, or a power cut, leaves the last good
checkpoint readable. ``config.json`` records the weights' sha256 and ``state.json`` the training
state's (a companion's ``NAME.json`` its own), each checked on every load. A checkpoint that
codes or a prior depend on carries a ``keep.json`` and is never pruned. Nothing is ever
unpickled. One folder's format (and ``save_pretrained``) is ``models/pretrained.py``'s.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from safetensors import SafetensorError
from torch import nn

from ..config import from_dict
from ..errors import CheckpointError
from ..fileio import check_sha256, fsync_dir, read_json, sha256, write_bytes, write_json
from ..models.autoencoder import VQVAE
from ..models.ema import EMA

# The folder format lives with the models (their save_pretrained/from_pretrained); re-exported
# here, where run folders and every caller have always found it.
from ..models.pretrained import (CONFIG_FILE, FORMAT, MODEL_FILE, PRIOR_KIND,  # noqa: F401
                                 VQVAE_KIND, PretrainedMixin, load_config, locate, read_config,
                                 read_config_meta, save, write_config)
from ..models.pretrained import load_weights as load_folder_weights
from ..models.prior import Prior
from .diffusers import copy_weights, diffusers_class, load_diffusers, read_diffusers
from .diffusers import weight_files as diffusers_weights

STATE_FILE, STATE_META = "state.safetensors", "state.json"
STATE_SHA256 = "state_sha256"  # in state.json (and a companion's NAME.json): its tensors' checksum
CHECKPOINTS, LATEST, KEEP = "checkpoints", "latest", "keep.json"
STEP_NAME = re.compile(r"step-\d{7,}")


# Modules kept beside a checkpoint's model, by file name: (module, its optimizer or None: the
# GAN's discriminator and its Adam, the weights' moving average).
Companions = dict[str, tuple[nn.Module, torch.optim.Optimizer | None]]


# --- training state ----------------------------------------------------------------------------


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {"param_groups": state["param_groups"], "state": {}}
    for pid, entries in state["state"].items():
        meta["state"][str(pid)] = {}
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optim.{pid}.{name}"] = value.detach().contiguous().cpu()
            else:
                meta["state"][str(pid)][name] = value
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in meta["state"].items()}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _read_checked(path: Path, recorded: Any, record: Path, unreadable: str) -> dict[str, Any]:
    """The tensors of ``path`` once its bytes match the sha256 ``record`` holds for them (none
    recorded: a checkpoint from before they were, read as it is)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path} {unreadable}: {e}") from None
    check_sha256(path, data, recorded, record)
    try:
        return st.load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path} {unreadable}: {e}") from None


def save_training_state(directory: Path, optimizer: torch.optim.Optimizer, step: int,
                        extra: dict[str, Any] | None = None) -> None:
    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    data = st.save(tensors)
    write_bytes(directory / STATE_FILE, data)
    write_json(directory / STATE_META, {"step": step, "optimizer": optim_meta, **(extra or {}),
                                        STATE_SHA256: sha256(data)})


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore optimizer and RNG state; returns the JSON metadata (``step`` and extras)."""
    meta = read_json(directory / STATE_META)
    step = meta.get("step") if isinstance(meta, dict) else None
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{directory / STATE_META}: step must be an integer >= 0, got "
                              f"{step!r}")
    tensors = _read_checked(directory / STATE_FILE, meta.get(STATE_SHA256), directory / STATE_META,
                            "is missing or unreadable")
    try:
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{directory}: optimizer state does not match the model: "
                              f"{e}") from None
    if "rng.cpu" not in tensors:
        raise CheckpointError(f"{directory / STATE_FILE} holds no random state (rng.cpu)")
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("rng.cuda.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return meta


def save_companion(directory: Path, name: str, module: nn.Module,
                   optimizer: torch.optim.Optimizer | None) -> None:
    """A module kept beside the model (the GAN's discriminator, the weights' moving average) and
    its optimizer if it has one, as ``NAME.safetensors`` + ``NAME.json`` in a checkpoint
    folder."""
    tensors, meta = (_flatten_optimizer(optimizer.state_dict()) if optimizer is not None
                     else ({}, None))
    tensors |= {f"module.{k}": v.detach().contiguous().cpu()
                for k, v in module.state_dict().items()}
    data = st.save(tensors)
    write_bytes(directory / f"{name}.safetensors", data)
    write_json(directory / f"{name}.json", {"optimizer": meta, STATE_SHA256: sha256(data)})


def load_companion(directory: Path, name: str, module: nn.Module,
                   optimizer: torch.optim.Optimizer | None) -> None:
    """Restore what :func:`save_companion` wrote, naming any mismatch in one line."""
    path, record = directory / f"{name}.safetensors", directory / f"{name}.json"
    if not path.is_file() or not record.is_file():
        raise CheckpointError(f"{directory} holds no {name} state ({path.name}, {record.name}): "
                              f"it was not trained with one")
    meta = read_json(record)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{record} is not a {name} state (expected a JSON object)")
    tensors = _read_checked(path, meta.get(STATE_SHA256), record, "is unreadable")
    weights = {k[len("module."):]: v for k, v in tensors.items() if k.startswith("module.")}
    try:
        module.load_state_dict(weights)
        if optimizer is not None:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = str(e).strip().splitlines()[0]
        raise CheckpointError(f"{path} does not match this run's {name}: {first}") from None


# --- versioned, atomic checkpoints under a run folder ------------------------------------------


def write_checkpoint(run_dir: Path, step: int, module: nn.Module, kind: str,
                     config: dict[str, Any], optimizer: torch.optim.Optimizer | None = None,
                     extra: dict[str, Any] | None = None, keep: int = 2,
                     keep_every: int = 0, companions: Companions | None = None) -> Path:
    """Atomically write ``RUN_DIR/checkpoints/step-NNNNNNN`` and point ``latest`` at it; then
    prune to the newest ``keep``, every ``keep_every``-th step and the protected ones. A failed
    write (a full disk) leaves no partial folder and ``latest`` on the previous checkpoint."""
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = step_name(step)
    final, tmp = root / name, root / f".tmp-{name}-{os.getpid()}"
    try:
        save(tmp, module, kind, config)
        if optimizer is not None:
            save_training_state(tmp, optimizer, step, extra)
        for part, (companion, companion_opt) in (companions or {}).items():
            save_companion(tmp, part, companion, companion_opt)
        fsync_dir(tmp)
        if final.is_symlink():  # a link in its place is not this run's: removed, not followed
            final.unlink()
        if final.exists():  # re-saving a step (e.g. after resume): move the old one aside first
            old = root / f".old-{name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        write_bytes(root / LATEST, (name + "\n").encode())
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise CheckpointError(f"cannot write checkpoint {final}: {reason}; {root / LATEST} "
                              f"still names the previous one") from None
    _prune(root, keep, keep_every, name)
    return final


def step_name(step: int) -> str:
    """A checkpoint folder's name: ``step-0000123``."""
    return f"step-{step:07d}"


def step_of(checkpoint_dir: Path) -> int:
    """The step a checkpoint folder named by :func:`step_name` holds."""
    return int(Path(checkpoint_dir).name.split("-")[1])


def step_folders(root: Path) -> list[Path]:
    """The checkpoint folders (named by :func:`step_name`) in ``root``, oldest first. A symbolic
    link is none of them (it may lead into another run): skipped with a warning, never pruned
    or followed."""
    found = []
    for p in sorted(root.glob("step-*")):
        if not STEP_NAME.fullmatch(p.name):
            continue
        if p.is_symlink():
            warnings.warn(f"{p} is a symbolic link (to {os.readlink(p)}), not a checkpoint of "
                          f"this run: ignored")
        elif p.is_dir():
            found.append(p)
    return found


def _needed_by(checkpoint_dir: Path) -> list[str]:
    """Who :func:`protect` marked a checkpoint as needed by (none when unmarked or unreadable)."""
    try:
        return json.loads((Path(checkpoint_dir) / KEEP).read_text()).get("needed_by", [])
    except (OSError, ValueError, AttributeError):
        return []


def protect(checkpoint_dir: Path, by: str) -> None:
    """Mark a checkpoint as needed (by a codes file, a prior): pruning never deletes it. A
    diffusers folder is left as it is: nothing of ours prunes it."""
    if diffusers_class(checkpoint_dir):
        return
    path = Path(checkpoint_dir) / KEEP
    users = _needed_by(checkpoint_dir)
    if by in users:
        return
    try:
        write_json(path, {"needed_by": [*users, by]})
    except OSError as e:  # e.g. a read-only shared checkpoint: nobody prunes it there either
        warnings.warn(f"could not mark {checkpoint_dir} as needed ({e.strerror or e}): keep it "
                      f"yourself, {by} depends on it")


def unprotect(checkpoint_dir: Path, by: str) -> None:
    """Undo :func:`protect` for ``by``: once nothing needs the checkpoint, pruning may delete it."""
    path = Path(checkpoint_dir) / KEEP
    users = _needed_by(checkpoint_dir)
    if by not in users:  # also no marker, or one this cannot read: left as it is
        return
    rest = [u for u in users if u != by]
    try:
        if rest:
            write_json(path, {"needed_by": rest})
        else:
            path.unlink()
    except OSError:
        pass  # a read-only checkpoint stays kept: nothing is lost


def hold(path: str | Path, by: str, tries: int = 3) -> tuple[Path, bool]:
    """:func:`resolve` ``path`` and :func:`protect` the checkpoint for ``by`` at once, so that a
    run still training there cannot prune it while ``by`` reads it (a folder pruned between the
    two is resolved again). Returns the folder and whether this call added the mark (to
    :func:`unprotect` if ``by`` fails)."""
    for _ in range(tries):
        directory = resolve(path)
        added = not needs(directory, by)
        protect(directory, by)
        if _complete(directory) or diffusers_class(directory):  # nothing prunes a diffusers one
            return directory, added
    raise CheckpointError(f"the checkpoints of {path} were pruned while being read {tries} times "
                          f"over: try again, or stop the run writing them")


def needs(checkpoint_dir: Path, by: str) -> bool:
    """Whether :func:`protect` marked the checkpoint as needed by ``by``."""
    return by in _needed_by(checkpoint_dir)


def _prune(root: Path, keep: int, keep_every: int, current: str) -> None:
    for old in step_folders(root)[:-keep]:
        every = keep_every and step_of(old) % keep_every == 0
        if old.name != current and not every and not (old / KEEP).exists():
            shutil.rmtree(old, ignore_errors=True)


def clean_stale(run_dir: Path) -> None:
    """Remove what a killed writer left behind (temporary checkpoint folders and files)."""
    root = run_dir / CHECKPOINTS
    for stale in [*root.glob(".tmp-step-*"), *root.glob(".old-step-*")]:
        shutil.rmtree(stale, ignore_errors=True)
    for folder in (run_dir, root):
        for stale in folder.glob(".*.tmp*"):
            if stale.is_file():
                stale.unlink(missing_ok=True)


def _complete(folder: Path) -> bool:
    return (folder / MODEL_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def _latest(root: Path) -> Path | None:
    """The checkpoint ``latest`` names, if it names a complete step folder of this run; else
    (empty, garbage, outside the run) the newest complete step folder, with a warning."""
    pointer = root / LATEST
    steps = [p for p in step_folders(root) if _complete(p)]
    if not pointer.exists():
        return steps[-1] if steps else None
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = None
    if name and STEP_NAME.fullmatch(name) and root / name in steps:
        return root / name
    if steps:
        warnings.warn(f"{pointer} does not name a checkpoint of this run ({name!r}): using the "
                      f"newest one, {steps[-1].name}")
        return steps[-1]
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a run folder, its ``checkpoints`` folder, or the folder itself
    (a vqvae checkpoint folder, or a diffusers model folder: stage 1 loads a VQModel's)."""
    path = Path(path)
    if (path / MODEL_FILE).exists() or diffusers_class(path):
        return path
    root = path / CHECKPOINTS if (path / CHECKPOINTS).is_dir() else path
    found = _latest(root) if root.is_dir() else None
    if found is not None:
        return found
    if not path.exists():
        raise CheckpointError(f"{path} not found")
    raise CheckpointError(f"no checkpoint in {path} (expected {MODEL_FILE} or {CHECKPOINTS}/)")


# The model class of each checkpoint kind (its from_pretrained builds the prior's variant).
MODELS: dict[str, type[PretrainedMixin]] = {VQVAE_KIND: VQVAE, PRIOR_KIND: Prior}


def load_model_config(directory: Path, kind: str) -> Any:
    """The typed config of a ``kind`` checkpoint folder."""
    return from_dict(MODELS[kind].config_class, load_config(directory, kind), f"{kind} config")


def weight_files(checkpoint_dir: str | Path) -> list[Path]:
    """The files holding a checkpoint folder's weights: its ``model.safetensors``, or a diffusers
    folder's safetensors file or shards."""
    folder = Path(checkpoint_dir)
    return diffusers_weights(folder) if diffusers_class(folder) else [folder / MODEL_FILE]


def load_model(path: str | Path, kind: str, device: str | torch.device = "cpu") -> nn.Module:
    """A trained ``kind`` model (eval mode) from a run folder or a checkpoint folder; stage 1
    also from a diffusers VQModel folder (converted, the same outputs: store/diffusers.py)."""
    folder = resolve(path)
    if diffusers_class(folder):
        if kind != VQVAE_KIND:
            raise CheckpointError(f"{folder} is a diffusers {diffusers_class(folder)} folder, "
                                  f"not a {kind} checkpoint")
        return load_diffusers(folder, device)
    model = MODELS[kind].from_pretrained(folder, device)
    if (folder / f"{EMA}.safetensors").is_file():  # trained with --weight-ema: use the average
        load_companion(folder, EMA, model, None)
        model.eval()
    return model


def load_weights(directory: Path, module: nn.Module) -> None:
    """Load a checkpoint folder's weights into ``module`` (a diffusers VQModel folder's converted
    into a :class:`VQVAE` of the same config), naming any mismatch in one line."""
    if not diffusers_class(directory):
        return load_folder_weights(directory, module)
    cfg, weights = read_diffusers(directory)
    if not isinstance(module, VQVAE) or module.cfg != cfg:
        raise CheckpointError(f"{directory} holds a VQModel that does not match the model: "
                              f"its config.json gives another vqvae config")
    copy_weights(module, weights)


def from_pretrained(path_or_repo_id: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The model (eval mode) a folder holds, of the kind its ``config.json`` names: a run folder
    (its latest checkpoint), its ``checkpoints`` folder, a checkpoint or ``save_pretrained``
    folder, a diffusers ``VQModel`` folder (as a stage-1 :class:`VQVAE`), or a Hub repo id
    (``"org/name"``, needs ``pip install 'vqvae[hub]'``)."""
    folder = resolve(locate(path_or_repo_id))
    if diffusers_class(folder):  # a diffusers VQModel folder: a stage-1 model
        return load_diffusers(folder, device)
    kind, _ = read_config(folder / CONFIG_FILE)
    if kind not in MODELS:
        raise CheckpointError(f"{folder / CONFIG_FILE} is tagged {kind!r}, not a model "
                              f"({' or '.join(map(repr, MODELS))})")
    return MODELS[kind].from_pretrained(folder, device)


def restore(run_dir: Path, module: nn.Module, optimizer: torch.optim.Optimizer, kind: str,
            expected: Any, companions: Companions | None = None) -> dict[str, Any]:
    """Load the latest checkpoint of ``run_dir`` into ``module``, ``optimizer`` and the
    ``companions`` (a resume), after checking it was trained with the config ``expected``;
    returns the state metadata."""
    directory = resolve(run_dir)
    if load_model_config(directory, kind) != expected:
        raise CheckpointError(f"{directory} was trained with a different {kind} config")
    load_weights(directory, module)
    for part, (companion, companion_opt) in (companions or {}).items():
        load_companion(directory, part, companion, companion_opt)
    return load_training_state(directory, optimizer)


def load_autoencoder(path: str | Path, device: str | torch.device = "cpu") -> VQVAE:
    """A trained VQ-VAE (eval mode) from a run folder or a checkpoint folder."""
    return load_model(path, VQVAE_KIND, device)


def load_prior(path: str | Path, device: str | torch.device = "cpu") -> Prior:
    """A trained prior (eval mode) from a prior run folder or a checkpoint folder."""
    return load_model(path, PRIOR_KIND, device)
