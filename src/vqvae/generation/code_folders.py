"""Codes as one ``.npy`` per image in a tree mirroring the data's (the layout LlamaGen's and
similar trainers read their prior's tokens from), with ``codes.json`` naming the stage-1 model,
the grid, and each file's key and label. Written a batch at a time: memory stays flat.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from ..errors import DataError
from ..fileio import write_json
from ..store import checkpoint as ckpt
from ..distributed import pick_device
from .codes import encode_batches, encode_to_file, encoding_source, token_scales

INDEX = "codes.json"
FORMAT = "vqvae-codes-npy/1"


def npy_name(key: str) -> str:
    """A key's file below its split's folder: ``cat/001.png`` -> ``cat/001.npy``, ``17`` ->
    ``17.npy``; a key that would leave the folder is refused."""
    path = PurePosixPath(key)
    if path.is_absolute() or ".." in path.parts:
        raise DataError(f"image key {key!r} leaves the output folder")
    return str(path.with_suffix(".npy") if path.suffix else path.with_name(path.name + ".npy"))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: name a folder for the .npy files")
    if out.is_dir() and any(out.iterdir()) and not (out / INDEX).is_file():
        raise DataError(f"{out} is not empty and holds no {INDEX}: name a new folder")


def _save(path: Path, array: np.ndarray) -> None:
    """One code file, replaced whole (durability comes from one sync before the index)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.write_bytes(buffer.getvalue())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def encode_to_folder(run_dir: str | Path, out: str | Path, *, source: str | None = None,
                     batch_size: int = 256, device: str | torch.device = "cpu",
                     flip: bool = False, progress: bool = True) -> tuple[str, Path]:
    """``vqvae encode --format npy``: every image of the train and test splits to
    ``OUT/SPLIT/KEY.npy``, an int array (h, w) of code ids (a multiscale tokenizer's: (L,), all
    scales' maps, their sides in the index; with ``flip``, the training split's have a leading
    2: the image and its mirror image), then ``OUT/codes.json``. The
    index is written last, after a sync: a folder without it is unfinished."""
    out = Path(out)
    _check_out(out)
    by = f"codes {out.resolve()}"
    directory, added = ckpt.hold(run_dir, by)
    try:
        directory, model, sha, data, splits = encoding_source(directory, source, device)
        index = {"format": FORMAT, "codebook_size": model.cfg.codebook_size,
                 "stage1": str(directory.resolve()), "stage1_sha256": sha, "source": data.source,
                 "classes": list(splits.train.classes) if splits.train.classes else None,
                 "flip": flip, "splits": {}}
        for name in ("train", "test"):
            index["splits"][name] = _encode_split(model, getattr(splits, name), out / name,
                                                  batch_size, device, progress,
                                                  flip and name == "train", data.workers, name)
        index["grid"] = [model.cfg.latent_size] * 2
        if token_scales(model):  # each file holds all scales' maps: (L,), L = sum(s*s)
            index["scales"] = list(token_scales(model))
        os.sync()  # every .npy on disk before the index says they are
        write_json(out / INDEX, index)
    except BaseException:
        if added:
            ckpt.unprotect(directory, by)
        raise
    counts = ", ".join(f"{len(rows)} {name}" for name, rows in index["splits"].items())
    return f"{counts} images of {data.source} as .npy code grids", out / INDEX


def _encode_split(model, images, folder: Path, batch_size: int, device, progress: bool,
                  flip: bool, workers: int, name: str) -> list[list]:
    """Write one split's files; returns its [key, label] rows in order."""
    rows, seen = [], set()
    for part in encode_batches(model, images, batch_size, device, f"encode {name}", progress,
                               workers, with_mirror=flip):
        codes = part.codes.numpy()
        for i, key in enumerate(part.keys):
            file = npy_name(key)
            if file in seen:
                raise DataError(f"two images of {name} would both be written to {file} (keys "
                                f"differing only in their suffix): rename one")
            seen.add(file)
            _save(folder / file, codes[i])
            rows.append([key, None if part.labels is None else int(part.labels[i])])
    return rows


def encode_codes(run_dir: str | Path, out: str | Path, *, format: str = "safetensors",
                 source: str | None = None, batch_size: int = 256,
                 device: str | torch.device = "auto", flip: bool = False,
                 progress: bool = True) -> tuple[str, Path]:
    """``vqvae encode``: one codes file (``format`` safetensors, :func:`encode_to_file`) or one
    ``.npy`` per image (npy, :func:`encode_to_folder`); returns what was encoded, in words, and
    the file written last."""
    if format not in ("safetensors", "npy"):
        raise DataError(f"codes format must be safetensors or npy, got {format!r}")
    options = dict(source=source, batch_size=batch_size, flip=flip, progress=progress)
    if format == "npy":
        return encode_to_folder(run_dir, out, device=pick_device(device), **options)
    codes, path = encode_to_file(run_dir, out, device=device, **options)
    return codes.summary(), path


def read_code_folder(out: str | Path) -> dict:
    """``codes.json`` of a folder written by :func:`encode_to_folder`."""
    path = Path(out) / INDEX
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{out} holds no {INDEX}: not written by `vqvae encode --format npy`, "
                        f"or interrupted") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is damaged: {e}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not a vqvae codes index")
    return index
