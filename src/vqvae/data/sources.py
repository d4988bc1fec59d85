"""Image sources -> train and held-out image sets at one size, and endless batch indices.

Sources: scikit-learn's embedded 8x8 digits, MNIST-format IDX files (Fashion-MNIST), .npy/.npz
arrays (all held in memory as uint8), image folders (searched recursively) and WebDataset tar
shards. Folders and shards are decoded into memory when small and streamed from their files
otherwise (``DataConfig.cache``); their held-out split is made on the file list, before any
decoding, so the two give the same images.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import DataError, SkippedImagesWarning
from .files import FileSet, folder_files
from .images import ImageSet, decode_image, resize_square, set_channels, to_float, to_uint8
from .shards import held_out, index_shards, is_shard_source, manifest_classes, shard_paths

__all__ = ["DataError", "ImageSet", "FileSet", "Splits", "SkippedImagesWarning", "load_splits",
           "read_image", "read_mask", "to_float", "to_uint8", "BatchStream", "read_idx",
           "NAMED_IDX"]

# Named IDX data sets and where Debian's dataset packages put them.
NAMED_IDX = {
    "fashion-mnist": ("/usr/share/datasets/fashion-mnist", "dataset-fashion-mnist"),
    "mnist": ("/usr/share/datasets/mnist", "dataset-mnist"),
}
# --cache auto streams a folder or shards beyond either bound: decoding that many files before
# step 1 takes minutes, and that many bytes crowd the machine's memory.
MEMORY_MAX_IMAGES = 20_000
MEMORY_MAX_FRACTION = 0.25  # of physical memory


@dataclass(frozen=True)
class Splits:
    train: ImageSet | FileSet
    test: ImageSet | FileSet
    held_out: str = ""  # which images the test set is, in words (for the console and logs)


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


def read_image(path: str | Path, size: int, channels: int) -> torch.Tensor:
    """One image file -> uint8 (1, channels, size, size), resized and centre-cropped like the
    training data; a clear error when it cannot be read."""
    result = decode_image(str(path), size, channels)
    if isinstance(result, str):
        raise DataError(f"cannot read image {path}: {result}")
    return result.unsqueeze(0)


def read_mask(path: str | Path, size: int, like: str | Path) -> torch.Tensor:
    """A mask file, white (> 127) where to redraw -> bool (size, size), cropped and resized as
    :func:`read_image` does with the image ``like``, which must have the mask's size; a cell keeps
    every white pixel that falls in it. A clear error when the sizes differ or nothing is white."""
    from PIL import Image

    try:
        with Image.open(like) as img:
            want = img.size
        with Image.open(path) as img:
            white = img.convert("L").point(lambda v: 255 if v > 127 else 0)
    except Exception as e:  # PIL raises many types for corrupt files
        raise DataError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
    if white.size != want:
        raise DataError(f"mask {path} is {white.size[0]}x{white.size[1]} but image {like} is "
                        f"{want[0]}x{want[1]}: draw the mask at the image's size")
    if white.getbbox() is None:
        raise DataError(f"mask {path} has no white pixel (value > 127): nothing to redraw")
    w, h = white.size
    side = min(w, h)
    left, top = (w - side) / 2, (h - side) / 2  # the centred square read_image keeps
    small = white.resize((size, size), Image.BOX, box=(left, top, left + side, top + side))
    mask = torch.from_numpy(np.asarray(small).copy()) > 0  # any white pixel in the cell
    if not mask.any():
        raise DataError(f"mask {path}: its white pixels lie outside the centred square of the "
                        f"image that the model sees: nothing to redraw")
    return mask


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


def _holdout_index(n: int, fraction: float, seed: int, name: str) -> tuple[torch.Tensor, ...]:
    """(train rows, test rows), each sorted: ``fraction`` of ``n`` held out by a seeded
    permutation."""
    if n < 2:
        raise DataError(f"{name} holds {n} image(s); at least 2 are needed for a held-out split")
    n_test = min(n - 1, max(1, round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def _memory_source(cfg: DataConfig, path: Path | None) -> tuple[ImageSet, ImageSet | None, str]:
    """A source held in memory as it is stored (digits, IDX, arrays): (train, test or None,
    name), at the source's own resolution."""
    if path is None:
        if cfg.source == "digits":
            return _digits(), None, "digits"
        directory, package = NAMED_IDX[cfg.source]
        if not _is_idx_dir(Path(directory)):
            raise DataError(f"{cfg.source} not found in {directory}: install it with "
                            f"`apt-get install {package}` or pass the directory of its IDX files")
        return (*_idx_splits(Path(directory)), cfg.source)
    if path.is_dir():
        return (*_idx_splits(path), str(path))
    if path.suffix in (".npy", ".npz"):
        return _array(path), None, str(path)
    if "idx3-ubyte" in path.name:
        return ImageSet(torch.from_numpy(read_idx(path).copy()).unsqueeze(1)), None, str(path)
    raise DataError(f"{path}: unsupported file type (use a .npy/.npz array, an IDX file, a folder "
                    f"of images or .tar shards)")


def _whole_files(cfg: DataConfig, shards: bool, min_classes: int = 2
                 ) -> tuple[FileSet, np.ndarray | None]:
    """Every file of a folder (sorted; class folders when there are ``min_classes``) or sample of
    tar shards (``shards``, with their keys), not yet decoded."""
    channels = cfg.channels or 3
    if not shards:
        files, labels, classes = folder_files(Path(cfg.source).expanduser(), min_classes)
        return FileSet(files, cfg.size, channels, labels, classes), None
    paths = shard_paths(cfg.source)
    index = index_shards(paths)
    labels = torch.from_numpy(index.labels) if (index.labels >= 0).all() else None
    classes = None if labels is None else (manifest_classes(paths)
                                           or _class_names(labels, paths[0]))
    return FileSet(index.files, cfg.size, channels, labels, classes), index.keys


def _file_splits(cfg: DataConfig, shards: bool) -> Splits:
    """A folder's files or (``shards``) the samples of tar shards, split before decoding: a
    folder by a seeded permutation of its sorted file list, shards by a hash of each sample's
    key."""
    full, keys = _whole_files(cfg, shards)
    if keys is not None:
        test = held_out(keys, cfg.holdout, cfg.split_seed)
        if test.all() or not test.any():
            raise DataError(f"{cfg.source}: {len(full)} image(s) leave no train or no held-out "
                            f"images at holdout {cfg.holdout}")
        return Splits(full.subset(torch.from_numpy(np.flatnonzero(~test))),
                      full.subset(torch.from_numpy(np.flatnonzero(test))))
    return Splits(*(full.subset(rows) for rows in _holdout_index(
        len(full), cfg.holdout, cfg.split_seed, cfg.source)))


def cache_mode(cfg: DataConfig, images: int, channels: int) -> str:
    """``cfg.cache``, with ``auto`` resolved for a file source of ``images`` images: memory
    unless there are too many to decode before step 1 or to hold (see MEMORY_MAX_*)."""
    if cfg.cache != "auto":
        return cfg.cache
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    fits = images * channels * cfg.size**2 <= MEMORY_MAX_FRACTION * ram
    return "memory" if images <= MEMORY_MAX_IMAGES and fits else "stream"


def _locate(source: str) -> tuple[Path | None, bool, bool]:
    """(path or None for a named set, whether it is tar shards, whether it is read file by file:
    shards or a folder of images) of a source that exists."""
    path = None if source == "digits" or source in NAMED_IDX else Path(source).expanduser()
    shards = path is not None and is_shard_source(source)
    if path is not None and not path.exists() and not shards:
        raise DataError(f"data source {source!r} not found (expected digits, "
                        f"{', '.join(NAMED_IDX)}, a folder of images, .tar shards, or a "
                        f".npy/.npz file)")
    return path, shards, path is not None and (shards or (path.is_dir()
                                                          and not _is_idx_dir(path)))


def _split(cfg: DataConfig) -> Splits:
    """One source split into train and held-out images (its own test split, or a share)."""
    path, shards, files = _locate(cfg.source)
    if files:
        splits = _file_splits(cfg, shards)
        images = len(splits.train) + len(splits.test)
        held = f"{cfg.holdout:.0%} of {cfg.source} held out"
        if cache_mode(cfg, images, splits.train.channels) == "stream":
            return Splits(splits.train, splits.test, held)
        return Splits(*(s.load() for s in (splits.train, splits.test)), held)
    if cfg.cache == "stream":
        raise DataError(f"--cache stream reads folders and shards; {cfg.source} is held in "
                        f"memory (use --cache auto)")
    train, test, name = _memory_source(cfg, path)
    if len(train) == 0:
        raise DataError(f"{name} holds no images")
    if test is None:
        splits = Splits(*(train.subset(rows) for rows in _holdout_index(
            len(train), cfg.holdout, cfg.split_seed, name)),
            f"{cfg.holdout:.0%} of {name} held out")
    else:
        splits = Splits(train, test, f"the test split of {name}")
    return Splits(*(_sized(s, cfg) for s in (splits.train, splits.test)), splits.held_out)


def _sized(images: ImageSet, cfg: DataConfig) -> ImageSet:
    return ImageSet(set_channels(resize_square(images.images, cfg.size), cfg.channels),
                    images.labels, images.classes, images.keys())


# A folder holding these sub-folders is a training set and its held-out set (not two classes).
TRAIN_FOLDER, EVAL_FOLDERS = "train", ("val", "validation", "test")


def train_val_folders(source: str) -> tuple[Path, Path] | None:
    """(``train/``, ``val/``) of a folder laid out as ImageNet is (``val/``, ``validation/`` or
    ``test/`` beside ``train/``), else None."""
    path = Path(source).expanduser()
    if not path.is_dir() or is_shard_source(source) or not (path / TRAIN_FOLDER).is_dir():
        return None
    held = next((path / name for name in EVAL_FOLDERS if (path / name).is_dir()), None)
    return None if held is None else (path / TRAIN_FOLDER, held)


def load_whole(cfg: DataConfig, part: str = "train", min_classes: int = 2
               ) -> ImageSet | FileSet:
    """Every image of ``cfg.source`` at ``cfg.size`` px, none held out (a source with a test
    split of its own gives that one for ``part`` test, its training images otherwise; a folder's
    first-level folders are classes when there are ``min_classes`` of them)."""
    path, shards, files = _locate(cfg.source)
    if files:
        whole, _ = _whole_files(cfg, shards, min_classes)
        return whole if cache_mode(cfg, len(whole), whole.channels) == "stream" else whole.load()
    train, test, name = _memory_source(cfg, path)
    chosen = test if part == "test" and test is not None else train
    if len(chosen) == 0:
        raise DataError(f"{name} holds no images")
    return _sized(chosen, cfg)


def load_splits(cfg: DataConfig) -> Splits:
    """``cfg.source`` as train and test image sets at ``cfg.size`` px: in memory
    (:class:`ImageSet`, uint8 (N, C, size, size)) or, for folders and shards with
    ``cfg.cache`` stream, as :class:`~vqvae.data.files.FileSet` read when needed.

    The held-out set is ``cfg.eval_source`` when given, the ``val/`` (or ``test/``) folder
    beside ``train/`` in a folder laid out so, a source's own test split (IDX ``t10k`` files),
    or else ``cfg.holdout`` of the images (seeded by ``cfg.split_seed``).
    """
    layout = None if cfg.eval_source else train_val_folders(cfg.source)
    if not cfg.eval_source and layout is None:
        return _split(cfg)
    train_source, eval_source = (str(layout[0]), str(layout[1])) if layout else (
        cfg.source, cfg.eval_source)
    train = load_whole(replace(cfg, source=train_source, eval_source=None), "train")
    test = load_whole(replace(cfg, source=eval_source, eval_source=None), "test",
                      1 if train.classes else 2)
    if train.channels != test.channels:
        raise DataError(f"the held-out set {eval_source} has {test.channels} channel(s), the "
                        f"training set {train_source} {train.channels}: pass --channels")
    return Splits(train, _same_classes(test, train, eval_source),
                  f"{eval_source} ({'the folder beside train/' if layout else '--eval-data'})")


def _same_classes(test: ImageSet | FileSet, train: ImageSet | FileSet,
                  name: str) -> ImageSet | FileSet:
    """``test`` with its labels renumbered to ``train``'s class names (a held-out folder may
    lack some classes, not add any); without labels when either side has none."""
    if train.labels is None or test.classes is None:
        return replace(test, labels=None, classes=None)
    if test.classes == train.classes:
        return test
    extra = sorted(set(test.classes) - set(train.classes))
    if extra:
        raise DataError(f"the held-out set {name} has classes the training set lacks: "
                        f"{', '.join(extra[:5])}")
    lookup = torch.tensor([train.classes.index(c) for c in test.classes])
    return replace(test, labels=lookup[test.labels], classes=train.classes)


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
