"""Images as uint8 tensors: the in-memory image set, decoding one file's bytes, resizing.

Pixels are uint8 (N, C, S, S) until a batch reaches the model; :func:`to_float` maps a batch to
[-1, 1] as the seed does (x / 255 * 2 - 1). Every source, in memory or streamed, decodes a file
with :func:`decode_image`, so the two paths give the same pixels.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError
from .augment import CROP_SCALE, crop_box, maybe_flip


class Batch(NamedTuple):
    images: torch.Tensor  # (B, C, S, S) uint8
    labels: torch.Tensor | None  # (B,) int64
    skipped: int = 0  # unreadable files left out of (or replaced in) this batch
    rows: torch.Tensor | None = None  # (B,) int64: which images of the set (ordered batches)


@dataclass(frozen=True)
class ImageSet:
    """Decoded images held in memory, with their class labels when the source has them."""

    images: torch.Tensor  # (N, C, S, S) uint8
    labels: torch.Tensor | None = None  # (N,) int64
    classes: tuple[str, ...] | None = None
    names: np.ndarray | None = None  # (N,) str: each image's name in its source (keys())

    def __len__(self) -> int:
        return self.images.shape[0]

    def keys(self) -> np.ndarray:
        """(N,) str: what names each image in its source (a relative path, a shard key, an
        array index)."""
        if self.names is not None:
            return self.names
        return np.array([str(i) for i in range(len(self))], dtype=object)

    @property
    def channels(self) -> int:
        return int(self.images.shape[1])

    def subset(self, index: torch.Tensor) -> ImageSet:
        labels = None if self.labels is None else self.labels[index]
        return ImageSet(self.images[index], labels, self.classes,
                        self.keys()[np.asarray(index)])

    def take(self, index: torch.Tensor) -> torch.Tensor:
        """The images at ``index`` (n,) as uint8 (n, C, S, S)."""
        return self.images[index]

    def batches(self, batch_size: int, **_: Any) -> Iterator[Batch]:
        """All images in order, ``batch_size`` at a time."""
        for start in range(0, len(self), batch_size):
            labels = None if self.labels is None else self.labels[start:start + batch_size]
            yield Batch(self.images[start:start + batch_size], labels, 0,
                        torch.arange(start, min(start + batch_size, len(self))))


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float32 in [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """float in [-1, 1] -> uint8, rounding as the seed does."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# --- resizing --------------------------------------------------------------------------------


def resize_square(images: torch.Tensor, size: int) -> torch.Tensor:
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


def set_channels(images: torch.Tensor, channels: int | None) -> torch.Tensor:
    """uint8 (N, C, H, W) with C in (1, 3) -> ``channels`` channels (None: unchanged)."""
    c = images.shape[1]
    if channels is None or channels == c:
        return images
    if channels == 3 and c == 1:
        return images.expand(-1, 3, -1, -1).contiguous()
    if channels == 1 and c == 3:  # ITU-R 601 luma, as Pillow's convert("L")
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
    raise DataError(f"cannot convert {c}-channel images to {channels} channels")


# --- decoding --------------------------------------------------------------------------------


def rgb8(img: Any) -> np.ndarray:
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


def decode_image(data: bytes | str, size: int, channels: int | None = None,
                 gen: torch.Generator | None = None, crop: str = "center",
                 flip: bool = False) -> torch.Tensor | str:
    """One image file (its bytes or its path) -> uint8 (C, size, size), or the reason it could
    not be read. ``center``: the largest centred square, resized to ``size``; ``random`` (a
    :func:`~vqvae.data.augment.crop_box` square) and ``flip`` draw from ``gen``. Cropping and
    antialiased resizing are one Pillow call; JPEGs decode at a reduced scale (Pillow's draft
    mode) when they are at least twice the size needed: 2-8x faster on large photos."""
    from PIL import Image

    random = crop == "random"
    need = math.ceil(size / CROP_SCALE[0]) if random else size
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
            if img.format == "JPEG":
                img.draft("RGB", (need, need))  # both sides stay >= need
            img.load()
            rgb = (img.convert("RGB") if not (img.mode.startswith("I;16") or img.mode == "I")
                   else Image.fromarray(rgb8(img)))
    except Exception as e:  # PIL raises many types for corrupt files
        return f"{type(e).__name__}: {e}"
    w, h = rgb.size
    if random:
        assert gen is not None, "a random crop needs the sample's generator"
        top, left, side = crop_box(h, w, gen)
    else:
        side = min(h, w)
        top, left = (h - side) / 2, (w - side) / 2
    rgb = rgb.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
    image = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)  # (3, size, size)
    if flip:
        assert gen is not None, "a random flip needs the sample's generator"
        image = maybe_flip(image, gen)
    return set_channels(image.unsqueeze(0), channels)[0]
