"""Pictures of what the models learned: reconstruction and interpolation grids, and new images
(prior -> codes -> stage-1 decoder -> images), written as PNGs.

The stage-1 grids follow the blog post the project started from: ``sample_ae_1`` pairs real
images with their reconstruction without quantization, ``sample_ae_2`` with it, ``sample_inter``
interpolates continuous latents of image pairs, quantizes each step and decodes it. Sampling
follows taming-transformers' split: the prior draws codes and knows nothing about pixels.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from ..errors import ConfigError
from ..store import checkpoint as ckpt
from ..store import runs
from ..models.autoencoder import VQVAE
from .codes import Codes, CodeSplit, check_stage1, load_codes, load_stage1, save_codes
from ..config import SampleConfig
from ..data.files import FileSet
from ..data.images import ImageSet, to_float, to_uint8
from ..models.prior import Prior

MIN_TILE = 48  # small images are enlarged (nearest) so a grid is readable


def tile(images: torch.Tensor, ncol: int, min_tile: int = MIN_TILE, gap: int = 2) -> Image.Image:
    """uint8 (N, C, H, W) -> one PIL image, ``ncol`` tiles per row with ``gap``-pixel gutters;
    small tiles are enlarged by an integer factor (nearest) to at least ``min_tile`` pixels."""
    n, c, h, w = images.shape
    scale = max(1, -(-min_tile // h))
    if scale > 1:
        images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
        h, w = h * scale, w * scale
    nrow = -(-n // ncol)
    canvas = torch.full((c, nrow * (h + gap) - gap, ncol * (w + gap) - gap), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = r * (h + gap), col * (w + gap)
        canvas[:, top:top + h, left:left + w] = images[i]
    array = canvas.permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array[..., 0] if c == 1 else array))


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Write a PNG atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def grid_pairs(n: int) -> int:
    """Images an n x n reconstruction grid shows: ceil(n / 2) rows' worth of real/rec pairs."""
    return -(-n // 2) * n


def pick(images: torch.Tensor | ImageSet | FileSet, count: int, seed: int = 0) -> torch.Tensor:
    """``count`` of ``images`` (a tensor (N, ...) or an image set) in an order drawn by
    ``seed``; a smaller set repeats."""
    index = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    index = index[:count].repeat(-(-count // max(1, min(count, index.numel()))))[:count]
    return images[index] if isinstance(images, torch.Tensor) else images.take(index)


def _device(model: VQVAE) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def reconstruction_grid(model: VQVAE, images: torch.Tensor, n: int = 8,
                        quantize: bool = True) -> Image.Image:
    """The seed's n x n grid: even columns real images, odd columns their reconstruction.

    ``images`` is uint8 (N, C, H, W) with at least ceil(n / 2) * n images; ``quantize=False``
    decodes the continuous latents (``sample_ae_1``), ``True`` the code vectors (``sample_ae_2``).
    """
    pairs = grid_pairs(n)
    if images.shape[0] < pairs:
        raise ValueError(f"a {n}x{n} reconstruction grid needs {pairs} images, got {images.shape[0]}")
    was_training = model.training
    model.eval()
    real = images[:pairs]
    rec = to_uint8(model.reconstruct(to_float(real.to(_device(model))), quantize=quantize)).cpu()
    model.train(was_training)
    cells = torch.stack([real, rec], 1).flatten(0, 1)  # (pairs*2, C, H, W): real, rec, real, ...
    rows = cells.view(n, -1, *cells.shape[1:])[:, :n]  # an odd n ends a row on a real image
    return tile(rows.flatten(0, 1), n)


@torch.no_grad()
def interpolation_grid(model: VQVAE, first: torch.Tensor, second: torch.Tensor,
                       n: int = 8) -> Image.Image:
    """One row per pair: decode(quantize((1 - a) z1 + a z2)) for a = j / (n - 1)."""
    was_training = model.training
    model.eval()
    device = _device(model)
    z1 = model.encode_latents(to_float(first.to(device)))  # (P, D, h, w)
    z2 = model.encode_latents(to_float(second.to(device)))
    alphas = torch.linspace(0, 1, n, device=device).view(1, n, 1, 1, 1)
    z = (1 - alphas) * z1.unsqueeze(1) + alphas * z2.unsqueeze(1)  # (P, n, D, h, w)
    frames = model.decode(model.quantizer(z.flatten(0, 1)).quantized)
    model.train(was_training)
    return tile(to_uint8(frames).cpu(), n)


@torch.no_grad()
def decode_codes(model: VQVAE, codes: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Code grids (N, h, w) -> uint8 images (N, C, H, W), through the stage-1 decoder."""
    was_training = model.training
    model.eval()
    device = _device(model)
    images = [to_uint8(model.decode_indices(codes[s:s + batch_size].to(device).long())).cpu()
              for s in range(0, codes.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(images)


def samples_grid(images: torch.Tensor, ncol: int | None = None) -> Image.Image:
    """Generated images (N, C, H, W) as a grid, ``ceil(sqrt(N))`` per row by default."""
    n = images.shape[0]
    return tile(images, ncol or max(1, int(np.ceil(np.sqrt(n)))))


# --- new images from a prior --------------------------------------------------------------------


class Samples(NamedTuple):
    images: torch.Tensor  # (n, C, H, W) uint8
    codes: Codes  # split "samples": the (n, h, w) code ids (and labels), with their stage 1


def draw(prior: Prior, stage1: VQVAE, cfg: SampleConfig,
         labels: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.n`` new images: code grids drawn by ``prior`` (seeded by ``cfg.seed``; ``labels``,
    default :func:`sample_labels` of ``cfg``, for a conditional prior), decoded by ``stage1``.
    Returns uint8 images (n, C, H, W) and the codes (n, h, w)."""
    if labels is None:
        labels = sample_labels(cfg, prior.cfg.num_classes)
    codes = prior.generate(cfg.n, labels=labels, guidance=cfg.guidance,
                           temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           generator=torch.Generator().manual_seed(cfg.seed),
                           batch_size=cfg.batch_size, use_cache=not cfg.no_cache,
                           steps=cfg.steps, precision=cfg.precision, graph=cfg.graph,
                           choice_temperature=cfg.choice_temperature)
    return decode_codes(stage1, codes), codes


def sample_labels(cfg: SampleConfig, classes: int) -> torch.Tensor | None:
    """The class of each of the ``cfg.n`` images (n,): ``cfg.label`` for all of them, or with
    ``cfg.all_classes`` 0, 1, ..., classes - 1, 0, 1, ...; None for unconditional draws.
    ``classes`` is the prior's number of classes (0: unconditional)."""
    flag = "--class" if cfg.label is not None else "--all-classes" if cfg.all_classes else None
    if flag and not classes:
        raise ConfigError(f"{flag} needs a class-conditional prior (train-prior --conditional)")
    if cfg.label is not None and cfg.label >= classes:
        raise ConfigError(f"--class {cfg.label} is out of range: this prior knows classes "
                          f"0..{classes - 1}")
    if cfg.label is not None:
        return torch.full((cfg.n,), cfg.label, dtype=torch.long)
    return torch.arange(cfg.n) % classes if cfg.all_classes else None


def sample_images(prior_run: str | Path, cfg: SampleConfig = SampleConfig(),
                  device: torch.device | str = "cpu") -> Samples:
    """New images from the prior of ``prior_run`` (a prior run folder or one of its checkpoints),
    decoded by the stage-1 checkpoint it was trained on (its fingerprint checked)."""
    run_cfg = runs.read_run_config(prior_run, ckpt.PRIOR_KIND)
    prior = ckpt.load_prior(prior_run, device)
    classes = prior.cfg.num_classes
    labels = sample_labels(cfg, classes)
    images, codes = draw(prior, load_stage1(run_cfg, device, cfg.decoder), cfg, labels)
    names = tuple(str(i) for i in range(classes)) if classes else None
    return Samples(images, Codes({"samples": CodeSplit(codes.cpu(), labels)},
                                 prior.cfg.codebook_size, run_cfg.stage1, run_cfg.stage1_sha256,
                                 f"prior {prior_run}", names))


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
