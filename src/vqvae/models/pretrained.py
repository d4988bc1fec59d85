"""Saved models: the checkpoint folder format and the ``save_pretrained``/``from_pretrained`` mixin.

A folder of ``model.safetensors`` + a tagged ``config.json`` (with the weights' sha256) and, from
``save_pretrained``, a model card ``README.md`` (diffusers' ModelMixin; the Hugging Face Hub's).
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import safetensors.torch as st
import torch
from safetensors import SafetensorError
from torch import nn

from ..config import from_dict, to_dict
from ..distributed import pick_device
from ..errors import CheckpointError, ConfigError
from ..fileio import check_sha256, read_json, sha256, write_bytes, write_json

FORMAT = 1
MODEL_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
VQVAE_KIND = "vqvae"
PRIOR_KIND = "prior"
HUB_EXTRA = "pip install 'vqvae[hub]'"
# What a Hub repo id looks like ("org/name"); anything else is taken as a local path.
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
CARD_KEYS = ("title", "data", "metrics")


# --- config files: one tagged format for checkpoints and run folders ---------------------------


def write_config(path: Path, kind: str, config: dict[str, Any], **extra: Any) -> None:
    """``{"kind": kind, "format": FORMAT, "config": config}``: every ``config.json`` this package
    writes (checkpoint folders: ``vqvae``/``prior``, with their weights' ``sha256``; run folders:
    ``vqvae-run``/``prior-run``)."""
    write_json(path, {"kind": kind, "format": FORMAT, "config": config, **extra})


def read_config(path: Path) -> tuple[str | None, dict[str, Any]]:
    """(kind, config) of a file written by :func:`write_config`. An object without a ``kind`` tag
    is a run config written before run configs were tagged: (None, the object)."""
    kind, config, _ = read_config_meta(path)
    return kind, config


def read_config_meta(path: Path) -> tuple[str | None, dict[str, Any], str | None]:
    """(kind, config, recorded sha256 of the weights or None) of a ``config.json``."""
    meta = read_json(path)
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a vqvae config (expected a JSON object)")
    if "kind" not in meta:
        return None, meta, None
    if not isinstance(meta.get("config"), dict) or not isinstance(meta["kind"], str):
        raise CheckpointError(f"{path} is not a vqvae config (bad kind or config)")
    if not isinstance(meta.get("format", 0), int) or meta.get("format", 0) > FORMAT:
        raise CheckpointError(f"{path} was written by a newer vqvae (format {meta['format']})")
    sha = meta.get("sha256")
    return meta["kind"], meta["config"], sha if isinstance(sha, str) else None


# --- one folder --------------------------------------------------------------------------------


def save(directory: Path, module: nn.Module, kind: str, config: dict[str, Any]) -> None:
    """Write ``module``'s weights and its config (tagged with ``kind``, with the weights'
    sha256) into ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    data = st.save({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()})
    write_bytes(directory / MODEL_FILE, data)
    write_config(directory / CONFIG_FILE, kind, config, sha256=sha256(data))


def load_config(directory: Path, kind: str) -> dict[str, Any]:
    """The model config saved in ``directory``, after checking it is a ``kind`` checkpoint."""
    found, config = read_config(directory / CONFIG_FILE)
    if found is None or found.endswith("-run"):
        raise CheckpointError(f"{directory} is a run folder, not a checkpoint folder")
    if found != kind:
        raise CheckpointError(f"{directory} holds a {found!r} checkpoint, not {kind!r}")
    return config


def load_weights(directory: Path, module: nn.Module) -> None:
    """Load ``model.safetensors`` into ``module``, naming any mismatch in one line."""
    path = directory / MODEL_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    try:
        tensors = st.load(data)
    except (SafetensorError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    _, _, recorded = read_config_meta(directory / CONFIG_FILE)
    check_sha256(path, data, recorded, directory / CONFIG_FILE)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if expected[k].shape != tensors[k].shape)
    if missing or unexpected or wrong:
        parts = [f"{len(missing)} missing (e.g. {missing[0]})" if missing else "",
                 f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
                 f"shape mismatch for {wrong[0]}: {tuple(tensors[wrong[0]].shape)} vs "
                 f"{tuple(expected[wrong[0]].shape)}" if wrong else ""]
        raise CheckpointError(f"{path} does not match the model: "
                              + "; ".join(p for p in parts if p))
    module.load_state_dict(tensors)


# --- the Hugging Face Hub (the optional ``hub`` extra) -----------------------------------------


def _hub() -> Any:
    """The ``huggingface_hub`` package, imported only when a repo id or a push needs it."""
    try:
        import huggingface_hub
    except ImportError:
        raise CheckpointError(f"the Hugging Face Hub needs huggingface_hub: {HUB_EXTRA}") from None
    return huggingface_hub


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def is_repo_id(name: str | Path) -> bool:
    """Whether ``name`` is to be fetched from the Hub: ``org/name``, and no such local path."""
    return (isinstance(name, str) and REPO_ID.fullmatch(name) is not None
            and not Path(name).exists())


def locate(folder_or_repo_id: str | Path) -> Path:
    """A local folder as it is, or the folder of a Hub repo's snapshot (downloaded once into the
    Hub's cache, then read from there: offline too)."""
    if not is_repo_id(folder_or_repo_id):
        return Path(folder_or_repo_id)
    hub = _hub()
    try:
        return Path(hub.snapshot_download(str(folder_or_repo_id), library_name="vqvae",
                                          allow_patterns=[MODEL_FILE, CONFIG_FILE, CARD_FILE]))
    except (OSError, ValueError) as e:  # offline and not cached, no such repo, a bad revision
        raise CheckpointError(f"{folder_or_repo_id} is no local folder, and the Hub could not "
                              f"give it: {_first_line(e)}") from None


# --- the model card ----------------------------------------------------------------------------


class CardFacts(NamedTuple):
    """What a model tells its card: a title, a sentence, the facts table, the Hub tags."""

    title: str
    summary: str
    facts: dict[str, Any]
    tags: tuple[str, ...]


def _check_card(card: dict[str, Any] | None) -> dict[str, Any]:
    card = dict(card or {})
    unknown = sorted(set(card) - set(CARD_KEYS))
    if unknown:
        raise ConfigError(f"model card: unknown key(s) {', '.join(unknown)} (known: "
                          f"{', '.join(CARD_KEYS)})")
    if not isinstance(card.get("metrics", {}), dict):
        raise ConfigError(f"model card: metrics must be a dict of name -> value, got "
                          f"{type(card['metrics']).__name__}")
    return card


def _value(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def model_card(facts: CardFacts, kind: str, parameters: int, card: dict[str, Any],
               where: str) -> str:
    """The ``README.md`` of a saved model: Hub front matter, what it is, its training data and
    held-out metrics (from ``card``), and how to load it from ``where``."""
    rows = {**facts.facts, "parameters": f"{parameters:,}"}
    metrics = card.get("metrics") or {}
    lines = ["---", "library_name: vqvae", f"tags: [{', '.join(('vqvae', *facts.tags))}]", "---",
             "", f"# {card.get('title') or facts.title}", "", facts.summary, "",
             "| | |", "|---|---|", *(f"| {k} | {_value(v)} |" for k, v in rows.items()), "",
             "## Training data", "", str(card.get("data") or "Not recorded."), "",
             "## Held-out metrics", ""]
    lines += (["| metric | value |", "|---|---|",
               *(f"| {k} | {_value(v)} |" for k, v in metrics.items())] if metrics
              else ["Not recorded."])
    lines += ["", "## Use", "", "```python", "import vqvae", "",
              f'model = vqvae.from_pretrained("{where}")  # eval mode, on the CPU', "```", "",
              f"A Hub repo id needs `{HUB_EXTRA}`. The folder is a vqvae checkpoint folder "
              f"(`{MODEL_FILE}`, and `{CONFIG_FILE}` tagged `{kind}` with the weights' sha256): "
              f"every `vqvae` command takes it.", ""]
    return "\n".join(lines)


# --- the mixin ---------------------------------------------------------------------------------


class PretrainedMixin:
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for a model built from one
    frozen config (``self.cfg``): the one place a model meets files, as in diffusers' ModelMixin.

    A class names its checkpoint kind and config class; :meth:`from_config` and
    :meth:`card_facts` are its hooks (the priors share a kind and build their class by variant).
    """

    checkpoint_kind: ClassVar[str]
    config_class: ClassVar[type]
    cfg: Any

    @classmethod
    def from_config(cls, cfg: Any) -> nn.Module:
        """The model a saved config describes (hook: the priors pick their class by variant)."""
        return cls(cfg)

    def card_facts(self) -> CardFacts:
        """What the model card says the model is (hook)."""
        raise NotImplementedError

    def save_pretrained(self, folder: str | Path, *, card: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` and the model card ``README.md`` into
        ``folder``: a checkpoint folder, which every ``vqvae`` command and ``load_*`` accept.
        ``card`` may give a ``title``, the training ``data`` and held-out ``metrics``."""
        return self._save(Path(folder), card, str(folder))

    def _save(self, folder: Path, card: dict[str, Any] | None, where: str) -> Path:
        card = _check_card(card)  # before anything is written
        save(folder, self, self.checkpoint_kind, to_dict(self.cfg))
        parameters = sum(p.numel() for p in self.parameters())
        text = model_card(self.card_facts(), self.checkpoint_kind, parameters, card, where)
        write_bytes(folder / CARD_FILE, text.encode())
        return folder

    @classmethod
    def from_pretrained(cls, folder_or_repo_id: str | Path,
                        device: str | torch.device = "cpu") -> nn.Module:
        """The model (eval mode) saved in a folder by :meth:`save_pretrained` or as a checkpoint,
        or in a Hub repo (``"org/name"``, needs the ``hub`` extra)."""
        folder = locate(folder_or_repo_id)
        if folder.is_dir() and not (folder / MODEL_FILE).is_file():
            raise CheckpointError(f"{folder} holds no {MODEL_FILE} (a run folder? "
                                  f"vqvae.from_pretrained finds its latest checkpoint)")
        kind = cls.checkpoint_kind
        cfg = from_dict(cls.config_class, load_config(folder, kind), f"{kind} config")
        try:
            model = cls.from_config(cfg)
        except CheckpointError as e:
            raise CheckpointError(f"{folder}: {e}") from None
        load_weights(folder, model)
        return model.to(pick_device(device)).eval()

    def push_to_hub(self, repo_id: str, *, card: dict[str, Any] | None = None,
                    private: bool = False, token: str | None = None) -> Any:
        """Save into a temporary folder, create the Hub repo if needed and upload the three files;
        returns the commit info (its ``commit_url``)."""
        hub = _hub()
        with tempfile.TemporaryDirectory(prefix="vqvae-push-") as tmp:
            self._save(Path(tmp), card, repo_id)
            try:
                api = hub.HfApi(token=token)
                api.create_repo(repo_id, exist_ok=True, private=private)
                return api.upload_folder(repo_id=repo_id, folder_path=tmp,
                                         commit_message=f"Upload {type(self).__name__} (vqvae)")
            except (OSError, ValueError) as e:  # offline, no permission, a bad repo id
                raise CheckpointError(f"cannot push to {repo_id}: {_first_line(e)}") from None
