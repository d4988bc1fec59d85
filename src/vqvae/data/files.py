"""Image sets kept as files and decoded when needed: a folder's files or the members of tar
shards, read by index.

A :class:`FileSet` holds only where each image's bytes are (paths, or shard offsets) in numpy
arrays, not Python objects, so worker processes forked from it share those pages instead of
copying them. It reads like an in-memory :class:`~vqvae.data.images.ImageSet` (``take``, ordered
``batches`` decoded by worker processes) and can be decoded whole into one (``load``).
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..errors import DataError, SkippedImagesWarning
from .images import Batch, ImageSet, decode_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm")
DECODE_CHUNK = 256  # images decoded per batch of thread-pool tasks: bounds what is in flight


@dataclass(frozen=True, eq=False)
class FolderFiles:
    """Image files by index: ``paths`` (N,) of encoded file names below ``root``."""

    paths: np.ndarray  # (N,) bytes
    root: bytes = b""  # the folder they were listed from: keys are paths relative to it

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return os.fsdecode(self.paths[i])

    def keys(self) -> np.ndarray:
        """(N,) str: each file's path relative to ``root`` (``cat/001.png``), what joins its
        codes back to it."""
        start = len(os.path.join(self.root, b"")) if self.root else 0
        return np.array([os.fsdecode(p[start:]) for p in self.paths.tolist()], dtype=object)

    def read(self, i: int) -> bytes:
        with open(self.paths[i], "rb") as f:
            return f.read()

    def subset(self, index: np.ndarray) -> FolderFiles:
        return FolderFiles(self.paths[index], self.root)


@dataclass(frozen=True, eq=False)
class TarFiles:
    """Members of tar files by index: member i is ``lengths[i]`` bytes at ``offsets[i]`` of
    ``shards[shard_ids[i]]`` (uncompressed tar, so one seek and one read)."""

    shards: tuple[str, ...]
    shard_ids: np.ndarray  # (N,) int32
    offsets: np.ndarray  # (N,) int64
    lengths: np.ndarray  # (N,) int64
    names: np.ndarray  # (N,) bytes, the members' names

    def __len__(self) -> int:
        return len(self.offsets)

    def name(self, i: int) -> str:
        return f"{self.shards[self.shard_ids[i]]}:{self.names[i].decode()}"

    def keys(self) -> np.ndarray:
        """(N,) str: each sample's WebDataset key (its member name up to the first dot of the
        base name: ``a/000123`` for ``a/000123.jpg``)."""
        def key(name: bytes) -> str:
            folder, _, base = name.decode().rpartition("/")
            return f"{folder}/{base.partition('.')[0]}" if folder else base.partition(".")[0]
        return np.array([key(n) for n in self.names.tolist()], dtype=object)

    def read(self, i: int) -> bytes:
        with open(self.shards[self.shard_ids[i]], "rb") as f:
            f.seek(int(self.offsets[i]))
            data = f.read(int(self.lengths[i]))
        if len(data) != self.lengths[i]:
            raise OSError(f"{self.name(i)} is truncated")
        return data

    def subset(self, index: np.ndarray) -> TarFiles:
        return TarFiles(self.shards, self.shard_ids[index], self.offsets[index],
                        self.lengths[index], self.names[index])


Files = FolderFiles | TarFiles


@dataclass(frozen=True, eq=False)
class FileSet:
    """Images of ``files`` at ``size`` px and ``channels`` channels, with their labels."""

    files: Files
    size: int
    channels: int
    labels: torch.Tensor | None = None  # (N,) int64
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: torch.Tensor) -> FileSet:
        labels = None if self.labels is None else self.labels[index]
        return FileSet(self.files.subset(index.numpy()), self.size, self.channels, labels,
                       self.classes)

    def decode(self, i: int, gen: torch.Generator | None = None, crop: str = "center",
               flip: bool = False) -> torch.Tensor | str:
        """Image ``i`` as uint8 (C, S, S), or why it cannot be read."""
        try:
            data = self.files.read(i)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return decode_image(data, self.size, self.channels, gen, crop, flip)

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The images at ``index`` (n,) as uint8 (n, C, S, S) (for grids and picks): an
        unreadable one is replaced by the next readable image of the set, with a warning."""
        out = torch.empty(len(index), self.channels, self.size, self.size, dtype=torch.uint8)
        failures = []
        for row, i in enumerate(index.tolist()):
            for j in range(i, i + len(self)):
                image = self.decode(j % len(self))
                if not isinstance(image, str):
                    break
                failures.append((j % len(self), image))
            else:
                raise DataError(f"none of the {len(self)} image files could be read")
            out[row] = image
        if failures:
            warn_skipped(len(failures), None, self.files.name(failures[0][0]), failures[0][1])
        return out

    def batches(self, batch_size: int, workers: int = 2,
                desc: str | None = None) -> Iterator[Batch]:
        """All readable images in order, ``batch_size`` at a time, decoded by ``workers``
        processes; unreadable files are left out and counted in :attr:`Batch.skipped`."""
        from torch.utils.data import DataLoader

        loader = DataLoader(_Ordered(self), batch_size=batch_size, num_workers=workers,
                            collate_fn=_keep_readable, persistent_workers=False)
        bar = tqdm(total=len(self), desc=desc, unit="img", disable=desc is None, leave=False)
        for batch in loader:
            bar.update(batch.images.shape[0] + batch.skipped)
            if batch.images.shape[0]:
                yield batch
        bar.close()

    def load(self, desc: str = "decoding images") -> ImageSet:
        """Every readable image decoded into memory (threads: decoding releases the GIL); the
        unreadable ones are left out with one warning."""
        images, kept, failures = [], [], []
        bar = tqdm(total=len(self), desc=desc, unit="img", leave=False, disable=len(self) < 500)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, len(self), DECODE_CHUNK):
                chunk = range(start, min(start + DECODE_CHUNK, len(self)))
                for i, image in zip(chunk, pool.map(self.decode, chunk)):
                    if isinstance(image, str):
                        failures.append((i, image))
                    else:
                        images.append(image)
                        kept.append(i)
                bar.update(len(chunk))
        bar.close()
        if failures:
            warn_skipped(len(failures), len(self), self.files.name(failures[0][0]), failures[0][1])
        if not images:
            raise DataError(f"none of the {len(self)} image files could be read")
        labels = None if self.labels is None else self.labels[kept]
        return ImageSet(torch.stack(images), labels, self.classes, self.keys()[kept])

    def keys(self) -> np.ndarray:
        """(N,) str: what names each image in its source (a relative path, a shard key)."""
        return self.files.keys()


def warn_skipped(count: int, total: int | None, example: str, reason: str) -> None:
    of = f" of {total}" if total else ""
    warnings.warn(f"skipped {count} unreadable image(s){of} (e.g. {Path(example).name}: "
                  f"{reason})", SkippedImagesWarning, stacklevel=3)


class _Ordered(torch.utils.data.Dataset):
    """Image i of a file set, or None when it cannot be read (for ordered batches)."""

    def __init__(self, files: FileSet):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, int]:
        image = self.files.decode(i)
        label = -1 if self.files.labels is None else int(self.files.labels[i])
        return (None if isinstance(image, str) else image), label, i


def _keep_readable(items: Sequence[tuple[torch.Tensor | None, int, int]]) -> Batch:
    kept = [item for item in items if item[0] is not None]
    if not kept:
        return Batch(torch.empty(0, dtype=torch.uint8), None, len(items), torch.empty(0))
    images = torch.stack([image for image, _, _ in kept])
    labels = torch.tensor([label for _, label, _ in kept]) if kept[0][1] >= 0 else None
    return Batch(images, labels, len(items) - len(kept), torch.tensor([i for *_, i in kept]))


# --- folders ---------------------------------------------------------------------------------


def folder_files(directory: Path, min_classes: int = 2
                 ) -> tuple[FolderFiles, torch.Tensor | None, tuple | None]:
    """The image files below ``directory`` (recursively, in path order) and their labels: one
    sub-folder per class when every image sits below a first-level folder (and there are at
    least ``min_classes`` of them: a held-out folder may hold one class of several). Names are
    walked as strings, not Path objects: a million files cost their bytes, not ~1 KB each of
    objects whose freed pages every worker process would inherit."""
    root = os.fspath(directory)
    paths = [os.path.join(folder, name) for folder, _, names in os.walk(root) for name in names
             if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    if not paths:
        raise DataError(f"no images found in {directory} (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    paths.sort(key=lambda p: p.split(os.sep))  # the order of sorted Paths: split by part
    labels, classes = _folder_labels(root, paths, min_classes)
    files = FolderFiles(np.array([os.fsencode(p) for p in paths]), os.fsencode(root))
    return files, labels, classes


def _folder_labels(root: str, paths: list[str],
                   min_classes: int = 2) -> tuple[torch.Tensor | None, tuple | None]:
    start = len(os.path.join(root, ""))
    firsts = [p[start:].split(os.sep, 1) for p in paths]
    if any(len(parts) < 2 for parts in firsts):
        return None, None
    classes = tuple(sorted({parts[0] for parts in firsts}))
    if len(classes) < min_classes:
        return None, None
    lookup = {name: i for i, name in enumerate(classes)}
    return torch.tensor([lookup[parts[0]] for parts in firsts], dtype=torch.long), classes
