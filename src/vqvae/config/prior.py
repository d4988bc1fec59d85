"""Stage 2's model config (``PriorConfig``: a Transformer over a grid of code ids, autoregressive
or MaskGIT) and its presets: the seed's prior and the default GPT-block one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from .base import _check, _help

PriorVariant = Literal["seed", "gpt", "maskgit", "var"]
MaskGITBlocks = Literal["gpt", "seed"]
MaskSchedule = Literal["cosine", "linear"]


@dataclass(frozen=True)
class PriorConfig:
    """An autoregressive Transformer over a (height, width) grid of ``codebook_size`` code ids."""

    codebook_size: int = field(default=64, metadata=_help("codes K (from the codes)", cli=False))
    height: int = field(default=8, metadata=_help("code grid rows (from the codes)", cli=False))
    width: int = field(default=8, metadata=_help("code grid columns (from the codes)", cli=False))
    num_classes: int = field(default=0, metadata=_help(
        "classes to condition on, 0 = unconditional (set by --conditional)", cli=False))
    variant: PriorVariant = field(default="gpt", metadata=_help(
        "seed: the blog post's post-norm blocks; gpt: pre-norm GPT blocks with an MLP; maskgit: "
        "the same blocks, bidirectional, trained to fill masked codes and sampled in parallel "
        "(vqvae sample --steps); var: GPT blocks over a multiscale tokenizer's token maps, each "
        "scale drawn in one pass (next-scale prediction, Tian et al. 2024; chosen for its "
        "codes); the default preset picks seed or gpt from grid codes"))
    d_model: int = field(default=256, metadata=_help("width of the residual stream"))
    layers: int = field(default=4, metadata=_help("Transformer blocks"))
    heads: int = field(default=8, metadata=_help("attention heads (d_model / heads dims each)"))
    mlp_ratio: int = field(default=4, metadata=_help("gpt: MLP hidden width / d_model"))
    dropout: float = field(default=0.1, metadata=_help(
        "gpt, maskgit: dropout on attention and MLP (the seed's blocks have none)"))
    maskgit_blocks: MaskGITBlocks = field(default="gpt", metadata=_help(
        "maskgit's blocks: gpt | seed (the seed's post-norm blocks, bidirectional: half a GPT "
        "block's step; the default preset's on a large code set); the autoregressive variants "
        "are named by their blocks"))
    mask_schedule: MaskSchedule = field(default="cosine", metadata=_help(
        "maskgit's training masks: the share of a grid's codes masked, at r ~ U(0, 1): cosine "
        "cos(pi r / 2) (MaskGIT's, 64%% on average) | linear 1 - r (50%%); decoding unmasks at "
        "the cosine schedule either way"))

    scales: tuple[int, ...] = field(default=(), metadata=_help(
        "var: the side of each scale's token map, coarse to fine (from the codes)", cli=False))

    def __post_init__(self) -> None:
        _check(self.codebook_size >= 2, f"codebook_size must be >= 2, got {self.codebook_size}")
        _check(self.height >= 1 and self.width >= 1,
               f"grid must be at least 1x1, got {self.height}x{self.width}")
        _check(self.num_classes >= 0, f"num_classes must be >= 0, got {self.num_classes}")
        _check(self.variant in get_args(PriorVariant),
               f"variant must be one of {get_args(PriorVariant)}, got {self.variant!r}")
        _check(self.layers >= 1, f"layers must be >= 1, got {self.layers}")
        _check(self.heads >= 1 and self.d_model % self.heads == 0,
               f"d_model {self.d_model} must be a positive multiple of heads {self.heads}")
        _check(self.mlp_ratio >= 1, f"mlp_ratio must be >= 1, got {self.mlp_ratio}")
        _check(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        _check(self.maskgit_blocks in get_args(MaskGITBlocks),
               f"maskgit_blocks must be one of {get_args(MaskGITBlocks)}, got "
               f"{self.maskgit_blocks!r}")
        _check(self.mask_schedule in get_args(MaskSchedule),
               f"mask_schedule must be one of {get_args(MaskSchedule)}, got "
               f"{self.mask_schedule!r}")
        # JSON gives lists; keep a hashable tuple so configs compare equal after a round trip.
        object.__setattr__(self, "scales", tuple(self.scales))
        if self.variant == "var":
            text = ",".join(map(str, self.scales))
            _check(bool(self.scales) and self.scales[0] >= 1
                   and all(a < b for a, b in zip(self.scales, self.scales[1:])),
                   f"a var prior needs rising scales (a multiscale tokenizer's codes), got "
                   f"{text or 'none'}")
            _check(self.scales[-1] == self.height == self.width,
                   f"scales {text} must end at the {self.height}x{self.width} grid's side")
        else:
            _check(not self.scales, f"scales are the var prior's; a {self.variant!r} prior "
                   f"models one {self.height}x{self.width} grid")

    @property
    def seq_len(self) -> int:
        """Codes per image: h * w, or all scales' (sum of s*s) for a var prior."""
        return sum(s * s for s in self.scales) if self.scales else self.height * self.width


def seed_prior(codebook_size: int = 64, height: int = 8, width: int = 8,
               num_classes: int = 0) -> PriorConfig:
    """The blog post's prior exactly: d_model 2*z_dim = 256, 4 blocks of 8 heads x 32 dims."""
    return PriorConfig(codebook_size=codebook_size, height=height, width=width,
                       num_classes=num_classes, variant="seed", d_model=256, layers=4, heads=8,
                       dropout=0.0)


def default_prior(codebook_size: int = 64, height: int = 8, width: int = 8,
                  num_classes: int = 0) -> PriorConfig:
    """Pre-norm GPT blocks (MLP x4) keeping the seed's row/column positions, at d_model 128 in 8
    heads of 16 dims: a training step costs less than the seed's (0.8M parameters against 1.1M),
    so it competes at short CPU budgets too (docs/prior.md). The blocks (the seed's on large
    code sets), dropout and the learning rate come from the data (:func:`prior_for_data`)."""
    return PriorConfig(codebook_size=codebook_size, height=height, width=width,
                       num_classes=num_classes, variant="gpt", d_model=128, layers=4, heads=8,
                       mlp_ratio=4, dropout=0.1)
