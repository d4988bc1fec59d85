"""Inpainting and outpainting with a parallel-decoding prior: keep an image's codes outside a mask,
redraw those under it (and a ring around it, so the seams blend), decode.

Chang et al., "MaskGIT" (2022), arXiv:2202.04200, section 4.3 (image editing); the prior draws code
ids only, the stage-1 model turns them into pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..distributed import pick_device
from ..errors import ConfigError
from ..store import checkpoint as ckpt
from ..store import runs
from .codes import load_stage1
from ..config import SampleConfig
from ..data.sources import read_image, to_float, to_uint8
from .grids import save_png, tile


class Inpainted(NamedTuple):
    image: torch.Tensor  # (C, H, W) uint8: the result
    masked_codes: torch.Tensor  # (h, w) bool: the code cells that were redrawn
    codes: torch.Tensor  # (h, w) code ids of the result


def code_mask(pixels: torch.Tensor, factor: int, ring: int = 1) -> torch.Tensor:
    """A pixel mask (H, W) bool -> the code cells (H/f, W/f) to redraw: every cell with a masked
    pixel, grown by ``ring`` cells in each direction."""
    h, w = pixels.shape
    cells = F.max_pool2d(pixels.float()[None, None], factor)  # (1, 1, H/f, W/f): any masked pixel
    if ring:
        cells = F.max_pool2d(cells, 2 * ring + 1, stride=1, padding=ring)
    return cells[0, 0] > 0


@torch.inference_mode()
def inpaint(prior_run: str | Path, image: torch.Tensor, mask: torch.Tensor,
            cfg: SampleConfig = SampleConfig(), ring: int = 1,
            device: torch.device | str = "cpu") -> Inpainted:
    """Redraw the part of ``image`` (uint8 (C, H, W) at the stage-1 model's size) under ``mask``
    ((H, W) bool, True = redraw) with the maskgit prior of ``prior_run``, in ``cfg.steps``
    iterations (``cfg.label``/``guidance``/``temperature``/``top_k`` as for sampling)."""
    run_cfg = runs.read_run_config(prior_run, ckpt.PRIOR_KIND)
    _check_parallel(prior_run)
    device = pick_device(device)
    prior = ckpt.load_prior(prior_run, device)
    stage1 = load_stage1(run_cfg, device)
    size, factor = stage1.cfg.image_size, 2 ** stage1.cfg.downsamples
    if image.shape[-2:] != (size, size) or mask.shape != (size, size):
        raise ConfigError(f"image and mask must be {size}x{size}, got {tuple(image.shape)} and "
                          f"{tuple(mask.shape)}")
    if cfg.label is not None and not 0 <= cfg.label < prior.cfg.num_classes:
        raise ConfigError(f"--class {cfg.label} needs a conditional prior with that class")
    cells = code_mask(mask.bool(), factor, ring).to(device)  # (h, w)
    codes = stage1.encode(to_float(image[None].to(device))).indices  # (1, h, w)
    start = codes.flatten(1).masked_fill(cells.flatten()[None], prior.mask_token)
    labels = None if cfg.label is None else torch.tensor([cfg.label], device=device)
    filled = prior.fill(start, labels, cfg.guidance, cfg.temperature, cfg.top_k, cfg.top_p,
                        torch.Generator().manual_seed(cfg.seed), cfg.steps,
                        cfg.choice_temperature).view_as(codes)
    result = to_uint8(stage1.decode_indices(filled))[0].cpu()
    return Inpainted(result, cells.cpu(), filled[0].cpu())


def _check_parallel(prior_run: str | Path) -> None:
    if ckpt.load_model_config(ckpt.resolve(prior_run), ckpt.PRIOR_KIND).variant != "maskgit":
        raise ConfigError(f"{prior_run}: inpainting needs a parallel-decoding prior "
                          f"(train-prior --variant maskgit)")


def inpaint_files(prior_run: str | Path, image_path: str | Path, mask_path: str | Path,
                  cfg: SampleConfig = SampleConfig(), out: str | Path | None = None,
                  ring: int = 1, device: torch.device | str = "cpu") -> tuple[Path, Path]:
    """:func:`inpaint` on an image file and a mask file (white = redraw), both resized to the
    model's size; writes the result (default: ``IMAGE.inpainted.png`` beside the input) and a
    comparison strip (original, mask, result). Returns both paths."""
    _check_parallel(prior_run)
    stage1_cfg = ckpt.load_model_config(
        ckpt.resolve(runs.read_run_config(prior_run, ckpt.PRIOR_KIND).stage1), ckpt.VQVAE_KIND)
    size, channels = stage1_cfg.image_size, stage1_cfg.in_channels
    image = read_image(image_path, size, channels)[0]
    mask = read_image(mask_path, size, 1)[0, 0] > 127
    done = inpaint(prior_run, image, mask, cfg, ring, device)
    out = Path(out) if out else Path(image_path).with_suffix(".inpainted.png")
    strip = torch.stack([image, torch.where(mask, 255, image).to(torch.uint8), done.image])
    return (save_png(tile(done.image[None], 1, min_tile=1, gap=0), out),
            save_png(tile(strip, 3), out.with_name(out.stem + ".compare.png")))
