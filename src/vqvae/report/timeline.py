"""A run's story through its kept checkpoints: the same held-out reconstructions and
interpolations drawn by each stage-1 checkpoint, the same seeded samples by each prior one.

Pictures are PNG bytes, small (a row of 8 images, 3 interpolations, 10 samples), from at most
:data:`MAX_CHECKPOINTS` checkpoints spread over the run (the last always among them).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence, TypeVar

import torch
from PIL import Image
from tqdm import tqdm

from ..config import SampleConfig
from ..data.images import to_float, to_uint8
from ..errors import CheckpointError, ConfigError, DataError
from ..generation.grids import interpolation_grid, samples_grid, tile
from ..generation.sample import draw
from ..models.autoencoder import VQVAE
from ..store import checkpoint as ckpt

MAX_CHECKPOINTS = 12
ROW, PAIRS, SAMPLES = 8, 3, 10  # reconstructions a row, interpolated pairs, samples a checkpoint

T = TypeVar("T")


class Frame(NamedTuple):
    step: int
    pictures: dict[str, bytes]  # name -> PNG
    note: str = ""  # why a checkpoint drew nothing (unreadable)


def spread(items: Sequence[T], limit: int = MAX_CHECKPOINTS) -> list[T]:
    """At most ``limit`` of ``items``, evenly spaced, the first and last kept."""
    if len(items) <= limit:
        return list(items)
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _each(checkpoints: Sequence[Path], desc: str, progress: bool) -> Iterator[Path]:
    yield from tqdm(spread(checkpoints), desc=desc, unit="ckpt", disable=not progress,
                    dynamic_ncols=True)


@torch.no_grad()
def stage1_frames(checkpoints: Sequence[Path], images: torch.Tensor,
                  device: torch.device = torch.device("cpu"),
                  progress: bool = True) -> list[Frame]:
    """For each checkpoint: ``ROW`` held-out images above their reconstructions, and ``PAIRS``
    latent interpolations (uint8 ``images`` needs ``ROW + 2 * PAIRS`` of them, or repeats)."""
    need = ROW + 2 * PAIRS
    images = images.repeat(-(-need // images.shape[0]), 1, 1, 1)[:need]
    frames = []
    for folder in _each(checkpoints, "report: stage-1 checkpoints", progress):
        try:
            model: VQVAE = ckpt.load_autoencoder(folder, device)
        except (CheckpointError, ConfigError, DataError, OSError) as e:
            frames.append(Frame(ckpt.step_of(folder), {}, f"unreadable: {e}"))
            continue
        real = images[:ROW]
        rec = to_uint8(model.reconstruct(to_float(real.to(device)))).cpu()
        first, second = images[ROW:ROW + PAIRS], images[ROW + PAIRS:need]
        frames.append(Frame(ckpt.step_of(folder), {
            "reconstructions": png_bytes(tile(torch.cat([real, rec]), ROW, min_tile=32)),
            "interpolations": png_bytes(interpolation_grid(model, first, second, ROW))}))
    return frames


@torch.no_grad()
def prior_frames(checkpoints: Sequence[Path], stage1: VQVAE,
                 device: torch.device = torch.device("cpu"),
                 progress: bool = True) -> list[Frame]:
    """For each prior checkpoint: ``SAMPLES`` images drawn with seed 0 (a conditional prior's
    classes in turn), decoded by ``stage1``."""
    frames = []
    for folder in _each(checkpoints, "report: prior checkpoints", progress):
        try:
            prior = ckpt.load_prior(folder, device)
        except (CheckpointError, ConfigError, DataError, OSError) as e:
            frames.append(Frame(ckpt.step_of(folder), {}, f"unreadable: {e}"))
            continue
        classes = prior.cfg.num_classes
        cfg = SampleConfig(n=SAMPLES, seed=0, all_classes=classes > 0, batch_size=SAMPLES)
        labels = cfg.labels(classes)
        images, _ = draw(prior, stage1, cfg, None if labels is None else labels.to(device))
        frames.append(Frame(ckpt.step_of(folder),
                            {"samples": png_bytes(samples_grid(images, SAMPLES))}))
    return frames
