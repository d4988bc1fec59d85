"""The prior: a causal Transformer over a VQ-VAE's row-major code grid, sampled with a KV cache.

Vaswani et al., "Attention Is All You Need" (2017); Radford et al., GPT-2 (2019). The ``seed``
variant is the blog post's Keras model; ``generate`` returns code grids and knows nothing about
pixels (decoding them is :mod:`vqvae.sample`'s job).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import PriorConfig, check_sampling


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


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None,
                     layer: int, dropout_p: float = 0.0) -> torch.Tensor:
    """(B, H, T, Dh) queries/keys/values -> (B, H, T, Dh), each query seeing itself and the past.

    Without a cache, or filling an empty one, SDPA's causal mask does it. With cached positions the
    only supported query is the single newest token, which may see every key, so no mask at all.
    """
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
    """The Keras ``Attention`` layer: bias-free q/k/v projections and no output projection."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d_model, d_model, bias=False)
        self.k = nn.Linear(d_model, d_model, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        q, k, v = (_split_heads(proj(x), self.heads) for proj in (self.q, self.k, self.v))
        return _merge_heads(causal_attention(q, k, v, cache, layer))


class SeedBlock(nn.Module):
    """LayerNorm(x + Dense_relu(Attention(x))): the seed's ``build_att`` and the norm after it."""

    def __init__(self, d_model: int, heads: int):
        super().__init__()
        self.attn = SeedAttention(d_model, heads)
        self.dense = nn.Linear(d_model, d_model)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        return self.norm(x + F.relu(self.dense(self.attn(x, cache, layer))))


class SeedStack(nn.Module):
    """LayerNorm on the summed embeddings, then post-norm seed blocks."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.blocks = nn.ModuleList(SeedBlock(cfg.d_model, cfg.heads) for _ in range(cfg.layers))

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = self.norm(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return x


# --- GPT blocks ----------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Fused q/k/v projection, SDPA, output projection, dropout on attention and output."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        q, k, v = (_split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        y = causal_attention(q, k, v, cache, layer, self.dropout if self.training else 0.0)
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

    def __init__(self, d_model: int, heads: int, mlp_ratio: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, mlp_ratio, dropout)

    def forward(self, x: torch.Tensor, cache: KVCache | None, layer: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cache, layer)
        return x + self.mlp(self.norm2(x))


class GPTStack(nn.Module):
    """Dropout on the embeddings, pre-norm GPT blocks, a final LayerNorm."""

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(GPTBlock(cfg.d_model, cfg.heads, cfg.mlp_ratio, cfg.dropout)
                                    for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i)
        return self.norm(x)


STACKS = {"seed": SeedStack, "gpt": GPTStack}


def _init_keras(module: nn.Module) -> None:
    """Keras' defaults, as the seed ran: glorot-uniform kernels, zero biases, U(-0.05, 0.05)
    embeddings."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.uniform_(module.weight, -0.05, 0.05)


def _init_gpt(module: nn.Module) -> None:
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


# --- the model -----------------------------------------------------------------------------------


class Prior(nn.Module):
    """p(codes) = prod_t p(c_t | c_<t [, class]) over a row-major (height, width) code grid.

    Token ids 0..K-1 are codes and K is the start token (the seed's 0, with codes shifted by one).
    Input position p carries row p // w and column p % w: the grid cell of the code it predicts.
    A conditional prior adds a class embedding to the start token; class ``num_classes`` is the
    null class used for unconditional and classifier-free-guided sampling.
    """

    def __init__(self, cfg: PriorConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.tok = nn.Embedding(cfg.codebook_size + 1, d)
        self.row = nn.Embedding(cfg.height, d)
        self.col = nn.Embedding(cfg.width, d)
        self.cls = nn.Embedding(cfg.num_classes + 1, d) if cfg.num_classes else None
        self.stack = STACKS[cfg.variant](cfg)
        self.head = nn.Linear(d, cfg.codebook_size)
        if cfg.variant == "seed":
            self.apply(_init_keras)
        else:
            self.apply(_init_gpt)
            for name, p in self.named_parameters():  # residual branches, scaled by depth
                if name.endswith(("attn.proj.weight", "mlp.proj.weight")):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.layers))

    @property
    def start_token(self) -> int:
        return self.cfg.codebook_size

    @property
    def null_class(self) -> int:
        return self.cfg.num_classes

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Input tokens (B, T) -> next-code logits (B, T, K); positions continue the cache."""
        b, t = tokens.shape
        start = 0 if cache is None else cache.length
        if start + t > self.cfg.seq_len:
            raise ValueError(f"{start + t} positions exceed the {self.cfg.seq_len}-code grid")
        pos = torch.arange(start, start + t, device=tokens.device)
        x = self.tok(tokens) + self.row(pos // self.cfg.width) + self.col(pos % self.cfg.width)
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

    def new_cache(self, batch: int) -> KVCache:
        ref = self.head.weight
        return KVCache(self.cfg.layers, batch, self.cfg.heads, self.cfg.seq_len,
                       self.cfg.d_model // self.cfg.heads, ref.device, ref.dtype)

    @torch.inference_mode()
    def generate(self, n: int, *, labels: int | torch.Tensor | None = None,
                 guidance: float = 1.0, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 batch_size: int = 64, use_cache: bool = True) -> torch.Tensor:
        """Draw ``n`` code grids (n, h, w), ``batch_size`` at a time, one code per step.

        ``labels`` (an int or (n,) ids) conditions a conditional prior; ``guidance`` g != 1 mixes
        the logits as uncond + g * (cond - uncond) (classifier-free guidance), both passes batched
        together. ``use_cache=False`` recomputes the whole prefix at every step (the seed's way);
        it draws exactly the same codes as the cached path from the same ``generator`` state.
        """
        labels = self._check_sampling(n, batch_size, labels, guidance, temperature, top_k, top_p)
        was_training = self.training
        self.eval()
        grids = []
        for s in range(0, n, batch_size):
            batch_labels = None if labels is None else labels[s:s + batch_size]
            grids.append(self._generate_batch(min(batch_size, n - s), batch_labels, guidance,
                                              temperature, top_k, top_p, generator, use_cache))
        self.train(was_training)
        return torch.cat(grids).view(n, self.cfg.height, self.cfg.width)

    def _check_sampling(self, n: int, batch_size: int, labels: int | torch.Tensor | None,
                        guidance: float, temperature: float, top_k: int | None,
                        top_p: float | None) -> torch.Tensor | None:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        check_sampling(temperature, top_k, top_p, guidance)  # ConfigError, a ValueError
        if labels is None:
            if guidance != 1.0:
                raise ValueError("guidance needs class labels to guide towards")
            return None
        if not self.cfg.num_classes:
            raise ValueError("this prior is unconditional: it takes no class labels")
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.head.weight.device)
        labels = labels.expand(n) if labels.dim() == 0 else labels
        if labels.shape != (n,):
            raise ValueError(f"expected {n} labels, got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.cfg.num_classes):
            raise ValueError(f"class ids must be in [0, {self.cfg.num_classes - 1}], got "
                             f"{labels.min().item()}..{labels.max().item()}")
        return labels

    def _generate_batch(self, b: int, labels: torch.Tensor | None, guidance: float,
                        temperature: float, top_k: int | None, top_p: float | None,
                        generator: torch.Generator | None, use_cache: bool) -> torch.Tensor:
        device = self.head.weight.device
        guided = labels is not None and guidance != 1.0
        if guided:  # rows [0, b) conditional, [b, 2b) the null class
            labels = torch.cat([labels, torch.full_like(labels, self.null_class)])
        rows = 2 * b if guided else b
        seq = torch.full((rows, 1), self.start_token, dtype=torch.long, device=device)
        cache = self.new_cache(rows) if use_cache else None
        codes = torch.empty(b, self.cfg.seq_len, dtype=torch.long, device=device)
        for t in range(self.cfg.seq_len):
            step_in = seq[:, -1:] if use_cache and t else seq  # cached: only the newest token
            logits = self(step_in, labels, cache)[:, -1].float()  # (rows, K)
            if guided:
                cond, uncond = logits.chunk(2)
                logits = uncond + guidance * (cond - uncond)
            codes[:, t] = sample_next(logits, temperature, top_k, top_p, generator)
            nxt = codes[:, t:t + 1].repeat(2, 1) if guided else codes[:, t:t + 1]
            seq = nxt if use_cache else torch.cat([seq, nxt], 1)
        return codes
