"""Where the prior is surprised: each code's -log2 p (the bits the coder spends on it) painted over
its image, bits per image, and a data set's held-out images ranked by them (outliers first).

The same probabilities as :mod:`.coder`, so a map's bits add up to the image's coded size (less
the labels and the stream's rounding); Nalisnick et al., "Do deep generative models know what they
don't know?" (2019), on likelihood as an outlier score and its limits.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..config import DataConfig
from ..data.sources import load_splits, read_image
from ..errors import DataError
from ..fileio import write_bytes
from ..generation.grids import save_png, tile
from ..generation.pipeline import Pipeline
from .coder import encode_grids
from .compress import coding_steps, load_pipeline, encode_images, image_files


@dataclass(frozen=True)
class Surprise:
    images: torch.Tensor  # (N, C, H, W) uint8, as given
    bits: torch.Tensor  # (N, h, w) float64: -log2 p of each code
    codebook_size: int

    @property
    def per_image(self) -> torch.Tensor:
        """(N,) bits of each image's codes."""
        return self.bits.flatten(1).sum(1)

    def maps(self) -> torch.Tensor:
        """(N, 3, H, W) uint8: each image in grey with its codes' bits in red over it, full red at
        log2 K bits (what a uniform guess costs) or more, so maps compare across images."""
        n, c, h, w = self.images.shape
        grey = self.images.float().mean(1, keepdim=True) / 255  # (N, 1, H, W)
        heat = (self.bits.float() / math.log2(self.codebook_size)).clamp(0, 1)[:, None]
        heat = F.interpolate(heat, size=(h, w), mode="nearest")  # (N, 1, h, w) -> (N, 1, H, W)
        red = torch.cat([torch.ones_like(heat), torch.zeros_like(heat), torch.zeros_like(heat)], 1)
        mixed = (1 - 0.6 * heat) * grey.expand(-1, 3, -1, -1) + 0.6 * heat * red
        return (mixed * 255).round().clamp(0, 255).to(torch.uint8)


def surprise(pipeline_or_run: Pipeline | str | Path, images: torch.Tensor,
             labels: torch.Tensor | None = None, batch_size: int = 64, steps: int | None = None,
             device: str | torch.device = "auto", progress: bool = False,
             threads: int = 1) -> Surprise:
    """uint8 images (N, C, H, W) at the stage-1 model's size -> each code's -log2 p under the
    prior, in its coding order (``labels``: class ids for a class-conditional prior)."""
    pipe = load_pipeline(pipeline_or_run, device)
    grids = encode_images(pipe, images)
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
    coded = encode_grids(pipe.prior, grids, labels, batch_size, coding_steps(pipe, steps),
                         progress, "surprise", threads)
    return Surprise(images, coded.bits.view(grids.shape), pipe.prior.cfg.codebook_size)


@dataclass(frozen=True)
class SurpriseReport:
    table: Path  # CSV: one row per image
    pictures: list[Path]
    bits: torch.Tensor  # (N,) per image, in input order

    def summary(self) -> str:
        return (f"{len(self.bits)} images, {self.bits.mean():.1f} bits each on average "
                f"(most {self.bits.max():.1f}): {self.table}, "
                f"{len(self.pictures)} picture{'s' * (len(self.pictures) != 1)}")


def _csv(rows: list[list]) -> bytes:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue().encode()


def write_surprise(prior_run: str | Path, image_paths: Sequence[str | Path] = (),
                   out: str | Path = "surprise", data: str | None = None, top: int = 16,
                   batch_size: int = 64, steps: int | None = None,
                   device: str | torch.device = "auto", progress: bool = True,
                   threads: int = 1) -> SurpriseReport:
    """``vqvae surprise``: for image files (or folders), ``NAME.surprise.png`` per image (the
    image and its map) and ``bits.csv`` (bits per image); with ``data`` (a source), its held-out
    images ranked, most surprising first: ``outliers.png`` (the ``top`` ones and their maps) and
    ``ranking.csv``. A class-conditional prior is given the data's labels when it has them."""
    if bool(image_paths) == bool(data):
        raise DataError("name image files or a data set (--data SOURCE), not both or neither")
    if top < 1:
        raise DataError(f"--top must be >= 1, got {top}")
    pipe = load_pipeline(prior_run, device)
    cfg, out = pipe.stage1.cfg, Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file: name a folder for the pictures")
    if data is None:
        files = image_files(image_paths)
        images = torch.cat([read_image(f, cfg.image_size, cfg.in_channels) for f in files])
        result = surprise(pipe, images, None, batch_size, steps, progress=progress,
                          threads=threads)
        pictures = [save_png(tile(torch.stack([_rgb(image), picture]), 2),
                             out / f"{f.stem}.surprise.png")
                    for f, image, picture in zip(files, images, result.maps())]
        rows = [["image", "bits", "bits_per_pixel"]] + [
            [f.name, f"{b:.2f}", f"{b / cfg.image_size ** 2:.4f}"]
            for f, b in zip(files, result.per_image.tolist())]
        return SurpriseReport(write_bytes(out / "bits.csv", _csv(rows)), pictures,
                              result.per_image)
    held_out = load_splits(DataConfig(source=data, size=cfg.image_size,
                                      channels=cfg.in_channels)).test
    held_out = held_out if hasattr(held_out, "images") else held_out.load()
    labels = held_out.labels if pipe.prior.cfg.num_classes else None
    result = surprise(pipe, held_out.images, labels, batch_size, steps, progress=progress,
                      threads=threads)
    order = result.per_image.argsort(descending=True)
    worst, maps = order[:top], result.maps()
    strip = torch.stack([x for i in worst.tolist() for x in (_rgb(held_out.images[i]), maps[i])])
    picture = save_png(tile(strip, 2 * min(4, len(worst))), out / "outliers.png")
    names = held_out.classes
    rows = [["rank", "index", "label", "bits", "bits_per_pixel"]]
    for rank, i in enumerate(order.tolist()):
        label = "" if held_out.labels is None else int(held_out.labels[i])
        shown = names[label] if names and label != "" and label < len(names) else label
        bits = float(result.per_image[i])
        rows.append([rank + 1, i, shown, f"{bits:.2f}", f"{bits / cfg.image_size ** 2:.4f}"])
    return SurpriseReport(write_bytes(out / "ranking.csv", _csv(rows)), [picture],
                          result.per_image)


def _rgb(image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) uint8 -> (3, H, W)."""
    return image.expand(3, -1, -1) if image.shape[0] == 1 else image
