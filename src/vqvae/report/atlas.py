"""The codebook atlas: what each code means, seen two ways, with its usage and its neighbours.

For every code: the mean of the held-out image patches encoded to it (the receptive patch of a
grid cell, image size / grid size pixels) and what the decoder draws for a grid of that one code;
its held-out usage, where in the grid it is used, and its nearest codes by codebook distance.
Tiles go into one sprite-sheet PNG per page of codes, so 16,384 codes stay a few megabytes.
"""

from __future__ import annotations

import io
import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

from ..data.images import to_float, to_uint8
from ..models.autoencoder import VQVAE

NEIGHBOURS = 8  # nearest codes listed per code
DRAWN_GRID = 8  # the decoder draws at most an 8 x 8 grid of one code (a texture; 1/4 of 16 x 16)
PER_PAGE = 1024  # codes per sprite sheet
ATLAS_BYTES = 12_000_000  # raw tile pixels over all pages: 16 MB in base64 before PNG shrinks it


class Atlas(NamedTuple):
    counts: torch.Tensor  # (K,) held-out assignments per code
    order: torch.Tensor  # (K,) code ids, most used first (ties by id)
    patches: torch.Tensor  # (K, C, T, T) uint8: mean held-out patch per code (dead: grey)
    drawn: torch.Tensor  # (K, C, T, T) uint8: the decoder's image of a grid of one code
    neighbours: torch.Tensor  # (K, NEIGHBOURS) nearest other codes, nearest first
    distances: torch.Tensor  # (K, NEIGHBOURS) their codebook distances
    grids: torch.Tensor  # (N, h, w) the held-out code grids
    entropy: torch.Tensor  # (h, w) bits: entropy of the code used at each grid position
    patch: int  # pixels per grid cell (image size / grid size)


def tile_side(codes: int, channels: int, image_size: int) -> int:
    """Pixels per tile half: up to 32 (or the image size, at least 8), smaller for large code
    sets so that all tiles together stay within :data:`ATLAS_BYTES`."""
    budget = int(math.sqrt(ATLAS_BYTES / (2 * codes * channels)))
    return max(8, min(32, max(image_size, 8), budget))


def columns(codes: int) -> int:
    """Tiles per row: 16 for up to 512 codes (a compact square-ish block), else 32."""
    return 16 if codes <= 512 else 32


def _fit(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (B, C, s, s) -> (B, C, side, side): enlarged by nearest, shrunk by area."""
    if images.shape[-1] == side:
        return images
    mode = "nearest" if images.shape[-1] < side else "area"
    return F.interpolate(images.float(), size=(side, side), mode=mode).round().to(torch.uint8)


def codebook(model: VQVAE) -> torch.Tensor:
    """The codes (K, d) where the quantizer compares them: its lookup space (vq, ema), or the
    decoder's latent space for an implicit codebook (fsq)."""
    q = model.quantizer
    if hasattr(q, "codebook_vectors"):
        return q.codebook_vectors().detach().float()
    device = next(model.parameters()).device
    ids = torch.arange(model.cfg.codebook_size, device=device).view(1, 1, -1)
    return q.indices_to_codes(ids).flatten(2)[0].t().float()  # (1, D, 1, K) -> (K, D)


def nearest_codes(vectors: torch.Tensor, k: int = NEIGHBOURS,
                  chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest other codes of each code (K, d) by Euclidean distance, in chunks of rows
    (16,384 codes never hold the whole K x K matrix): ids and distances (K, k)."""
    k = min(k, vectors.shape[0] - 1)
    ids, dists = [], []
    squared = vectors.pow(2).sum(1)
    for start in range(0, vectors.shape[0], chunk):
        rows = vectors[start:start + chunk]
        d2 = squared[start:start + chunk, None] - 2 * rows @ vectors.t() + squared[None]
        d2[torch.arange(rows.shape[0]), torch.arange(start, start + rows.shape[0])] = math.inf
        best = d2.topk(k, dim=1, largest=False)
        ids.append(best.indices)
        dists.append(best.values.clamp_min(0).sqrt())
    return torch.cat(ids).cpu(), torch.cat(dists).cpu()


def position_entropy(grids: torch.Tensor, codes: int) -> torch.Tensor:
    """(N, h, w) code grids -> (h, w): bits of the distribution of codes at each position."""
    n, h, w = grids.shape
    flat = grids.reshape(n, h * w).long()
    counts = torch.zeros(h * w, codes, dtype=torch.float64)
    counts.scatter_add_(1, flat.t(), torch.ones_like(flat.t(), dtype=torch.float64))
    p = counts / counts.sum(1, keepdim=True).clamp_min(1)
    bits = -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(1)
    return bits.view(h, w).float()


@torch.no_grad()
def build_atlas(model: VQVAE, images: torch.Tensor, batch_size: int = 256,
                progress: bool = False) -> Atlas:
    """The atlas of ``model`` (eval mode) from held-out uint8 images (N, C, H, W). The decoder
    draws each code as a grid of the model's size, at most :data:`DRAWN_GRID` cells a side
    (larger grids only repeat the texture, at a cost that grows with their area)."""
    model.eval()
    device = next(model.parameters()).device
    k, size = model.cfg.codebook_size, model.cfg.image_size
    c = images.shape[1]
    side = tile_side(k, c, size)
    grids = torch.cat([model.encode(to_float(images[s:s + batch_size].to(device))).indices.cpu()
                       for s in range(0, images.shape[0], batch_size)])  # (N, h, w)
    n, h, w = grids.shape
    patch = size // h
    # (N, C, H, W) -> (N*h*w, C*p*p): the patch each grid cell sees, in the grids' order
    cells = images[..., :h * patch, :w * patch].float().view(n, c, h, patch, w, patch)
    cells = cells.permute(0, 2, 4, 1, 3, 5).reshape(n * h * w, c * patch * patch)
    flat = grids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=k)
    sums = torch.zeros(k, c * patch * patch, dtype=torch.float64).index_add_(0, flat,
                                                                               cells.double())
    means = (sums / counts.clamp_min(1)[:, None]).float().view(k, c, patch, patch)
    means[counts == 0] = 128.0  # dead codes: flat grey
    drawn = []
    dh, dw = min(h, DRAWN_GRID), min(w, DRAWN_GRID)
    for s in tqdm(range(0, k, batch_size), desc="report: atlas", unit="batch",
                  disable=not progress, dynamic_ncols=True):
        ids = torch.arange(s, min(k, s + batch_size), device=device)
        one_code = ids.view(-1, 1, 1).expand(-1, dh, dw)  # (B, dh, dw): every cell one code
        drawn.append(_fit(to_uint8(model.decode_indices(one_code)).cpu(), side))
    neighbours, distances = nearest_codes(codebook(model))
    order = sorted(range(k), key=lambda i: (-int(counts[i]), i))
    return Atlas(counts, torch.tensor(order), _fit(means.round().to(torch.uint8), side),
                 torch.cat(drawn), neighbours, distances, grids, position_entropy(grids, k),
                 patch)


def sprite_pages(atlas: Atlas) -> list[bytes]:
    """One PNG per :data:`PER_PAGE` codes in usage order: each tile is the mean patch (left)
    beside the decoder's drawing (right), :func:`columns` tiles a row, no gutters."""
    k, c, side, _ = atlas.patches.shape
    cols = columns(k)
    pages = []
    for start in range(0, k, PER_PAGE):
        ids = atlas.order[start:start + PER_PAGE]
        tiles = torch.cat([atlas.patches[ids], atlas.drawn[ids]], 3)  # (n, C, T, 2T)
        rows = -(-len(ids) // cols)
        canvas = torch.zeros(rows * cols, c, side, 2 * side, dtype=torch.uint8)
        canvas[:len(ids)] = tiles
        # (rows*cols, C, T, 2T) -> (rows*T, cols*2T, C)
        sheet = canvas.view(rows, cols, c, side, 2 * side).permute(0, 3, 1, 4, 2)
        sheet = sheet.reshape(rows * side, cols * 2 * side, c).numpy()
        pages.append(png(sheet))
    return pages


def png(array: np.ndarray) -> bytes:
    """uint8 (H, W) or (H, W, C) with C of 1 or 3 -> PNG bytes."""
    array = np.ascontiguousarray(array[..., 0] if array.ndim == 3 and array.shape[2] == 1
                                 else array)
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", optimize=True)
    return out.getvalue()
