"""A parallel-decoding prior: a bidirectional Transformer that fills masked codes of a grid, drawn
in a few iterations of confidence-based unmasking instead of one code per step.

Chang et al., "MaskGIT: Masked Generative Image Transformer" (2022), arXiv:2202.04200: cosine
masking schedule, iterative decoding keeping the most confident codes, Gumbel noise on the
confidences annealed to zero. ``generate`` has the autoregressive prior's signature and returns
code grids only (decoding them is :mod:`vqvae.generation.sample`'s job).
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..config import PriorConfig, SampleConfig
from .transformer import (GPTStack, GridTransformer, SeedStack, filter_logits, init_gpt_model,
                          init_keras, sample_next)


def masked_fraction(r: torch.Tensor, schedule: str = "cosine") -> torch.Tensor:
    """The fraction of codes masked at progress r in [0, 1] (1 -> 0): cos(pi r / 2) (the
    cosine schedule) or 1 - r (linear)."""
    if schedule == "linear":
        return (1.0 - r).clamp(0.0, 1.0)
    return torch.cos(math.pi / 2 * r).clamp_min(0.0)


def masked_count(n: int, r: float) -> int:
    """Codes still masked after progress r of decoding an n-code grid (n at 0, 0 at 1)."""
    return max(0, math.floor(n * math.cos(math.pi / 2 * r)))  # cos(pi/2) is -4e-8 in float32


class MaskGITPrior(GridTransformer):
    """p(masked codes | visible codes [, class]) over a (height, width) grid, bidirectional:
    GPT blocks, or the seed's post-norm blocks (``cfg.maskgit_blocks``; half a GPT block's step).

    Token ids 0..K-1 are codes and K is the mask token; position p is grid cell (p // w, p % w),
    with the autoregressive prior's row and column embeddings. A conditional prior adds a class
    embedding to every position; class ``num_classes`` is the null class (guidance).
    """

    VARIANT = "maskgit"
    card_title = "MaskGIT code prior"
    card_summary = ("A MaskGIT prior (a bidirectional Transformer that fills masked codes, "
                    "many at a step)")

    def __init__(self, cfg: PriorConfig):
        super().__init__(cfg, SeedStack if cfg.maskgit_blocks == "seed" else GPTStack)
        if cfg.maskgit_blocks == "seed":
            self.apply(init_keras)
        else:
            init_gpt_model(self, cfg.layers)

    @property
    def mask_token(self) -> int:
        return self.cfg.codebook_size

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens (B, N) with masks -> logits (B, N, K) for every position."""
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens, pos)
        if self.cls is not None:
            if labels is None:
                labels = torch.full((tokens.shape[0],), self.null_class, device=tokens.device)
            x = x + self.cls(labels)[:, None]
        elif labels is not None:
            raise ValueError("labels given to an unconditional prior")
        return self.head(self.stack(x, None))

    def random_mask(self, shape: tuple[int, int], device: torch.device,
                    generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, N) bool: per row ceil(f(r) N) random positions (at least 1), r ~ U(0, 1), f the
        config's ``mask_schedule`` (:func:`masked_fraction`)."""
        b, n = shape
        r = torch.rand(b, 1, generator=generator)
        count = torch.ceil(masked_fraction(r, self.cfg.mask_schedule) * n).clamp(1, n)  # (B, 1)
        ranks = torch.rand(b, n, generator=generator).argsort(1).argsort(1)  # a random order
        return (ranks < count).to(device)

    def loss_terms(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, noise: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """Cross-entropy (nats) of predicting the masked codes of (B, h, w) grids, masked at the
        config's ``mask_schedule`` -> (nats (B, h*w), weights (B, h*w): 1 where masked, 0
        elsewhere). ``noise``: token dropout on the visible codes (replaced by random ones)."""
        flat = codes.flatten(1).long()
        mask = self.random_mask(tuple(flat.shape), flat.device, generator)
        visible = flat
        if noise:
            swap = (torch.rand(flat.shape, generator=generator) < noise).to(flat.device)
            random = torch.randint(0, self.cfg.codebook_size, flat.shape, generator=generator)
            visible = torch.where(swap, random.to(flat.device), flat)
        logits = self(visible.masked_fill(mask, self.mask_token), labels)
        nats = F.cross_entropy(logits.transpose(1, 2).float(), flat, reduction="none")
        return nats * mask, mask.float()

    @torch.inference_mode()
    def generate(self, cfg: SampleConfig = SampleConfig(),
                 labels: int | torch.Tensor | None = None,
                 generator: torch.Generator | None = None, **overrides: Any) -> torch.Tensor:
        """Draw ``cfg.n`` code grids (n, h, w) in ``cfg.steps`` parallel iterations,
        ``cfg.batch_size`` at a time, the forward passes under ``cfg.precision`` (fp32 | bf16 |
        fp16 autocast); ``cfg.choice_temperature``: the Gumbel noise on the confidences (see
        :meth:`fill`); ``overrides`` replace fields of ``cfg``; labels and generator as for the
        autoregressive prior. ``no_cache`` and ``graph`` are the autoregressive prior's and do
        nothing here (each iteration is one full pass over the grid: not launch-bound)."""
        def draw(b: int, labels: torch.Tensor | None, cfg: SampleConfig,
                 generator: torch.Generator, dtype: torch.dtype | None) -> torch.Tensor:
            start = torch.full((b, self.cfg.seq_len), self.mask_token, dtype=torch.long,
                               device=self.head.weight.device)
            return self.fill(start, cfg, labels, generator)

        return self.draw_batches(cfg, overrides, labels, generator, draw)

    @torch.inference_mode()
    def fill(self, codes: torch.Tensor, cfg: SampleConfig = SampleConfig(),
             labels: torch.Tensor | None = None, generator: torch.Generator | None = None,
             **overrides: Any) -> torch.Tensor:
        """Fill the mask tokens of (B, N) codes in ``cfg.steps`` iterations; the other codes are
        kept as they are. Each iteration draws a code for every masked position, keeps the most
        confident ones (cosine schedule) and masks the rest again. A confidence is the drawn
        code's log-probability plus Gumbel noise scaled by ``cfg.choice_temperature`` at the
        first iteration, annealed linearly to 0 (0: most confident first; large: a random
        order). ``labels``: (B,) class ids; ``overrides`` replace fields of ``cfg``."""
        cfg = replace(cfg, **overrides) if overrides else cfg
        guidance, temperature, top_k, top_p = cfg.guidance, cfg.temperature, cfg.top_k, cfg.top_p
        steps, choice_temperature = cfg.steps, cfg.choice_temperature
        b, n = codes.shape
        device = codes.device
        masked = codes == self.mask_token
        todo = int(masked.sum(1).max())  # the most masked codes of any row
        guided = labels is not None and guidance != 1.0
        rows = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
        for t in range(steps):
            if not masked.any():
                break
            logits = self(torch.cat([codes, codes]) if guided else codes, rows).float()
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance * (cond - uncond)
            drawn = sample_next(logits.view(b * n, -1), temperature, top_k, top_p,
                                generator).view(b, n)
            logp = filter_logits(logits.view(b * n, -1) / max(temperature, 1e-6), top_k,
                                 top_p).log_softmax(-1)
            confidence = logp.gather(1, drawn.view(-1, 1)).view(b, n)
            noise = _gumbel((b, n), generator).to(device)
            confidence = confidence + choice_temperature * (1 - (t + 1) / steps) * noise
            confidence = confidence.masked_fill(~masked, float("inf"))  # kept codes stay
            drawn = torch.where(masked, drawn, codes)
            # Codes still masked after this iteration: the schedule's count, and at least one
            # fewer than now in every row that has masks, so `steps` iterations always finish.
            left = torch.full((b,), masked_count(todo, (t + 1) / steps), device=device)
            left = torch.minimum(left, (masked.sum(1) - 1).clamp_min(0))
            ranks = confidence.argsort(1).argsort(1)  # 0 = least confident
            masked = ranks < left[:, None]
            codes = drawn.masked_fill(masked, self.mask_token)
        return codes


def _gumbel(shape: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(shape, generator=generator, dtype=torch.float64).clamp(1e-20, 1 - 1e-12)
    return -torch.log(-torch.log(u)).float()
