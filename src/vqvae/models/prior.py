"""The prior: a causal Transformer over a VQ-VAE's row-major code grid, sampled with a KV cache.

Vaswani et al., "Attention Is All You Need" (2017); Radford et al., GPT-2 (2019). The ``seed``
variant is the blog post's Keras model; ``generate`` returns code grids and knows nothing about
pixels (decoding them is :mod:`vqvae.generation.sample`'s job).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PriorConfig, PriorVariant, SampleConfig
from .graphs import WARMUP, CapturedStep
from .maskgit import MaskGITPrior
from .transformer import (STACKS, GridTransformer, KVCache, StaticKVCache, draw_guided,
                          guided_rows, init_gpt_model, init_keras)
from .var import VARPrior

# --- the model -----------------------------------------------------------------------------------


class Prior(GridTransformer):
    """p(codes) = prod_t p(c_t | c_<t [, class]) over a row-major (height, width) code grid.

    Token ids 0..K-1 are codes and K is the start token (the seed's 0, with codes shifted by one).
    Input position p carries row p // w and column p % w: the grid cell of the code it predicts.
    A conditional prior adds a class embedding to the start token; class ``num_classes`` is the
    null class used for unconditional and classifier-free-guided sampling.
    """

    card_title = "Autoregressive code prior"
    card_summary = "An autoregressive Transformer prior (each code given the codes before it)"

    def __init__(self, cfg: PriorConfig):
        if cfg.variant not in STACKS:
            raise ValueError(f"Prior is the raster prior (seed, gpt): build a {cfg.variant!r} "
                             f"prior with build_prior")
        super().__init__(cfg, STACKS[cfg.variant])
        if cfg.variant == "seed":
            self.apply(init_keras)
        else:
            init_gpt_model(self, cfg.layers)

    @classmethod
    def from_config(cls, cfg: PriorConfig) -> nn.Module:
        """The prior of ``cfg.variant``: a saved maskgit prior loads as a :class:`MaskGITPrior`."""
        return build_prior(cfg)

    @property
    def start_token(self) -> int:
        return self.cfg.codebook_size

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Input tokens (B, T) -> next-code logits (B, T, K); positions continue the cache."""
        b, t = tokens.shape
        start = 0 if cache is None else cache.length
        if start + t > self.cfg.seq_len:
            raise ValueError(f"{start + t} positions exceed the {self.cfg.seq_len}-code grid")
        pos = torch.arange(start, start + t, device=tokens.device)
        x = self.embed(tokens, pos)
        if self.cls is not None and start == 0:  # the class rides on the start token
            if labels is None:
                labels = torch.full((b,), self.null_class, device=tokens.device)
            x = torch.cat([x[:, :1] + self.cls(labels)[:, None], x[:, 1:]], 1)
        elif labels is not None and self.cls is None:
            raise ValueError("labels given to an unconditional prior")
        x = self.stack(x, cache)
        if cache is not None:
            cache.length += t
        return self.head(x)

    def inputs_and_targets(self, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Code grids (B, h, w) -> teacher-forcing inputs [start, c_0 .. c_{n-2}] and targets
        [c_0 .. c_{n-1}], both (B, h*w)."""
        flat = codes.flatten(1).long()
        start = flat.new_full((flat.shape[0], 1), self.start_token)
        return torch.cat([start, flat[:, :-1]], 1), flat

    def nll(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Negative log-likelihood in nats of every code of (B, h, w) grids -> (B, h*w)."""
        inputs, targets = self.inputs_and_targets(codes)
        logits = self(inputs, labels)
        return F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none")

    def loss_terms(self, codes: torch.Tensor, labels: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, noise: float = 0.0
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The training loss's terms, as every prior gives them: nats (B, h*w) and weights
        (None: every code counts; the maskgit prior counts only its masked codes). ``noise``:
        token dropout, each input code replaced by a random one with this probability (the
        targets stay the true codes), against overfitting small data sets."""
        inputs, targets = self.inputs_and_targets(codes)
        if noise:
            inputs = _corrupt(inputs, noise, self.cfg.codebook_size, generator, keep_first=True)
        logits = self(inputs, labels)
        return F.cross_entropy(logits.transpose(1, 2).float(), targets, reduction="none"), None

    def new_cache(self, batch: int, dtype: torch.dtype | None = None,
                  static: bool = False) -> KVCache:
        """An empty cache for ``batch`` rows in ``dtype`` (default: the weights'); ``static``: a
        :class:`StaticKVCache` for :meth:`decode_step`."""
        ref = self.head.weight
        kind = StaticKVCache if static else KVCache
        return kind(self.cfg.layers, batch, self.cfg.heads, self.cfg.seq_len,
                    self.cfg.d_model // self.cfg.heads, ref.device, dtype or ref.dtype)

    def decode_step(self, tokens: torch.Tensor, cache: StaticKVCache,
                    extra: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row (B, 1) at the cache's position -> next-code logits (B, K), the
        position advanced; fixed shapes and no host sync, so a CUDA graph can replay it.
        ``extra`` (B, d_model) is added to the token's embedding (the class, on the start
        token)."""
        cache.begin_step()
        x = self.embed(tokens, cache.position)
        if extra is not None:
            x = x + extra[:, None]
        x = self.stack(x, cache)
        cache.position.add_(1)
        return self.head(x[:, -1])

    @torch.inference_mode()
    def generate(self, cfg: SampleConfig = SampleConfig(),
                 labels: int | torch.Tensor | None = None,
                 generator: torch.Generator | None = None, **overrides: Any) -> torch.Tensor:
        """Draw ``cfg.n`` code grids (n, h, w), ``cfg.batch_size`` at a time, one code per step
        (``cfg.steps`` and ``cfg.choice_temperature`` are the parallel-decoding prior's and do
        nothing here); ``overrides`` replace fields of ``cfg`` (``generate(n=4, top_k=8)``).

        ``labels`` (an int or (n,) ids; default ``cfg.label`` / ``cfg.all_classes``) conditions
        a conditional prior; ``guidance`` g != 1 mixes the logits as uncond + g * (cond - uncond)
        (classifier-free guidance), both passes batched together. ``no_cache`` recomputes the
        whole prefix at every step (the seed's way); it draws exactly the same codes as the
        cached path from the same ``generator`` state (default: seeded by ``cfg.seed``).
        ``precision`` bf16 / fp16 runs the forward passes under autocast (codes are drawn from
        fp32 probabilities). ``graph``: a static KV cache whose one-code step is captured in a
        CUDA graph and replayed (on a CPU the same static step runs without capture).
        """
        def draw(b: int, labels: torch.Tensor | None, cfg: SampleConfig,
                 generator: torch.Generator, dtype: torch.dtype | None) -> torch.Tensor:
            knobs = (cfg.guidance, cfg.temperature, cfg.top_k, cfg.top_p, generator)
            return (self._generate_static(b, labels, *knobs, dtype) if cfg.graph
                    else self._generate_batch(b, labels, *knobs, not cfg.no_cache, dtype))

        return self.draw_batches(cfg, overrides, labels, generator, draw)

    def _generate_batch(self, b: int, labels: torch.Tensor | None, guidance: float,
                        temperature: float, top_k: int | None, top_p: float | None,
                        generator: torch.Generator | None, use_cache: bool,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
        device = self.head.weight.device
        labels, guided = guided_rows(labels, guidance, self.null_class)
        rows = 2 * b if guided else b
        seq = torch.full((rows, 1), self.start_token, dtype=torch.long, device=device)
        cache = self.new_cache(rows, dtype) if use_cache else None
        codes = torch.empty(b, self.cfg.seq_len, dtype=torch.long, device=device)
        for t in range(self.cfg.seq_len):
            step_in = seq[:, -1:] if use_cache and t else seq  # cached: only the newest token
            logits = self(step_in, labels, cache)[:, -1]  # (rows, K)
            codes[:, t] = draw_guided(logits, guided, guidance, temperature, top_k, top_p,
                                      generator)
            nxt = codes[:, t:t + 1].repeat(2, 1) if guided else codes[:, t:t + 1]
            seq = nxt if use_cache else torch.cat([seq, nxt], 1)
        return codes

    def _generate_static(self, b: int, labels: torch.Tensor | None, guidance: float,
                         temperature: float, top_k: int | None, top_p: float | None,
                         generator: torch.Generator | None,
                         dtype: torch.dtype | None) -> torch.Tensor:
        """:meth:`_generate_batch` with a static cache: the same codes (up to rounding), the
        step after the first replayed from a CUDA graph on a GPU."""
        device = self.head.weight.device
        labels, guided = guided_rows(labels, guidance, self.null_class)
        rows = 2 * b if guided else b
        cache = self.new_cache(rows, dtype, static=True)
        token = torch.full((rows, 1), self.start_token, dtype=torch.long, device=device)
        step = lambda tokens: self.decode_step(tokens, cache)  # noqa: E731
        if device.type == "cuda" and self.cfg.seq_len > WARMUP:  # warm-ups write slots 0, 1, 2
            step = CapturedStep(step, token)
            cache.position.zero_()  # the warm-up calls advanced it
        extra = None
        if self.cls is not None:  # the class rides on the start token
            extra = self.cls(labels if labels is not None else
                             torch.full((rows,), self.null_class, device=device))
        logits = self.decode_step(token, cache, extra)
        codes = torch.empty(b, self.cfg.seq_len, dtype=torch.long, device=device)
        for t in range(self.cfg.seq_len):
            if t:
                logits = step(token)
            codes[:, t] = draw_guided(logits, guided, guidance, temperature, top_k, top_p,
                                      generator)
            token = codes[:, t:t + 1].repeat(2, 1) if guided else codes[:, t:t + 1]
        return codes


def _corrupt(tokens: torch.Tensor, p: float, k: int, generator: torch.Generator | None,
             keep_first: bool = False) -> torch.Tensor:
    """(B, T) tokens with each replaced by a uniform code in [0, k) with probability ``p``."""
    swap = torch.rand(tokens.shape, generator=generator) < p
    if keep_first:
        swap[:, 0] = False  # the start token
    noise = torch.randint(0, k, tokens.shape, generator=generator)
    return torch.where(swap.to(tokens.device), noise.to(tokens.device), tokens)


# The prior variants: autoregressive (seed, gpt: this module), parallel (maskgit) or next-scale
# (var, over a multiscale tokenizer's token maps).
PRIORS: dict[PriorVariant, type[nn.Module]] = {"seed": Prior, "gpt": Prior,
                                               "maskgit": MaskGITPrior, "var": VARPrior}


def build_prior(cfg: PriorConfig) -> nn.Module:
    """The prior named by ``cfg.variant``; every variant has ``generate`` and ``loss_terms``."""
    return PRIORS[cfg.variant](cfg)
