"""Finite scalar quantization: an implicit codebook of rounded, bounded channels, same API as vq.

Mentzer et al., "Finite Scalar Quantization: VQ-VAE Made Simple" (2023), arXiv:2309.15505.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .vq import LookupSpace, QuantizerOutput, flatten_latents, full_precision, unflatten_latents


class FiniteScalarQuantizer(nn.Module):
    """Bound each of ``len(levels)`` channels with tanh and round it to ``levels[c]`` values.

    The implicit codebook is the grid of all combinations (``prod(levels)`` codes); an index is
    the mixed-radix number of the per-channel digits. Latents of another width are projected to
    ``len(levels)`` channels and back. No auxiliary loss: ``loss`` is zero, ``commitment_loss``
    reports the rounding error.
    """

    def __init__(self, levels: Sequence[int], dim: int):
        super().__init__()
        if len(levels) == 0 or min(levels) < 2:
            raise ValueError(f"fsq levels must be integers >= 2, got {tuple(levels)}")
        self.levels, self.dim = tuple(int(n) for n in levels), dim
        self.codebook_size = math.prod(self.levels)
        self.space = LookupSpace(dim, None if dim == len(levels) else len(levels))
        lv = torch.tensor(self.levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor((1,) + self.levels[:-1]), 0)
        # Derived constants, not state: rebuilt from ``levels``, never saved.
        self.register_buffer("_levels", lv, persistent=False)
        self.register_buffer("_basis", basis, persistent=False)

    def _bounded(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) -> values in (-L/2, L/2) per channel; the shrink keeps tanh's +-1 inside."""
        return torch.tanh(x) * (self._levels / 2 * (1 - 1e-3))

    def _grid(self, digits: torch.Tensor) -> torch.Tensor:
        """Digits 0..L-1 -> code values (digit - (L-1)/2) / (L/2), symmetric in (-1, 1)."""
        return (digits - (self._levels - 1) / 2) / (self._levels / 2)

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with full_precision(z):  # rounding in fp32 under mixed precision too
            return self._forward(z)

    def _forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        y = self._bounded(self.space.inward(flatten_latents(z).float()))  # (N, C)
        # Odd L: round to integers; even L: to half-integers. Digits are exact small integers.
        offset = (1 - self._levels % 2) / 2
        digits = (torch.round(y - offset) + offset + (self._levels - 1) / 2).detach()
        codes = self._grid(digits)
        scaled = y / (self._levels / 2)
        indices = (digits.long() * self._basis).sum(1)  # (N,)
        quantized = self.space.outward(codes + (scaled - scaled.detach()))  # straight-through
        zero = z.new_zeros(())
        return QuantizerOutput(unflatten_latents(quantized, (b, h, w), z), indices.view(b, h, w),
                               zero, zero, F.mse_loss(scaled.detach(), codes))

    def continuous(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> the bounded, scaled latents before rounding, projected back."""
        b, _, h, w = z.shape
        y = self._bounded(self.space.inward(flatten_latents(z)).float()) / (self._levels / 2)
        return unflatten_latents(self.space.outward(y), (b, h, w), z)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) code ids -> (B, D, H, W) code vectors; the exact inverse of the lookup."""
        flat = indices.reshape(-1, 1)
        digits = (flat // self._basis) % self._basis.new_tensor(self.levels)  # (N, C)
        codes = self._grid(digits.float())
        return unflatten_latents(self.space.outward(codes), indices.shape)

