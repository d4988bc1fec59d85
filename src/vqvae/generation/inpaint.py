"""Inpainting and outpainting with a parallel-decoding prior: keep an image's codes outside a mask,
redraw those under it (and a ring around it, so the seams blend), decode.

Chang et al., "MaskGIT" (2022), arXiv:2202.04200, section 4.3 (image editing); the prior draws code
ids only, the stage-1 model turns them into pixels.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..config import SampleConfig
from ..data.images import to_float, to_uint8
from ..errors import ConfigError
from ..models.autoencoder import VQVAE


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


def check_ring(ring: int) -> None:
    if ring < 0:
        raise ConfigError(f"--ring must be at least 0 (code cells around the mask), got {ring}")


@torch.inference_mode()
def inpaint_codes(prior: nn.Module, stage1: VQVAE, image: torch.Tensor, mask: torch.Tensor,
                  cfg: SampleConfig = SampleConfig(), ring: int = 1) -> Inpainted:
    """Redraw the part of ``image`` (uint8 (C, H, W) at the stage-1 model's size) under ``mask``
    ((H, W) bool, True = redraw) with a maskgit ``prior``, in ``cfg.steps`` iterations
    (``cfg.label``/``guidance``/``temperature``/``top_k`` as for sampling)."""
    device = prior.head.weight.device
    size, factor = stage1.cfg.image_size, 2 ** stage1.cfg.downsamples
    if image.shape[-2:] != (size, size) or mask.shape != (size, size):
        raise ConfigError(f"image and mask must be {size}x{size}, got {tuple(image.shape)} and "
                          f"{tuple(mask.shape)}")
    if not mask.any():
        raise ConfigError("the mask is empty (no pixel to redraw)")
    check_ring(ring)
    if cfg.guidance != 1.0 and cfg.label is None:
        raise ConfigError("--guidance needs --class")
    if cfg.label is not None and not 0 <= cfg.label < prior.cfg.num_classes:
        raise ConfigError(f"--class {cfg.label} needs a conditional prior with that class")
    stage1.eval()
    cells = code_mask(mask.bool(), factor, ring).to(device)  # (h, w)
    codes = stage1.encode(to_float(image[None].to(device))).indices  # (1, h, w)
    start = codes.flatten(1).masked_fill(cells.flatten()[None], prior.mask_token)
    labels = None if cfg.label is None else torch.tensor([cfg.label], device=device)
    filled = prior.fill(start, cfg, labels,
                        torch.Generator().manual_seed(cfg.seed)).view_as(codes)
    result = to_uint8(stage1.decode_indices(filled))[0].cpu()
    return Inpainted(result, cells.cpu(), filled[0].cpu())
