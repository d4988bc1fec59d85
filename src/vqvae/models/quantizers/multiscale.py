"""Multi-scale residual quantization: the encoder's map quantized coarse to fine with one shared
codebook, each scale's codes upsampled, refined by a small convolution and summed.

Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (2024), arXiv:2404.02905 (the tokenizer, whose training code was not released);
residual quantization: Lee et al., "Autoregressive Image Generation using Residual Quantization"
(2022), arXiv:2203.01941. The codebook, its k-means init and dead-code restarts are
:class:`~vqvae.models.quantizers.vq.VectorQuantizer`'s.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vq import QuantizerOutput, VectorQuantizer, flatten_latents, full_precision, nearest_code

REFINE_MIX = 0.5  # phi_k(x) = (1 - mix) x + mix conv(x): VAR's residual ratio


def split_scales(tokens: torch.Tensor, scales: Sequence[int]) -> list[torch.Tensor]:
    """Token sequences (B, L), L = sum(s*s), coarse to fine -> one (B, s, s) map per scale."""
    sizes = [s * s for s in scales]
    if tokens.shape[-1] != sum(sizes):
        raise ValueError(f"{tokens.shape[-1]} tokens, but scales {tuple(scales)} hold "
                         f"{sum(sizes)}")
    return [part.reshape(tokens.shape[0], s, s)
            for part, s in zip(tokens.split(sizes, dim=-1), scales)]


def join_scales(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """One (B, s, s) map per scale, coarse to fine -> token sequences (B, L), each row-major."""
    return torch.cat([m.flatten(1) for m in maps], 1)


class ScaleRefiner(nn.Module):
    """phi_k: a 3x3 convolution mixed into an upsampled scale's codes (B, D, H, W)."""

    def __init__(self, dim: int, mix: float = REFINE_MIX):
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)
        self.mix = mix

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.lerp(x, self.conv(x), self.mix)


class _StraightThrough(torch.autograd.Function):
    """(z, total) -> exactly ``total``, its gradient passed to ``z`` (the encoder) unchanged; the
    codebook and refiners learn from the quantizer's own loss, as VAR's do."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        return total.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class MultiScaleQuantizer(nn.Module):
    """Quantize the residual of a (B, D, H, W) map at each side in ``scales`` (the last = H = W):
    area-downsample it to s x s, look each vector up in one shared codebook, upsample the codes
    to H x W (bicubic), refine them by phi_k and subtract them from the residual; the quantized
    map is the sum over scales.

    ``indices`` are every scale's token map, concatenated coarse to fine, each row-major:
    (B, L), L = sum(s*s) (:func:`split_scales`, :func:`join_scales`). The loss, averaged over
    scales, is mse(partial sum, sg(z)) (codebook and refiners) + beta * mse(z, sg(partial sum))
    (commitment). ``kmeans_init`` seeds the codebook from the encoder's vectors on the first
    training batch; ``restart_after`` re-seeds codes unused at every scale from this batch's
    residuals.
    """

    def __init__(self, codebook_size: int, dim: int, scales: Sequence[int], beta: float = 0.25,
                 *, kmeans_init: bool = False, restart_after: int = 0):
        super().__init__()
        if not scales or list(scales) != sorted(set(scales)) or scales[0] < 1:
            raise ValueError(f"scales must rise from at least 1, got {tuple(scales)}")
        self.scales = tuple(int(s) for s in scales)
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.vq = VectorQuantizer(codebook_size, dim, beta, kmeans_init=kmeans_init,
                                  restart_after=restart_after)
        self.refine = nn.ModuleList(ScaleRefiner(dim) for _ in self.scales)

    @property
    def tokens(self) -> int:
        """L: the tokens of one image, all scales."""
        return sum(s * s for s in self.scales)

    @property
    def restarted(self) -> torch.Tensor | None:
        """Codes re-seeded since the trainer last read (and zeroed) it (None without restarts)."""
        return getattr(self.vq, "restarted", None)

    def expand(self, indices: torch.Tensor, scale: int, size: tuple[int, int]) -> torch.Tensor:
        """Scale ``scale``'s token map (B, s, s) -> its share of the quantized map (B, D, H, W):
        codes, upsampled to ``size``, refined by phi_scale."""
        codes = F.embedding(indices, self.vq.codebook).permute(0, 3, 1, 2)  # (B, D, s, s)
        if codes.shape[-2:] != size:
            codes = F.interpolate(codes, size=size, mode="bicubic", align_corners=False)
        return self.refine[scale](codes.contiguous())

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with full_precision(z):
            return self._forward(z.float())

    def _forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        if (h, w) != (self.scales[-1],) * 2:
            raise ValueError(f"a {h}x{w} map, but the finest scale is {self.scales[-1]}")
        target = z.detach()
        if self.training:
            self.vq._maybe_initialize(flatten_latents(target))
        codebook = self.vq.codebook.detach()
        rest, total = target, torch.zeros_like(target)
        maps, seen, codebook_loss, commitment_loss = [], [], 0.0, 0.0
        for k, s in enumerate(self.scales):
            part = rest if s == h else F.interpolate(rest, size=(s, s), mode="area")
            flat = flatten_latents(part)  # (B*s*s, D)
            ids = nearest_code(flat, codebook)
            maps.append(ids.view(b, s, s))
            seen.append((flat, ids))
            share = self.expand(maps[-1], k, (h, w))  # (B, D, H, W), with the codebook's grad
            total = total + share
            rest = rest - share.detach()
            codebook_loss = codebook_loss + F.mse_loss(total, target)
            commitment_loss = commitment_loss + F.mse_loss(z, total.detach())
        codebook_loss, commitment_loss = (codebook_loss / len(self.scales),
                                          commitment_loss / len(self.scales))
        if self.training:  # only unused codes change: the sum above stays what they decode to
            with torch.no_grad():
                self.vq._restart_dead(torch.cat([f for f, _ in seen]),
                                      torch.cat([i for _, i in seen]))
        quantized = _StraightThrough.apply(z, total)
        return QuantizerOutput(quantized, join_scales(maps),
                               codebook_loss + self.beta * commitment_loss, codebook_loss,
                               commitment_loss)

    def continuous(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> the map the sum of scales approximates: the encoder's, unchanged."""
        return z

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """Token sequences (B, L) -> the quantized maps (B, D, H, W); the exact inverse of the
        forward pass (the same shares summed in the same order)."""
        side = self.scales[-1]
        total = None
        for k, ids in enumerate(split_scales(indices.long(), self.scales)):
            share = self.expand(ids, k, (side, side))
            total = share if total is None else total + share  # 0 + x == x: as forward
        return total
