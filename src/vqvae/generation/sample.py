"""New images from a prior: prior -> code grids -> stage-1 decoder -> images, and their files
(a PNG grid and the codes).

Sampling follows taming-transformers' split: the prior draws codes and knows nothing about
pixels; the stage-1 model it was trained on (its fingerprint checked) decodes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from ..config import SampleConfig
from ..models.autoencoder import VQVAE
from ..models.prior import Prior
from ..store import checkpoint as ckpt
from .codes import Codes, check_stage1, load_codes, save_codes
from .grids import decode_codes, samples_grid, save_png


class Samples(NamedTuple):
    images: torch.Tensor  # (n, C, H, W) uint8
    codes: Codes  # split "samples": the (n, h, w) code ids (and labels), with their stage 1


def draw(prior: Prior, stage1: VQVAE, cfg: SampleConfig,
         labels: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.n`` new images: code grids drawn by ``prior`` (seeded by ``cfg.seed``; ``labels``,
    default ``cfg``'s, for a conditional prior), decoded by ``stage1``. Returns uint8 images
    (n, C, H, W) and the codes (n, h, w)."""
    codes = prior.generate(cfg, labels)
    return decode_codes(stage1, codes), codes


def save_samples(samples: Samples, folder: str | Path) -> tuple[Path, Path]:
    """``folder/samples.png`` (a grid) and ``folder/samples.safetensors`` (the codes)."""
    folder = Path(folder)
    return (save_png(samples_grid(samples.images), folder / "samples.png"),
            save_codes(samples.codes, folder / "samples.safetensors"))


def load_samples(folder: str | Path, device: torch.device | str = "cpu") -> Samples:
    """What :func:`save_samples` wrote to ``folder``: the codes, decoded again by the stage-1
    checkpoint that made them (its fingerprint checked), so the images are the saved ones."""
    codes = load_codes(Path(folder) / "samples.safetensors")
    check_stage1(codes.stage1_sha256, codes.stage1, codes.stage1)
    model = ckpt.load_autoencoder(codes.stage1, device)
    return Samples(decode_codes(model, codes.split("samples").codes), codes)
