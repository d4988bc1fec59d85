"""Transformer building blocks shared by the priors: attention (causal with a KV cache, or
bidirectional), the seed's post-norm blocks, GPT pre-norm blocks, initialisations, and the
sampling of a code from logits (temperature, top-k, top-p).

Vaswani et al., "Attention Is All You Need" (2017); Radford et al., GPT-2 (2019); nucleus
sampling: Holtzman et al. (2019), arXiv:1904.09751.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import PriorConfig, SampleConfig
from ..errors import CheckpointError
from ..precision import sampling_autocast, sampling_dtype
from .pretrained import PRIOR_KIND, CardFacts, PretrainedMixin


class KVCache:
    """Keys and values of every layer for the positions seen so far, preallocated to ``max_len``."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (layers, batch, heads, max_len, head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions already stored; advanced by Prior.forward after all layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store (B, H, T, Dh) keys/values after the cached ones; return all of them."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class StaticKVCache(KVCache):
    """A KV cache whose one-code decode step has fixed shapes, so that a CUDA graph can replay
    it: the step writes its key and value at ``position`` (a device tensor the step advances)
    and attends to all ``max_len`` slots, those not yet written masked out. Slots start at zero
    (a masked slot still enters the weighted sum, with weight 0: it must not be NaN)."""

    def __init__(self, layers: int, batch: int, heads: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        super().__init__(layers, batch, heads, max_len, head_dim, device, dtype)
        self.k.zero_()
        self.v.zero_()
        self.position = torch.zeros(1, dtype=torch.long, device=device)  # the slot written next
        self.slots = torch.arange(max_len, device=device)
        self.visible = self.slots <= self.position  # (max_len,): refreshed by :meth:`begin_step`

    def begin_step(self) -> None:
        """Before a step's layers: the slots its position may see (the same for every layer)."""
        torch.le(self.slots, self.position, out=self.visible)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Store one position's (B, H, 1, Dh) key/value; return all (B, H, max_len, Dh) slots and
        the (1, 1, 1, max_len) mask of those written so far (set by :meth:`begin_step`)."""
        self.k[layer].index_copy_(2, self.position, k.to(self.k.dtype))
        self.v[layer].index_copy_(2, self.position, v.to(self.v.dtype))
        return self.k[layer], self.v[layer], self.visible.view(1, 1, 1, -1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None,
                     layer: int, dropout_p: float = 0.0,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, T, Dh) queries/keys/values -> (B, H, T, Dh), each query seeing itself and the past.

    Without a cache, or filling an empty one, SDPA's causal mask does it. With cached positions the
    only supported query is the single newest token, which may see every key, so no mask at all;
    with a :class:`StaticKVCache`, every slot written so far. ``mask`` (T, past + T) bool, True =
    visible: another causal order (the var prior's scale by scale), the cache appended first.
    """
    if mask is not None:
        if cache is not None:
            k, v = cache.append(layer, k, v)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    if isinstance(cache, StaticKVCache):
        k, v, visible = cache.write(layer, k, v)
        return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=visible,
                                              dropout_p=dropout_p)
    past = 0 if cache is None else cache.length
    if cache is not None:
        k, v = cache.append(layer, k, v)
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if q.shape[2] != 1:
        raise ValueError("with a non-empty KV cache, feed one token at a time")
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=False)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = x.shape
    return x.view(b, t, heads, d // heads).transpose(1, 2)  # (B, T, D) -> (B, H, T, D/H)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    b, h, t, dh = x.shape
    return x.transpose(1, 2).reshape(b, t, h * dh)  # (B, H, T, Dh) -> (B, T, H*Dh)


# --- the seed's blocks ---------------------------------------------------------------------------


class SeedAttention(nn.Module):
    """The Keras ``Attention`` layer: bias-free q/k/v projections and no output projection;
    causal (with an optional KV cache) or bidirectional."""

    def __init__(self, d_model: int, heads: int, causal: bool = True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.q, self.k, self.v))
        return _merge_heads(causal_attention(q, k, v, cache, layer) if self.causal
                            else F.scaled_dot_product_attention(q, k, v))


class SeedBlock(nn.Module):
    """LayerNorm(x + Dense_relu(Attention(x))): the seed's ``build_att`` and the norm after it."""

    def __init__(self, d_model: int, heads: int, causal: bool = True):
        super().__init__()
        self.attn = SeedAttention(d_model, heads, causal)
        self.dense = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        return self.norm(x + F.relu(self.dense(self.attn(x, cache, layer))))


class SeedStack(nn.Module):
    """LayerNorm on the summed embeddings, then post-norm seed blocks; bidirectional for the
    parallel-decoding (maskgit) variant."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.blocks = nn.ModuleList(SeedBlock(cfg.d_model, cfg.heads, cfg.variant != "maskgit")
                                    for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = self.norm(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return x


# --- GPT blocks ----------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Fused q/k/v projection, SDPA, output projection, dropout on attention and output; causal
    (with an optional KV cache) or bidirectional (every position sees every other)."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0, causal: bool = True):
        super().__init__()
        self.heads, self.dropout, self.causal = heads, dropout, causal
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        p = self.dropout if self.training else 0.0
        y = (causal_attention(q, k, v, cache, layer, p, mask) if self.causal
             else F.scaled_dot_product_attention(q, k, v, dropout_p=p))
        return self.drop(self.proj(_merge_heads(y)))


class MLP(nn.Module):
    def __init__(self, d_model: int, ratio: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, ratio * d_model)
        self.proj = nn.Linear(ratio * d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class GPTBlock(nn.Module):
    """Pre-norm: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, d_model: int, heads: int, mlp_ratio: int, dropout: float = 0.0,
                 causal: bool = True):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, heads, dropout, causal)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer, mask)
        return x + self.mlp(self.norm2(x))


class GPTStack(nn.Module):
    """Dropout on the embeddings, pre-norm GPT blocks, a final LayerNorm; bidirectional for the
    parallel-decoding (maskgit) variant."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            GPTBlock(cfg.d_model, cfg.heads, cfg.mlp_ratio, cfg.dropout, cfg.variant != "maskgit")
            for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: (T, past + T) bool, True = visible (default: causal)."""
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, mask)
        return self.norm(x)


STACKS = {"seed": SeedStack, "gpt": GPTStack}


def init_keras(module: nn.Module) -> None:
    """Keras' defaults, as the seed ran: glorot-uniform kernels, zero biases, U(-0.05, 0.05)
    embeddings."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.uniform_(module.weight, -0.05, 0.05)


def init_gpt(module: nn.Module) -> None:
    """GPT-2's: N(0, 0.02) weights and embeddings, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)


# --- sampling ------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: int | None = None,
                  top_p: float | None = None) -> torch.Tensor:
    """(B, K) logits with every code outside the top-k / nucleus candidates set to -inf.

    top-k keeps the k largest logits; top-p keeps the smallest most-probable set whose total
    probability reaches p (always at least the most probable code).
    """
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        before = F.pad(probs.cumsum(-1)[:, :-1], (1, 0))  # mass of the more probable codes
        drop = (before >= top_p).scatter(-1, order, before >= top_p)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """Draw one code per row of (B, K) logits; temperature 0 is greedy (argmax).

    Draws by inverting the CDF with one uniform per row, so the random stream consumed never
    depends on the logits: two samplers whose logits agree draw the same codes.
    """
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = filter_logits(logits.double() / temperature, top_k, top_p).softmax(-1)
    cdf = probs.cumsum(-1)
    device = generator.device if generator is not None else logits.device
    u = torch.rand(logits.shape[0], 1, generator=generator, device=device, dtype=torch.float64)
    index = torch.searchsorted(cdf, u.to(logits.device) * cdf[:, -1:], right=True)
    return index.squeeze(1).clamp_(max=logits.shape[-1] - 1)


def guided_rows(labels: torch.Tensor | None, guidance: float,
                null: int) -> tuple[torch.Tensor | None, bool]:
    """Classifier-free guidance draws every grid twice: rows [0, b) with their class, [b, 2b)
    with the null class. Returns the labels of all rows and whether guidance is on."""
    if labels is None or guidance == 1.0:
        return labels, False
    return torch.cat([labels, torch.full_like(labels, null)]), True


def draw_guided(logits: torch.Tensor, guided: bool, guidance: float, temperature: float,
                top_k: int | None, top_p: float | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One code per row of next-code logits (rows, K): guided rows mixed as
    uncond + g * (cond - uncond), then drawn in fp32 or better."""
    logits = logits.float()
    if guided:
        cond, uncond = logits.chunk(2)
        logits = uncond + guidance * (cond - uncond)
    return sample_next(logits, temperature, top_k, top_p, generator)


def init_gpt_model(model: nn.Module, layers: int) -> None:
    """GPT-2's initialisation of a whole prior: N(0, 0.02), residual projections scaled by depth."""
    model.apply(init_gpt)
    for name, p in model.named_parameters():
        if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))


def check_labels(labels: int | torch.Tensor | None, n: int, num_classes: int, guidance: float,
                 device: torch.device) -> torch.Tensor | None:
    """Class ids for ``n`` draws of a prior with ``num_classes`` classes: (n,) long, or None."""
    if labels is None:
        if guidance != 1.0:
            raise ValueError("guidance needs class labels to guide towards")
        return None
    if not num_classes:
        raise ValueError("this prior is unconditional: it takes no class labels")
    labels = torch.as_tensor(labels, dtype=torch.long, device=device)
    labels = labels.expand(n) if labels.dim() == 0 else labels
    if labels.shape != (n,):
        raise ValueError(f"expected {n} labels, got shape {tuple(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"class ids must be in [0, {num_classes - 1}], got "
                         f"{labels.min().item()}..{labels.max().item()}")
    return labels


def sampling(cfg: SampleConfig, overrides: dict[str, Any], labels: int | torch.Tensor | None,
             generator: torch.Generator | None, num_classes: int, device: torch.device
             ) -> tuple[SampleConfig, torch.Tensor | None, torch.Generator]:
    """What a prior's ``generate`` draws with: ``cfg`` with fields of ``overrides`` replaced, the
    class ids (``labels``, or ``cfg``'s ``label`` / ``all_classes``; None: unconditional) and
    the generator (default: seeded by ``cfg.seed``, so the same config draws the same codes)."""
    cfg = replace(cfg, **overrides) if overrides else cfg
    if labels is None and (cfg.label is not None or cfg.all_classes):
        labels = cfg.labels(num_classes)
    labels = check_labels(labels, cfg.n, num_classes, cfg.guidance, device)
    return cfg, labels, generator or torch.Generator().manual_seed(cfg.seed)


class GridTransformer(PretrainedMixin, nn.Module):
    """What every prior over a (height, width) code grid has: an embedding of the K codes and one
    special token (start or mask), row and column embeddings of the grid cell, a class embedding
    (class ``num_classes`` is the null class), a stack of blocks and a head over the K codes; and
    one checkpoint kind, ``prior`` (``save_pretrained``/``from_pretrained``)."""

    checkpoint_kind, config_class = PRIOR_KIND, PriorConfig
    card_title: str  # the model card's title and first words (each prior names itself)
    card_summary: str
    VARIANT: str | None = None  # the one variant a class builds (None: it picks by the config)

    @classmethod
    def from_config(cls, cfg: PriorConfig) -> nn.Module:
        """The prior a saved config describes; a class of one variant refuses another in one
        line (where its constructor's ValueError would read as a bug)."""
        if cls.VARIANT is not None and cfg.variant != cls.VARIANT:
            raise CheckpointError(f"a {cfg.variant!r} prior, not a {cls.VARIANT} one: load it "
                                  f"with Prior.from_pretrained or vqvae.from_pretrained")
        return cls(cfg)

    def __init__(self, cfg: PriorConfig, stack: Callable[[PriorConfig], nn.Module]):
        if self.VARIANT is not None and cfg.variant != self.VARIANT:
            raise ValueError(f"{type(self).__name__} needs variant {self.VARIANT!r}, got "
                             f"{cfg.variant!r}")
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.codebook_size + 1, d)
        self.row = nn.Embedding(cfg.height, d)
        self.col = nn.Embedding(cfg.width, d)
        self.cls = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.stack = stack(cfg)
        self.head = nn.Linear(d, cfg.codebook_size)

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def draw_batches(self, cfg: SampleConfig, overrides: dict[str, Any],
                     labels: int | torch.Tensor | None, generator: torch.Generator | None,
                     draw: Callable[..., torch.Tensor]) -> torch.Tensor:
        """What both priors' ``generate`` share: the config, labels and generator
        (:func:`sampling`), eval mode and ``cfg.precision``'s autocast around
        ``draw(b, labels, cfg, generator, dtype)`` for each batch of at most ``cfg.batch_size``
        grids -> all ``cfg.n`` grids (n, h, w)."""
        device = self.head.weight.device
        cfg, labels, generator = sampling(cfg, overrides, labels, generator,
                                          self.cfg.num_classes, device)
        dtype = sampling_dtype(cfg.precision, device)
        was_training = self.training
        self.eval()
        grids = []
        with sampling_autocast(dtype, device):
            for s in range(0, cfg.n, cfg.batch_size):
                b = min(cfg.batch_size, cfg.n - s)
                grids.append(draw(b, None if labels is None else labels[s:s + b], cfg,
                                  generator, dtype))
        self.train(was_training)
        return torch.cat(grids).view(cfg.n, *self.code_shape)

    @property
    def code_shape(self) -> tuple[int, ...]:
        """The codes of one image: a (height, width) grid."""
        return self.cfg.height, self.cfg.width

    def card_facts(self) -> CardFacts:
        cfg = self.cfg
        classes = (f"conditioned on one of {cfg.num_classes} classes" if cfg.num_classes
                   else "unconditional")
        summary = (f"{self.card_summary}, over {cfg.height} x {cfg.width} grids of codes out of "
                   f"K = {cfg.codebook_size}, {classes}: the second stage of a vqvae model, "
                   f"whose codes its VQ-VAE decodes into images.")
        facts = {"variant": cfg.variant, "codes K": cfg.codebook_size,
                 "code grid h x w": f"{cfg.height} x {cfg.width}",
                 "classes": cfg.num_classes or "0 (unconditional)", "d_model": cfg.d_model,
                 "layers": cfg.layers, "heads": cfg.heads}
        return CardFacts(self.card_title, summary, facts, ("image-generation", "code-prior",
                                                           cfg.variant))

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Tokens (B, T) at grid positions (T,) (cell p // w, p % w) -> (B, T, d_model)."""
        w = self.cfg.width
        return self.tok(tokens) + self.row(positions // w) + self.col(positions % w)
