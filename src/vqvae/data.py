"""Image sources -> uint8 tensors (N, C, S, S), a deterministic held-out split, endless batches.

Sources: scikit-learn's embedded 8x8 digits, MNIST-format IDX files (Fashion-MNIST), any folder of
images (searched recursively) and .npy/.npz arrays. Images are decoded once and kept as uint8;
:func:`to_float` maps a batch to [-1, 1] as the seed does (x / 255 * 2 - 1).
"""

from __future__ import annotations

import gzip
import os
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from .config import DataConfig

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm",
                    ".pgm")
# Named IDX data sets and where Debian's dataset packages put them.
NAMED_IDX = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist"),
    "mnist": ("/usr/share/datasets/mnist", "dataset-mnist"),
}


class DataError(ValueError):
    """A data source is missing, empty or malformed; the message says which and why."""


class SkippedImagesWarning(UserWarning):
    """Some files of an image folder could not be decoded and were left out."""


@dataclass(frozen=True)
class ImageSet:
    images: torch.Tensor  # (N, C, S, S) uint8
    labels: torch.Tensor | None = None  # (N,) int64
    classes: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: torch.Tensor) -> ImageSet:
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, self.classes)


@dataclass(frozen=True)
class Splits:
    train: ImageSet
    test: ImageSet


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8, rounding as the seed does."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --- resizing --------------------------------------------------------------------------------


def _resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, size, size): shorter side to ``size``, centre crop."""
    n, c, h, w = images.shape
    if h == w == size:
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    out = torch.empty(n, c, size, size, dtype=torch.uint8)
    top, left = (nh - size) // 2, (nw - size) // 2
    for start in range(0, n, 4096):  # bounded float memory on big sets
        chunk = images[start:start + 4096].float()
        chunk = F.interpolate(chunk, size=(nh, nw), mode="bilinear", antialias=True,
                              align_corners=False)
        out[start:start + 4096] = chunk[:, :, top:top + size, left:left + size].round().clamp(
            0, 255).to(torch.uint8)
    return out


def _set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if channels == 3 and c == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and c == 3:  # ITU-R 601 luma, as Pillow's convert("L")
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


# --- sources ---------------------------------------------------------------------------------


def _digits() -> ImageSet:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # values 0..16 -> 0..255
    return ImageSet(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(bunch.target).long(),
                    tuple(str(i) for i in range(10)))


def read_idx(path: Path) -> np.ndarray:
    """Read one MNIST-format IDX file (optionally gzipped) into a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not a uint8 IDX file (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path} is truncated (header)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or corrupt: {len(raw) - header} data bytes, "
                        f"expected {expected} for shape {dims}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(directory: Path, prefix: str, kind: str) -> Path | None:
    name = f"{prefix}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.exists():
            return candidate
    return None


def _idx_set(directory: Path, prefix: str) -> ImageSet | None:
    images_path = _find_idx(directory, prefix, "images")
    if images_path is None:
        return None
    images = read_idx(images_path)
    if images.ndim != 3:
        raise DataError(f"{images_path}: expected (N, H, W) images, got shape {images.shape}")
    labels = None
    labels_path = _find_idx(directory, prefix, "labels")
    if labels_path is not None:
        labels_np = read_idx(labels_path)
        if labels_np.shape != (images.shape[0],):
            raise DataError(f"{labels_path}: {labels_np.shape[0]} labels for "
                            f"{images.shape[0]} images")
        labels = torch.from_numpy(labels_np.astype(np.int64))
    return ImageSet(torch.from_numpy(images.copy()).unsqueeze(1), labels,
                    _class_names(labels, labels_path))


def _is_idx_dir(directory: Path) -> bool:
    return _find_idx(directory, "train", "images") is not None


def _idx_splits(directory: Path) -> tuple[ImageSet, ImageSet | None]:
    train = _idx_set(directory, "train")
    assert train is not None
    return train, _idx_set(directory, "t10k")


def _decode(path: Path, size: int) -> torch.Tensor | str:
    """One image file -> uint8 (1, 3, size, size), or the reason it could not be read. Runs in a
    worker thread; resizing there keeps only size x size copies alive, never full-size images."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            array = _rgb8(img)
    except Exception as e:  # PIL raises many types for corrupt files
        return f"{type(e).__name__}: {e}"
    return _resize_square(torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0), size)


def _rgb8(img: Any) -> np.ndarray:
    """A PIL image -> uint8 (H, W, 3). 16-bit grayscale (modes I;16*, I) is scaled to 8 bits
    (x / 257), not clipped: Pillow's own convert would turn most of it white."""
    if img.mode.startswith("I;16") or img.mode == "I":
        wide = np.asarray(img, dtype=np.float64)
        if img.mode == "I" and wide.max(initial=0) <= 255:  # 8-bit data stored as 32-bit
            gray = wide
        else:
            gray = wide / 257.0
        gray = np.clip(np.round(gray), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    return np.asarray(img.convert("RGB"))


def read_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """One image file -> uint8 (1, channels, size, size), resized and centre-cropped like the
    training data; a clear error when it cannot be read."""
    result = _decode(Path(path), size)
    if isinstance(result, str):
        raise DataError(f"cannot read image {path}: {result}")
    return _set_channels(result, channels)


DECODE_CHUNK = 256  # images decoded per batch of thread-pool tasks: bounds what is in flight


def _folder(directory: Path, size: int) -> ImageSet:
    paths = sorted(p for p in directory.rglob("*")
                   if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not paths:
        raise DataError(f"no images found in {directory} (searched recursively for "
                        f"{', '.join(IMAGE_EXTENSIONS)})")
    images, kept, failures = [], [], []
    bar = tqdm(total=len(paths), desc="decoding images", unit="img", leave=False,
               disable=len(paths) < 500)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, len(paths), DECODE_CHUNK):
            chunk = paths[start:start + DECODE_CHUNK]
            for path, result in zip(chunk, pool.map(_decode, chunk, [size] * len(chunk))):
                if isinstance(result, str):
                    failures.append((path, result))
                else:
                    images.append(result)
                    kept.append(path)
            bar.update(len(chunk))
    bar.close()
    if failures:
        example = failures[0]
        warnings.warn(f"skipped {len(failures)} unreadable image(s) of {len(paths)} in "
                      f"{directory} (e.g. {example[0].name}: {example[1]})",
                      SkippedImagesWarning, stacklevel=3)
    if not images:
        raise DataError(f"none of the {len(paths)} image files in {directory} could be read")
    labels, classes = _folder_labels(directory, kept)
    return ImageSet(torch.cat(images), labels, classes)


def _folder_labels(root: Path, paths: list[Path]) -> tuple[torch.Tensor | None, tuple | None]:
    """One sub-folder per class: labels when every image sits below a first-level folder."""
    parts = [p.relative_to(root).parts for p in paths]
    if any(len(part) < 2 for part in parts):
        return None, None
    classes = tuple(sorted({part[0] for part in parts}))
    if len(classes) < 2:
        return None, None
    lookup = {name: i for i, name in enumerate(classes)}
    return torch.tensor([lookup[part[0]] for part in parts], dtype=torch.long), classes


def _array(path: Path) -> ImageSet:
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read array file {path}: {e}") from None
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if not keys:
                raise DataError(f"{path} holds no arrays")
            key = next((k for k in ("images", "x", "X", "arr_0") if k in keys), keys[0])
            array = loaded[key]
            label_key = next((k for k in ("labels", "y", "Y") if k in keys), None)
            if label_key is not None:
                labels = loaded[label_key]
    else:
        array = loaded
    images = _array_to_uint8(array, path)
    if labels is not None:
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: labels must be {images.shape[0]} integers, "
                            f"got {labels.dtype} {labels.shape}")
        labels = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(images, labels, _class_names(labels, path))


MAX_CLASSES = 1 << 16


def _class_names(labels: torch.Tensor | None, path: Path | None) -> tuple[str, ...] | None:
    """Names "0".."C-1" for integer class ids, after checking they are ids (nothing is allocated
    for a label of 10^12)."""
    if labels is None or labels.numel() == 0:
        return None
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= MAX_CLASSES:
        raise DataError(f"{path}: labels must be class ids in [0, {MAX_CLASSES}), found "
                        f"[{lo}, {hi}]")
    return tuple(str(i) for i in range(hi + 1))


def _array_to_uint8(array: np.ndarray, path: Path) -> torch.Tensor:
    """(N, H, W), (N, H, W, C) or (N, C, H, W) arrays, uint8 or float in [0, 1] -> uint8 NCHW."""
    if array.ndim == 3:
        array = array[:, None]
    elif array.ndim == 4 and array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    if array.ndim != 4 or array.shape[1] not in (1, 3):
        raise DataError(f"{path}: expected images shaped (N, H, W), (N, H, W, C) or (N, C, H, W) "
                        f"with C in (1, 3), got {array.shape}")
    if array.shape[0] == 0:
        raise DataError(f"{path} holds no images (shape {array.shape})")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if np.issubdtype(array.dtype, np.floating):
        lo, hi = float(array.min()), float(array.max())
        if lo < 0.0 or hi > 1.0 or not np.isfinite([lo, hi]).all():
            raise DataError(f"{path}: float images must lie in [0, 1], found [{lo}, {hi}]")
        return torch.from_numpy(np.round(array * 255.0).astype(np.uint8))
    raise DataError(f"{path}: unsupported image dtype {array.dtype} (use uint8 or float in [0, 1])")


# --- splitting and loading -------------------------------------------------------------------


def _holdout_split(full: ImageSet, fraction: float, seed: int, name: str) -> Splits:
    n = len(full)
    if n < 2:
        raise DataError(f"{name} holds {n} image(s); at least 2 are needed for a held-out split")
    n_test = min(n - 1, max(1, round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return Splits(full.subset(perm[n_test:].sort().values), full.subset(perm[:n_test].sort().values))


def _raw_source(cfg: DataConfig) -> tuple[ImageSet, ImageSet | None, str]:
    """Load the source at its native resolution where cheap; returns (train, test or None, name)."""
    source = cfg.source
    if source == "digits":
        return _digits(), None, "digits"
    if source in NAMED_IDX:
        directory, package = NAMED_IDX[source]
        if not _is_idx_dir(Path(directory)):
            raise DataError(f"{source} not found in {directory}: install it with "
                            f"`apt-get install {package}` or pass the directory of its IDX files")
        train, test = _idx_splits(Path(directory))
        return train, test, source
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data source {source!r} not found (expected digits, "
                        f"{', '.join(NAMED_IDX)}, a directory, or a .npy/.npz file)")
    if path.is_file():
        if path.suffix in (".npy", ".npz"):
            return _array(path), None, str(path)
        if "idx3-ubyte" in path.name:
            array = read_idx(path)
            return ImageSet(torch.from_numpy(array.copy()).unsqueeze(1)), None, str(path)
        raise DataError(f"{path}: unsupported file type (use a .npy/.npz array, an IDX file or a "
                        f"directory of images)")
    if _is_idx_dir(path):
        train, test = _idx_splits(path)
        return train, test, str(path)
    return _folder(path, cfg.size), None, str(path)


def source_channels(images: ImageSet) -> int:
    return int(images.images.shape[1])


def load_splits(cfg: DataConfig) -> Splits:
    """Load ``cfg.source`` as uint8 (N, C, size, size) train and test sets.

    Sources with their own test split (IDX ``t10k`` files) use it; others hold out
    ``cfg.holdout`` of the images by a permutation seeded with ``cfg.split_seed``.
    """
    train, test, name = _raw_source(cfg)
    if len(train) == 0:
        raise DataError(f"{name} holds no images")
    splits = (_holdout_split(train, cfg.holdout, cfg.split_seed, name) if test is None
              else Splits(train, test))
    channels = cfg.channels
    return Splits(*(ImageSet(_set_channels(_resize_square(s.images, cfg.size), channels),
                             s.labels, s.classes) for s in (splits.train, splits.test)))


class BatchStream:
    """Endless batches of indices: a fresh seeded permutation every epoch, sharded by rank.

    The batch for a step is a pure function of (seed, step), so a resumed run continues with
    exactly the batches it would have seen, and each of ``world_size`` ranks draws its own slice.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise DataError("cannot draw batches from an empty data set")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        start = (step * self.world_size + self.rank) * self.batch_size
        out = torch.empty(self.batch_size, dtype=torch.long)
        filled = 0
        while filled < self.batch_size:
            epoch, offset = divmod(start + filled, self.n)
            take = min(self.batch_size - filled, self.n - offset)
            out[filled:filled + take] = self._permutation(epoch)[offset:offset + take]
            filled += take
        return out
