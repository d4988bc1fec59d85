"""The prior's conditional distributions over a batch of code grids, in the order its own decoding
reveals codes: one code per step (autoregressive, KV cache) or a few per step (MaskGIT).

The encoder feeds the true codes and the decoder the decoded ones through the same :func:`walk`,
with the same batch shapes, so the probabilities an entropy coder sees on both sides are bit-for-
bit the same on one machine (Chang et al., "MaskGIT", arXiv:2202.04200, for the parallel order).
"""

from __future__ import annotations

from typing import Callable

import torch

from ..models.maskgit import MaskGITPrior, masked_count
from ..models.prior import Prior

# reveal(positions (B, P), probabilities (B, P, K) float64) -> the codes at those positions (B, P)
Reveal = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Logits (..., K) -> probabilities in float64, as the coder models them."""
    return logits.double().softmax(-1)


@torch.inference_mode()
def walk(prior: Prior | MaskGITPrior, batch: int, labels: torch.Tensor | None, reveal: Reveal,
         steps: int = 12) -> torch.Tensor:
    """Reveal ``batch`` code grids in the prior's decoding order, asking ``reveal`` for the codes
    at each step's positions given their conditional probabilities -> grids (B, h*w) on the
    prior's device. ``labels`` (B,) condition a class-conditional prior (None: the null class);
    ``steps``: a maskgit prior's parallel iterations (its cosine schedule, the most confident
    codes first)."""
    was_training = prior.training
    prior.eval()
    try:
        if isinstance(prior, MaskGITPrior):
            return _walk_parallel(prior, batch, labels, reveal, steps)
        return _walk_causal(prior, batch, labels, reveal)
    finally:
        prior.train(was_training)


def _walk_causal(prior: Prior, batch: int, labels: torch.Tensor | None,
                 reveal: Reveal) -> torch.Tensor:
    """Row-major, one code per step, through the KV-cached forward pass sampling uses."""
    device = prior.head.weight.device
    n = prior.cfg.seq_len
    cache = prior.new_cache(batch, torch.float32)
    token = torch.full((batch, 1), prior.start_token, dtype=torch.long, device=device)
    codes = torch.empty(batch, n, dtype=torch.long, device=device)
    for t in range(n):
        logits = prior(token, labels, cache)[:, -1].float()  # (B, K)
        position = torch.full((batch, 1), t, dtype=torch.long, device=device)
        codes[:, t:t + 1] = reveal(position, probabilities(logits)[:, None]).to(device)
        token = codes[:, t:t + 1]
    return codes


def reveal_counts(n: int, steps: int) -> list[int]:
    """How many codes each of ``steps`` parallel iterations reveals in an n-code grid: the cosine
    schedule's, at least one per iteration while codes remain (as :meth:`MaskGITPrior.fill`)."""
    counts, masked = [], n
    for t in range(steps):
        left = min(masked_count(n, (t + 1) / steps), max(masked - 1, 0))
        counts.append(masked - left)
        masked = left
    return counts


def _walk_parallel(prior: MaskGITPrior, batch: int, labels: torch.Tensor | None,
                   reveal: Reveal, steps: int) -> torch.Tensor:
    """Each iteration predicts every masked code from the known ones and reveals the most
    confident (highest top probability; ties by position), a choice the decoder repeats."""
    device = prior.head.weight.device
    n = prior.cfg.seq_len
    codes = torch.full((batch, n), prior.mask_token, dtype=torch.long, device=device)
    masked = torch.ones(batch, n, dtype=torch.bool, device=device)
    for count in reveal_counts(n, steps):
        if count == 0:
            continue
        probs = probabilities(prior(codes, labels).float())  # (B, N, K)
        confidence = probs.amax(-1).masked_fill(~masked, -1.0)
        positions = confidence.argsort(dim=1, descending=True, stable=True)[:, :count]  # (B, P)
        chosen = probs.gather(1, positions[..., None].expand(-1, -1, probs.shape[-1]))
        codes.scatter_(1, positions, reveal(positions, chosen).to(device))
        masked.scatter_(1, positions, False)
    return codes
