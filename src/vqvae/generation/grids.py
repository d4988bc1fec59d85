"""Pictures of what a stage-1 model learned, as PNG grids: the seed's reconstructions with and
without quantization (``sample_ae_1``, ``sample_ae_2``), latent interpolations (``sample_inter``),
and grids of generated images.

The grids follow the blog post the project started from: ``sample_ae_1`` pairs real images with
their reconstruction without quantization, ``sample_ae_2`` with it, ``sample_inter`` interpolates
continuous latents of image pairs, quantizes each step and decodes it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..data.files import FileSet
from ..data.images import ImageSet, to_float, to_uint8
from ..distributed import pick_device
from ..fileio import write_with
from ..models.autoencoder import VQVAE
from ..store.runs import beside
from .codes import load_trained

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
    """Write a PNG atomically and durably (:func:`vqvae.fileio.write_with`)."""
    return write_with(path, lambda f: image.save(f, format="PNG"))


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
        raise ValueError(f"a {n}x{n} reconstruction grid needs {pairs} images, got "
                         f"{images.shape[0]}")
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


def reconstruction_pictures(model: VQVAE, images: torch.Tensor, n: int, folder: Path,
                            suffix: str = "") -> dict[str, Path]:
    """``sample_ae_1{suffix}.png`` (without quantization) and ``sample_ae_2{suffix}.png`` (with)
    in ``folder``: n x n grids of real images and their reconstructions."""
    return {f"sample_ae_{1 + quantize}": save_png(
        reconstruction_grid(model, images, n, quantize=quantize),
        Path(folder) / f"sample_ae_{1 + quantize}{suffix}.png") for quantize in (False, True)}


def interpolation_picture(model: VQVAE, first: torch.Tensor, second: torch.Tensor, n: int,
                          folder: Path, suffix: str = "") -> Path:
    """``sample_inter{suffix}.png`` in ``folder``: one row of n steps per image pair."""
    return save_png(interpolation_grid(model, first, second, n),
                    Path(folder) / f"sample_inter{suffix}.png")


def write_reconstructions(run: str | Path, out: str | Path | None = None, *, n: int = 8,
                          split: str = "test", data: str | None = None, seed: int = 0,
                          device: str | torch.device = "auto") -> dict[str, Path]:
    """``vqvae reconstruct``: the seed's reconstruction grids of the stage-1 model at ``run`` (a
    run or checkpoint folder) on images of its data's ``split`` (or of ``data``) drawn by
    ``seed``, written to ``out`` (default: ``RUN/reconstruct``)."""
    model, splits = load_trained(run, data, pick_device(device))
    images = pick(getattr(splits, split), grid_pairs(n), seed)
    return reconstruction_pictures(model, images, n, Path(out or beside(run, "reconstruct")))


def write_interpolation(run: str | Path, out: str | Path | None = None, *, n: int = 8,
                        split: str = "test", data: str | None = None, seed: int = 0,
                        device: str | torch.device = "auto") -> Path:
    """``vqvae interpolate``: latent interpolations between n pairs of images of the stage-1
    model at ``run``, written to ``out`` (default: ``RUN/interpolate``)."""
    model, splits = load_trained(run, data, pick_device(device))
    images = pick(getattr(splits, split), 2 * n, seed)
    return interpolation_picture(model, images[:n], images[n:], n,
                                 Path(out or beside(run, "interpolate")))
