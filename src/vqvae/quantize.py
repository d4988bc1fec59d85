"""Vector quantizers: snap each latent vector to its nearest codebook entry.

van den Oord et al., "Neural Discrete Representation Learning" (2017), arXiv:1711.00937.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# Rows of the (N, K) distance matrix computed at once: bounds memory to ~CHUNK_ELEMENTS floats.
CHUNK_ELEMENTS = 1 << 22


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, D, H, W), straight-through: forward = codes, backward = identity
    indices: torch.Tensor  # (B, H, W) int64
    loss: torch.Tensor  # scalar: codebook_loss + beta * commitment_loss
    codebook_loss: torch.Tensor  # scalar: mse(sg(z), e), moves codes towards encoder outputs
    commitment_loss: torch.Tensor  # scalar: mse(z, sg(e)), keeps encoder outputs near codes


@torch.no_grad()
def nearest_code(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every row of ``flat`` (N, D) -> (N,).

    ``|z|^2`` is the same for every code, so argmin(|e|^2 - 2 z.e) suffices; one ``addmm`` per
    chunk of rows keeps the full (N, K) distance matrix from ever being held.
    """
    e_sq = codebook.pow(2).sum(1)  # (K,)
    rows = max(1, CHUNK_ELEMENTS // codebook.shape[0])
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        dist = torch.addmm(e_sq, chunk, codebook.t(), alpha=-2.0)  # (n, K)
        out[start:start + rows] = dist.argmin(1)
    return out


class VectorQuantizer(nn.Module):
    """The seed's quantizer: a learned codebook, codebook loss + beta * commitment loss."""

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25):
        super().__init__()
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.codebook = nn.Parameter(torch.empty(codebook_size, dim).uniform_(-0.05, 0.05))

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, d, h, w = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)  # (B, D, H, W) -> (B*H*W, D)
        indices = nearest_code(flat.detach(), self.codebook.detach())
        codes = self.indices_to_codes(indices.view(b, h, w))  # (B, D, H, W)
        codebook_loss = F.mse_loss(codes, z.detach())
        commitment_loss = F.mse_loss(z, codes.detach())
        # Straight-through estimator: forward value is exactly ``codes`` (z - sg(z) == 0), the
        # gradient flows to z unchanged; the seed's z + sg(e - z) is the same up to rounding.
        quantized = codes.detach() + (z - z.detach())
        return QuantizerOutput(quantized, indices.view(b, h, w),
                               codebook_loss + self.beta * commitment_loss,
                               codebook_loss, commitment_loss)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) code ids -> (B, D, H, W) code vectors; the exact inverse of the lookup."""
        return F.embedding(indices, self.codebook).permute(0, 3, 1, 2).contiguous()


QUANTIZERS = {"vq": VectorQuantizer}
