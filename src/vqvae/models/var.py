"""The next-scale prior: a Transformer over a multiscale tokenizer's token maps, concatenated
coarse to fine, with block-causal attention; sampling draws every code of a scale in one pass.

Tian et al., "Visual Autoregressive Modeling: Scalable Image Generation via Next-Scale
Prediction" (2024), arXiv:2404.02905. ``generate`` returns token sequences (B, L) and knows
nothing about pixels (decoding them is :mod:`vqvae.generation.sample`'s job).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PriorConfig, SampleConfig
from .quantizers.multiscale import join_scales, split_scales
from .transformer import (GPTStack, GridTransformer, KVCache, draw_guided, guided_rows,
                          init_gpt_model)


def token_scales(scales: Sequence[int]) -> torch.Tensor:
    """(L,) long: the scale (0 = coarsest) of each token of a concatenated sequence."""
    return torch.repeat_interleave(torch.arange(len(scales)),
                                   torch.tensor([s * s for s in scales]))


def block_causal_mask(scales: Sequence[int]) -> torch.Tensor:
    """(L, L) bool, True = visible: token i sees token j when j's scale is not finer than i's
    (every scale sees itself and all coarser ones)."""
    level = token_scales(scales)
    return level[None, :] <= level[:, None]


def token_cells(scales: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) rows and (L,) columns of each token's cell centre in the finest grid: the 2-D
    position a token shares with the finest cells it covers."""
    side, rows, cols = scales[-1], [], []
    for s in scales:
        centre = ((torch.arange(s) + 0.5) * side / s).long()  # (s,) in [0, side)
        rows.append(centre.repeat_interleave(s))
        cols.append(centre.repeat(s))
    return torch.cat(rows), torch.cat(cols)


class VARPrior(GridTransformer):
    """p(scale k's codes | coarser scales [, class]) over a multiscale tokenizer's token maps.

    The input at scale 0 is the start token (id K, with the class embedding of a conditional
    prior; class ``num_classes`` is the null class); at scale k, the running sum of the coarser
    maps' code embeddings (each upsampled bilinearly to the finest side), area-downsampled to
    s_k x s_k, as VAR feeds its Transformer. Every token adds a scale embedding and the row and
    column embeddings of its cell centre in the finest grid. GPT blocks, block-causal attention
    (:func:`block_causal_mask`); the log-likelihood of a sequence is exact (teacher forcing).
    """

    VARIANT = "var"
    card_title = "Next-scale (VAR) code prior"
    card_summary = ("A next-scale (VAR) prior (a block-causal Transformer that draws every code "
                    "of a scale in one pass)")

    def __init__(self, cfg: PriorConfig):
        super().__init__(cfg, GPTStack)
        self.level = nn.Embedding(len(cfg.scales), cfg.d_model)
        init_gpt_model(self, cfg.layers)
        rows, cols = token_cells(cfg.scales)
        # Derived from the scales, not state: rebuilt, never saved.
        self.register_buffer("_rows", rows, persistent=False)
        self.register_buffer("_cols", cols, persistent=False)
        self.register_buffer("_levels", token_scales(cfg.scales), persistent=False)
        self.register_buffer("_mask", block_causal_mask(cfg.scales), persistent=False)

    @property
    def start_token(self) -> int:
        return self.cfg.codebook_size

    @property
    def code_shape(self) -> tuple[int, ...]:
        """The codes of one image: all scales' token maps in one sequence (L,)."""
        return (self.cfg.seq_len,)

    # --- inputs ----------------------------------------------------------------------------

    def _start(self, rows: int, labels: torch.Tensor | None) -> torch.Tensor:
        """Scale 0's input (rows, 1, d): the start token, plus the class of a conditional prior
        (the null class without labels)."""
        device = self.head.weight.device
        x = self.tok(torch.full((rows, 1), self.start_token, dtype=torch.long, device=device))
        if self.cls is not None:
            if labels is None:
                labels = torch.full((rows,), self.null_class, device=device)
            x = x + self.cls(labels)[:, None]
        elif labels is not None:
            raise ValueError("labels given to an unconditional prior")
        return x

    def _accumulate(self, total: torch.Tensor | None, codes: torch.Tensor) -> torch.Tensor:
        """Add a scale's code map (B, s, s) to the running sum (B, d, H, W) of upsampled code
        embeddings (None: start one)."""
        side = self.cfg.scales[-1]
        e = self.tok(codes).permute(0, 3, 1, 2)  # (B, d, s, s)
        if e.shape[-1] != side:
            e = F.interpolate(e, size=(side, side), mode="bilinear", align_corners=False)
        return e if total is None else total + e

    def _scale_input(self, total: torch.Tensor, k: int) -> torch.Tensor:
        """Scale k's input (B, s_k*s_k, d): the running sum area-downsampled to s_k x s_k."""
        s = self.cfg.scales[k]
        x = total if s == total.shape[-1] else F.interpolate(total, size=(s, s), mode="area")
        return x.flatten(2).transpose(1, 2)

    def inputs(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: token sequences (B, L) -> every scale's input (B, L, d) (the finest
        scale's codes are predicted, never fed)."""
        maps = split_scales(codes.long(), self.cfg.scales)
        parts, total = [self._start(codes.shape[0], labels)], None
        for k in range(1, len(maps)):
            total = self._accumulate(total, maps[k - 1])
            parts.append(self._scale_input(total, k))
        return torch.cat(parts, 1)

    def _run(self, x: torch.Tensor, start: int, cache: KVCache | None) -> torch.Tensor:
        """Inputs (B, T, d) at positions [start, start + T) -> logits (B, T, K); the positions
        before ``start`` are in ``cache`` (advanced by T)."""
        end = start + x.shape[1]
        x = (x + self.row(self._rows[start:end]) + self.col(self._cols[start:end])
             + self.level(self._levels[start:end]))
        x = self.stack(x, cache, self._mask[start:end, :end])
        if cache is not None:
            cache.length = end
        return self.head(x)

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Token sequences (B, L) -> logits (B, L, K) of every token given the coarser scales."""
        return self._run(self.inputs(codes, labels), 0, None)

    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood in nats of every token of (B, L) sequences -> (B, L)."""
        return F.cross_entropy(self(codes, labels).transpose(1, 2).float(), codes.long(),
                               reduction="none")

    def loss_terms(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, noise: float = 0.0
                   ) -> tuple[torch.Tensor, None]:
        """Nats (B, L) of every token (weights None: all count). ``noise``: token dropout, each
        input code replaced by a random one with this probability (targets stay the true
        codes)."""
        codes = codes.long()
        fed = codes
        if noise:
            swap = (torch.rand(codes.shape, generator=generator) < noise).to(codes.device)
            random = torch.randint(0, self.cfg.codebook_size, codes.shape, generator=generator)
            fed = torch.where(swap, random.to(codes.device), codes)
        logits = self._run(self.inputs(fed, labels), 0, None)
        return F.cross_entropy(logits.transpose(1, 2).float(), codes, reduction="none"), None

    def new_cache(self, batch: int, dtype: torch.dtype | None = None) -> KVCache:
        ref = self.head.weight
        return KVCache(self.cfg.layers, batch, self.cfg.heads, self.cfg.seq_len,
                       self.cfg.d_model // self.cfg.heads, ref.device, dtype or ref.dtype)

    # --- sampling --------------------------------------------------------------------------

    @torch.inference_mode()
    def generate(self, cfg: SampleConfig = SampleConfig(),
                 labels: int | torch.Tensor | None = None,
                 generator: torch.Generator | None = None, **overrides: Any) -> torch.Tensor:
        """Draw ``cfg.n`` token sequences (n, L), ``cfg.batch_size`` at a time, one pass per
        scale (``len(scales)`` passes), every code of a scale drawn at once with ``temperature``,
        ``top_k``, ``top_p``; ``labels`` and ``guidance`` as for the autoregressive prior
        (classifier-free guidance, both passes batched). Keys and values of the coarser scales
        are cached; ``no_cache`` recomputes them at every scale and draws the same codes from
        the same generator. ``steps``, ``choice_temperature`` and ``graph`` are the other
        priors' and do nothing here."""
        def draw(b: int, labels: torch.Tensor | None, cfg: SampleConfig,
                 generator: torch.Generator, dtype: torch.dtype | None) -> torch.Tensor:
            return self._generate_batch(b, labels, cfg.guidance, cfg.temperature, cfg.top_k,
                                        cfg.top_p, generator, not cfg.no_cache, dtype)

        return self.draw_batches(cfg, overrides, labels, generator, draw)

    def _generate_batch(self, b: int, labels: torch.Tensor | None, guidance: float,
                        temperature: float, top_k: int | None, top_p: float | None,
                        generator: torch.Generator | None, use_cache: bool,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
        labels, guided = guided_rows(labels, guidance, self.null_class)
        rows = 2 * b if guided else b
        cache = self.new_cache(rows, dtype) if use_cache else None
        fed = [self._start(rows, labels)]  # every scale's input so far: (rows, s*s, d) each
        maps, total, start = [], None, 0
        for k, s in enumerate(self.cfg.scales):
            if k:
                total = self._accumulate(total, maps[-1].repeat(2, 1, 1) if guided else maps[-1])
                fed.append(self._scale_input(total, k))
            if use_cache:
                logits = self._run(fed[-1], start, cache)
            else:  # the whole prefix again, the newest scale's logits kept
                logits = self._run(torch.cat(fed, 1), 0, None)[:, start:]
            codes = draw_guided(logits.reshape(-1, logits.shape[-1]), guided, guidance,
                                temperature, top_k, top_p, generator)  # (b*s*s,)
            maps.append(codes.view(b, s, s))
            start += s * s
        return join_scales(maps)
