"""Code files: a data set turned into a trained VQ-VAE's code grids, in one safetensors file.

Tensors ``{split}`` (N, h, w) hold code ids in the smallest integer dtype that fits the codebook
(a multiscale tokenizer's: token sequences (N, L), every scale's map, their sides in the metadata)
and
``{split}_labels`` (N,) the class ids when the source has them; string metadata names the codebook
size, the source and the stage-1 checkpoint with its fingerprint (sha256 of its weights), so a
prior never trains on, or decodes with, another model's codes, and the sha256 of the tensors
themselves, checked on every load. Nothing is pickled.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from ..config import DataConfig, PriorRunConfig
from ..data.files import FileSet
from ..data.sources import ImageSet, Splits, load_splits, to_float
from ..distributed import pick_device
from ..fileio import check_writable
from ..errors import CheckpointError, DataError
from ..models.autoencoder import VQVAE
from ..store import checkpoint as ckpt
from ..store import runs

FORMAT = "vqvae-codes/1"
CONTENTS_SHA256 = "contents_sha256"  # metadata: the checksum load_codes verifies


@dataclass(frozen=True)
class CodeSplit:
    codes: torch.Tensor  # (N, h, w) integer code ids; (N, L) token sequences of a multiscale one
    labels: torch.Tensor | None = None  # (N,) int64 class ids
    keys: tuple[str, ...] | None = None  # (N,) each grid's image in the source (see ImageSet.keys)

    def __len__(self) -> int:
        return self.codes.shape[0]


@dataclass(frozen=True)
class Codes:
    """Code grids of one or more splits and where they came from."""

    splits: dict[str, CodeSplit]
    codebook_size: int
    stage1: str  # the stage-1 checkpoint folder that made (and decodes) the codes
    stage1_sha256: str
    source: str = ""
    classes: tuple[str, ...] | None = None
    scales: tuple[int, ...] | None = None  # a multiscale tokenizer's map sides, coarse to fine

    @property
    def grid(self) -> tuple[int, int]:
        """The (h, w) code grid (a multiscale tokenizer's finest map)."""
        if self.scales:
            return self.scales[-1], self.scales[-1]
        first = next(iter(self.splits.values()))
        return int(first.codes.shape[1]), int(first.codes.shape[2])

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes else 0

    def summary(self) -> str:
        """E.g. "1617 train, 180 test images of digits into 4x4 grids of 512 codes (10 classes)"."""
        sizes = ", ".join(f"{len(s)} {name}" for name, s in self.splits.items())
        labels = f"{self.num_classes} classes" if self.classes else "no labels"
        into = (f"token maps of sides {','.join(map(str, self.scales))}" if self.scales
                else f"{self.grid[0]}x{self.grid[1]} grids")
        return (f"{sizes} images of {self.source} into {into} of {self.codebook_size} codes "
                f"({labels})")

    def split(self, name: str) -> CodeSplit:
        if name not in self.splits:
            raise DataError(f"the codes hold no {name!r} split (they have: "
                            f"{', '.join(self.splits) or 'none'})")
        return self.splits[name]

    def keys(self, name: str) -> tuple[str, ...]:
        """Which image of the source each grid of split ``name`` encodes (a relative path, a
        shard key, an array index; ``#flipped`` marks a mirrored copy)."""
        keys = self.split(name).keys
        if keys is None:
            raise DataError(f"these codes do not record which image each {name} grid came from "
                            f"(written before codes did, or not encoded from images): encode "
                            f"again with `vqvae encode`")
        return keys


def code_dtype(codebook_size: int) -> torch.dtype:
    """The smallest integer dtype holding ids 0..codebook_size-1."""
    if codebook_size <= 256:
        return torch.uint8
    if codebook_size <= 2**15:
        return torch.int16
    return torch.int32


def fingerprint(checkpoint_dir: str | Path) -> str:
    """sha256 of a checkpoint's ``model.safetensors``: which exact weights made some codes. Read
    from its ``config.json``, which records it when the weights are written (and every load
    checks the file against it); hashed only for a checkpoint that recorded none (a diffusers
    folder: its weights file, or its shards one after the other)."""
    _, _, recorded = ckpt.read_config_meta(Path(checkpoint_dir) / ckpt.CONFIG_FILE)
    if recorded:
        return recorded
    digest = hashlib.sha256()
    for path in ckpt.weight_files(checkpoint_dir):  # one file, or a diffusers folder's shards
        try:
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
        except OSError as e:
            raise CheckpointError(f"cannot read {path}: {e}") from None
    return digest.hexdigest()


def _finetuned_from(checkpoint_dir: str | Path) -> str | None:
    """For a decoder fine-tuned by `vqvae finetune-decoder`, the fingerprint of the checkpoint
    whose codes it decodes (recorded in its run config); else None."""
    run_dir = runs.find_run(checkpoint_dir)
    if run_dir is None:
        return None
    train = runs.read_run_config(run_dir, ckpt.VQVAE_KIND).train
    return train.codes_sha256 if train.decoder_only else None


def codes_fingerprint(checkpoint_dir: str | Path) -> str:
    """The fingerprint of the checkpoint whose codes this one's equal: its own, or for a
    fine-tuned decoder, the one it was fine-tuned from."""
    return _finetuned_from(checkpoint_dir) or fingerprint(checkpoint_dir)


def check_stage1(expected_sha256: str, made_by: str, checkpoint_dir: str | Path) -> None:
    """Refuse codes (or a prior) that another stage-1 model made: compare fingerprints (a
    decoder fine-tuned from the model that made them decodes them too)."""
    actual = fingerprint(checkpoint_dir)
    if expected_sha256 not in (actual, _finetuned_from(checkpoint_dir)):
        raise DataError(f"the codes were made by another stage-1 model ({made_by}, sha256 "
                        f"{expected_sha256[:12]}), not {checkpoint_dir} ({actual[:12]})")


# --- encoding -----------------------------------------------------------------------------------


@torch.no_grad()
def encode_set(model: VQVAE, images: ImageSet | FileSet, batch_size: int = 256,
               device: torch.device | str = "cpu", desc: str = "encode", progress: bool = True,
               workers: int = 2, flip: bool = False) -> CodeSplit:
    """An image set -> its code ids (N, h, w) in :func:`code_dtype` and labels (of the images
    mirrored left-right with ``flip``); a streamed set is decoded by ``workers`` processes and
    its unreadable files are left out."""
    parts = list(encode_batches(model, images, batch_size, device, desc, progress, workers, flip))
    if not parts:
        raise DataError("no images to encode")
    labels = [part.labels for part in parts]
    has_labels = images.labels is not None and all(part is not None for part in labels)
    return CodeSplit(torch.cat([part.codes for part in parts]),
                     torch.cat(labels) if has_labels else None,
                     tuple(key for part in parts for key in part.keys))


@torch.inference_mode()
def encode_batches(model: VQVAE, images: ImageSet | FileSet, batch_size: int = 256,
                   device: torch.device | str = "cpu", desc: str = "encode",
                   progress: bool = True, workers: int = 2, flip: bool = False,
                   with_mirror: bool = False) -> Iterator[CodeSplit]:
    """:func:`encode_set` a batch at a time, each with its images' keys (memory stays flat);
    ``with_mirror``: codes (B, 2, h, w), each image's and its mirror image's, from one decode."""
    model.eval()
    dtype = code_dtype(model.cfg.codebook_size)
    names = images.keys()
    with tqdm(total=len(images), desc=desc, unit="img", disable=not progress,
              dynamic_ncols=True) as bar:  # closed on Ctrl-C too: the CLI's line comes after it
        for batch in images.batches(batch_size, workers=workers):
            x = to_float(batch.images.to(device))
            x = x.flip(-1) if flip else x
            keys = tuple(f"{k}#flipped" if flip else str(k) for k in names[batch.rows.numpy()])
            codes = model.encode(x).indices
            if with_mirror:
                codes = torch.stack([codes, model.encode(x.flip(-1)).indices], 1)
            yield CodeSplit(codes.to("cpu", dtype), batch.labels, keys)
            bar.update(x.shape[0] + batch.skipped)


def load_stage1(cfg: PriorRunConfig, device: torch.device | str = "cpu",
                decoder: str | Path | None = None) -> VQVAE:
    """The stage-1 model that decodes a prior's codes (or ``decoder``, a run or checkpoint
    fine-tuned from it), after checking its fingerprint."""
    directory = Path(cfg.stage1) if decoder is None else ckpt.resolve(decoder)
    if not directory.is_dir():
        raise CheckpointError(f"the stage-1 checkpoint {directory} is gone")
    check_stage1(cfg.stage1_sha256, cfg.stage1, directory)
    model = ckpt.load_autoencoder(directory, device)
    if model.cfg.codebook_size != cfg.model.codebook_size:
        raise DataError(f"stage-1 model has {model.cfg.codebook_size} codes, the prior "
                        f"{cfg.model.codebook_size}")
    return model


def stage1_data(path: str | Path, model: VQVAE, source: str | None = None) -> DataConfig:
    """The data a stage-1 model trained on (from the run folder holding ``path``), or ``source``
    at the model's size and channels; a checkpoint outside a run folder needs ``source``."""
    run_dir = runs.find_run(path)
    if run_dir is None and not source:
        raise DataError(f"{path} is a checkpoint outside a run folder: name its data source "
                        f"(--data)")
    data = (runs.read_run_config(run_dir, ckpt.VQVAE_KIND).data if run_dir is not None
            else DataConfig(size=model.cfg.image_size, channels=model.cfg.in_channels))
    if source:
        data = replace(data, source=source, eval_source=None, size=model.cfg.image_size,
                       channels=model.cfg.in_channels)
    if data.size != model.cfg.image_size:
        raise DataError(f"the stage-1 model expects {model.cfg.image_size}px images")
    return data


def load_trained(path: str | Path, source: str | None = None,
                 device: torch.device | str = "cpu") -> tuple[VQVAE, Splits]:
    """A trained stage-1 model (eval mode) from a run folder or checkpoint folder, and the train
    and test splits of its data (or of ``source``) at its size and channels."""
    directory = ckpt.resolve(path)
    model = ckpt.load_autoencoder(directory, device)
    return model, load_splits(stage1_data(path, model, source))


class EncodingSource(NamedTuple):
    checkpoint: Path
    model: VQVAE
    stage1_sha256: str  # read when loaded: nothing is read from the checkpoint afterwards
    data: DataConfig
    splits: Splits


def encoding_source(run_dir: str | Path, source: str | None,
                    device: torch.device | str) -> EncodingSource:
    """The stage-1 model of ``run_dir`` and the splits it encodes (``source``, or its own)."""
    directory = ckpt.resolve(run_dir)
    model = ckpt.load_autoencoder(directory, device)
    sha = fingerprint(directory)
    data = stage1_data(run_dir, model, source)
    return EncodingSource(directory, model, sha, data, load_splits(data))


def encode_dataset(run_dir: str | Path, source: str | None = None, batch_size: int = 256,
                   device: torch.device | str = "cpu", progress: bool = True,
                   flip: bool = False) -> Codes:
    """Encode the train and test splits of a data source (default: the run's own) with the
    stage-1 model of ``run_dir`` (a run folder or a checkpoint folder). ``flip``: the training
    split also holds the codes of every training image mirrored left-right (twice the grids for
    a prior, as LlamaGen trains its priors; for data whose mirror image is still in-distribution:
    photos, clothes, not digits or text); the test split stays as it is."""
    directory, model, sha, data, splits = encoding_source(run_dir, source, device)
    encoded = {name: encode_set(model, getattr(splits, name), batch_size, device,
                                f"encode {name}", progress, data.workers)
               for name in ("train", "test")}
    if flip:
        mirrored = encode_set(model, splits.train, batch_size, device, "encode train (flipped)",
                              progress, data.workers, flip=True)
        train = encoded["train"]
        encoded["train"] = CodeSplit(torch.cat([train.codes, mirrored.codes]),
                                     None if train.labels is None
                                     else torch.cat([train.labels, mirrored.labels]),
                                     train.keys + mirrored.keys)
    return Codes(encoded, model.cfg.codebook_size, str(directory.resolve()), sha, data.source,
                 splits.train.classes, token_scales(model))


def token_scales(model: VQVAE) -> tuple[int, ...] | None:
    """A multiscale tokenizer's map sides (its codes are (N, L) sequences); None for a grid."""
    return model.cfg.quantizer_scales if model.cfg.quantizer == "multiscale" else None


def encode_to_file(run_dir: str | Path, out: str | Path, *, source: str | None = None,
                   batch_size: int = 256, device: str | torch.device = "auto",
                   flip: bool = False, progress: bool = True) -> tuple[Codes, Path]:
    """``vqvae encode``: :func:`encode_dataset` on ``device`` (``auto``: the best there is),
    written to the codes file ``out`` (checked first: a folder is refused before encoding)."""
    check_writable(out, "codes file to write (e.g. codes.safetensors)")
    # marked as needed before encoding: a run still training there cannot prune it meanwhile
    checkpoint, added = ckpt.hold(run_dir, codes_user(out))
    try:
        codes = encode_dataset(checkpoint, source, batch_size, pick_device(device), progress,
                               flip)
    except BaseException:
        if added:
            ckpt.unprotect(checkpoint, codes_user(out))
        raise
    return codes, save_codes(codes, out)


def codes_user(path: str | Path) -> str:
    """How a codes file marks the checkpoint its codes decode with (:func:`ckpt.protect`)."""
    return f"codes {Path(path).resolve()}"


# --- the file -----------------------------------------------------------------------------------


def contents_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of a codes file's tensors, by name: each one's name, dtype, shape and bytes,
    so it does not depend on how the container lays them out."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def save_codes(codes: Codes, path: str | Path) -> Path:
    """Write ``codes`` to one safetensors file, atomically."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder: name the codes file to write "
                        f"(e.g. codes.safetensors)")
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp*"):  # left by a killed writer
        stale.unlink(missing_ok=True)
    dtype = code_dtype(codes.codebook_size)
    tensors = {}
    for name, split in codes.splits.items():
        tensors[name] = split.codes.to(dtype).contiguous()
        if split.labels is not None:
            tensors[f"{name}_labels"] = split.labels.to(torch.int64).contiguous()
        if split.keys is not None:  # JSON text as bytes: covered by the contents' sha256
            tensors[f"{name}_keys"] = torch.frombuffer(
                bytearray(json.dumps(list(split.keys)).encode()), dtype=torch.uint8)
    h, w = codes.grid
    meta = {"format": FORMAT, "codebook_size": str(codes.codebook_size), "grid": f"{h}x{w}",
            "splits": json.dumps(list(codes.splits)), "stage1": codes.stage1,
            "stage1_sha256": codes.stage1_sha256, "source": codes.source,
            "classes": json.dumps(list(codes.classes) if codes.classes else None),
            CONTENTS_SHA256: contents_sha256(tensors)}
    if codes.scales:  # absent for grids: their files are what they always were
        meta["scales"] = json.dumps(list(codes.scales))
    ckpt.write_bytes(path, save(tensors, metadata=meta))
    if Path(codes.stage1).is_dir():  # these codes decode only with that checkpoint: keep it
        ckpt.protect(Path(codes.stage1), codes_user(path))
    return path


def load_codes(path: str | Path) -> Codes:
    """Read and validate a codes file written by :func:`save_codes`."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except FileNotFoundError:
        raise DataError(f"codes file {path} not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise DataError(f"{path} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise DataError(f"{path} is not a vqvae codes file (written by `vqvae encode`)")
    recorded = meta.get(CONTENTS_SHA256)  # absent from files written before it was recorded
    if recorded is not None and contents_sha256(tensors) != recorded:
        raise DataError(f"{path} is corrupt: the sha256 of its code grids and labels differs "
                        f"from the one recorded in its metadata when it was written")
    try:
        k = int(meta["codebook_size"])
        names = json.loads(meta["splits"])
        classes = json.loads(meta["classes"])
        stage1, sha = meta["stage1"], meta["stage1_sha256"]
        scales = tuple(int(n) for n in json.loads(meta["scales"])) if "scales" in meta else None
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path}: damaged metadata ({e})") from None
    splits = {}
    for name in names:
        if name not in tensors:
            raise DataError(f"{path}: split {name!r} is missing")
        splits[name] = _check_split(path, name, tensors[name], tensors.get(f"{name}_labels"), k,
                                    len(classes) if classes else 0, tensors.get(f"{name}_keys"),
                                    scales)
    if not splits or all(len(s) == 0 for s in splits.values()):
        raise DataError(f"{path} holds no code grids")
    if len({tuple(s.codes.shape[1:]) for s in splits.values()}) != 1:
        raise DataError(f"{path}: splits have different grid shapes")
    return Codes(splits, k, stage1, sha, meta.get("source", ""),
                 tuple(classes) if classes else None, scales)


def _check_split(path: Path, name: str, codes: torch.Tensor, labels: torch.Tensor | None,
                 k: int, num_classes: int, keys: torch.Tensor | None = None,
                 scales: tuple[int, ...] | None = None) -> CodeSplit:
    if scales:
        tokens = sum(s * s for s in scales)
        if codes.dim() != 2 or codes.shape[1] != tokens or codes.dtype.is_floating_point:
            raise DataError(f"{path}: split {name!r} must be integer (N, {tokens}) token "
                            f"sequences of scales {scales}, got {codes.dtype} "
                            f"{tuple(codes.shape)}")
    elif codes.dim() != 3 or codes.dtype.is_floating_point:
        raise DataError(f"{path}: split {name!r} must be integer (N, h, w), got {codes.dtype} "
                        f"{tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise DataError(f"{path}: split {name!r} holds ids outside [0, {k - 1}]")
    if labels is not None:
        if labels.shape != (codes.shape[0],):
            raise DataError(f"{path}: {labels.shape[0]} labels for {codes.shape[0]} {name} grids")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= max(num_classes, 1)):
            raise DataError(f"{path}: {name} labels outside the {num_classes} classes")
    names = None
    if keys is not None:
        try:
            names = tuple(str(key) for key in json.loads(keys.numpy().tobytes()))
        except (ValueError, TypeError):
            raise DataError(f"{path}: damaged {name} keys") from None
        if len(names) != codes.shape[0]:
            raise DataError(f"{path}: {len(names)} keys for {codes.shape[0]} {name} grids")
    return CodeSplit(codes, labels, names)
