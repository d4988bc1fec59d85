"""Stage 1's model config (``VQVAEConfig``: architecture and quantizer, with their options) and
its presets: the seed's VQ-VAE, the default, and a VQGAN-class tokenizer (Esser et al. 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal, get_args

from .base import _check, _help

QuantizerName = Literal["vq", "ema", "fsq", "multiscale"]
Architecture = Literal["resnet", "vqgan"]
WeightInit = Literal["keras", "torch"]
Estimator = Literal["ste", "rotation"]
Upsample = Literal["transpose", "nearest"]
DownsamplePadding = Literal["symmetric", "asymmetric"]


@dataclass(frozen=True)
class VQVAEConfig:
    image_size: int = field(default=128, metadata=_help("image side in pixels", cli=False))
    in_channels: int = field(default=3, metadata=_help("image channels", cli=False))
    architecture: Architecture = field(default="resnet", metadata=_help(
        "resnet: the blog post's conv/BatchNorm/ReLU encoder and transposed-conv decoder, tanh "
        "output | vqgan: GroupNorm/SiLU residual blocks over levels of channel_mult widths, "
        "nearest-neighbour upsampling, optional self-attention, no tanh (Esser et al. 2021)"))
    hidden_channels: int = field(default=128, metadata=_help(
        "channels of every conv layer (z_dim); vqgan: of the first level (times channel_mult)"))
    downsamples: int = field(default=2, metadata=_help(
        "stride-2 convolutions (latent = size / 2^n); vqgan: len(channel_mult) - 1"))
    res_blocks: int = field(default=3, metadata=_help(
        "residual blocks in encoder and decoder; vqgan: per resolution level, >= 1"))
    channel_mult: tuple[int, ...] = field(default=(), metadata=_help(
        "vqgan: each resolution level's width as a multiple of hidden_channels, comma-separated "
        "(e.g. 1,1,2,4); downsamples + 1 values, and given without --downsamples it sets "
        "downsamples to its length - 1 (default: every level hidden_channels wide)",
        architecture="vqgan"))
    attention: bool = field(default=False, metadata=_help(
        "vqgan: single-head self-attention after each residual block of the lowest resolution "
        "and between the two middle blocks, in encoder and decoder", architecture="vqgan"))
    norm_groups: int = field(default=32, metadata=_help(
        "vqgan: GroupNorm groups; every level's width must be a multiple of it",
        architecture="vqgan"))
    middle_attention_only: bool = field(default=False, metadata=_help(
        "vqgan with --attention: attend between the two middle blocks only, not after each "
        "residual block of the lowest resolution (diffusers' VQModel)", architecture="vqgan"))
    downsample_padding: DownsamplePadding = field(default="symmetric", metadata=_help(
        "vqgan: how the encoder's stride-2 convs pad: symmetric (one pixel on every side) | "
        "asymmetric (one pixel right and bottom only: taming's and diffusers' Downsample2D)",
        architecture="vqgan"))
    decoder_res_blocks: int | None = field(default=None, metadata=_help(
        "vqgan: residual blocks per decoder level (default: res_blocks; taming's and diffusers' "
        "decoders have res_blocks + 1)", architecture="vqgan"))
    latent_channels: int | None = field(default=None, metadata=_help(
        "vqgan: channels of the encoder's output and the decoder's input, with 1x1 convs to and "
        "from code_dim around the quantizer (diffusers' quant_conv and post_quant_conv; default: "
        "none, the encoder outputs code_dim channels)", architecture="vqgan"))
    codebook_size: int = field(default=64, metadata=_help("number of codes K"))
    code_dim: int = field(default=128, metadata=_help("dimension D of each code"))
    beta: float = field(default=0.25, metadata=_help("commitment loss weight"))
    quantizer: QuantizerName = field(default="vq", metadata=_help(
        "vq: the seed's (codebook + commitment loss) | ema: codes are moving averages of their "
        "vectors, commitment loss only | fsq: finite scalar quantization, an implicit codebook | "
        "multiscale: the residual quantized at every --scales side, coarse to fine, with one "
        "shared codebook (VAR's tokenizer, Tian et al. 2024; for train-prior --variant var)"))
    kmeans_init: bool = field(default=False, metadata=_help(
        "vq/ema: initialise the codes by k-means on the first training batch's encoder outputs",
        quantizer_option=True))
    restart_after: int = field(default=0, metadata=_help(
        "vq/ema: re-seed a code from the current batch's encoder outputs once it has been unused "
        "for this many steps (0 = never)", quantizer_option=True))
    cosine: bool = field(default=False, metadata=_help(
        "vq/ema: l2-normalised codes and lookup vectors (nearest code = highest cosine)",
        quantizer_option=True))
    lookup_dim: int | None = field(default=None, metadata=_help(
        "vq/ema: look codes up in a learned linear projection to this many dimensions "
        "(default: none, codes have code_dim dimensions)", quantizer_option=True))
    estimator: Estimator = field(default="ste", metadata=_help(
        "vq/ema: how the snap to a code passes the gradient to the encoder: ste (straight-"
        "through, the seed's) | rotation (the rotation trick: rotate and rescale the encoder "
        "vector onto its code, Fifty et al. 2024)", quantizer_option=True))
    ema_decay: float = field(default=0.99, metadata=_help(
        "ema: decay of the moving averages", quantizer_option=True))
    ema_epsilon: float = field(default=1e-5, metadata=_help(
        "ema: Laplace smoothing of the codes' cluster sizes", quantizer_option=True))
    fsq_levels: tuple[int, ...] = field(default=(), metadata=_help(
        "fsq: values per channel, comma-separated (e.g. 8,8,8); their product is codebook_size "
        "(default: codebook_size factorised into levels near 8)", quantizer_option=True))
    scales: tuple[int, ...] = field(default=(), metadata=_help(
        "multiscale: the side of each scale's token map, coarse to fine, comma-separated (e.g. "
        "1,2,3,4,6,8); the last is the code grid's side (default: derived from it, "
        "1,2,3,4,6,8 for 8x8 and 1,2,3,4,5,6,8,10,13,16 for 16x16)", quantizer_option=True))
    weight_init: WeightInit = field(default="keras", metadata=_help(
        "keras: glorot-uniform convs, U(-0.05, 0.05) codebook (the seed's); torch: PyTorch "
        "defaults"))
    bn_momentum: float = field(default=0.01, metadata=_help(
        "resnet: BatchNorm running-stat momentum (PyTorch convention; Keras' 0.99 is 0.01)",
        architecture="resnet"))
    bn_eps: float = field(default=1e-3, metadata=_help(
        "resnet: BatchNorm epsilon", architecture="resnet"))
    upsample: Upsample = field(default="transpose", metadata=_help(
        "resnet: the decoder's x2 upsampling: transpose (4x4 stride-2 transposed convs, the "
        "seed's) | nearest (nearest-neighbour x2, then a 3x3 conv, as VQGAN's decoder: no "
        "stride-periodic grid artefacts, which adversarial training otherwise amplifies)",
        architecture="resnet"))

    def __post_init__(self) -> None:
        _check(self.in_channels in (1, 3), f"in_channels must be 1 or 3, got {self.in_channels}")
        _check(self.architecture in get_args(Architecture),
               f"architecture must be one of {get_args(Architecture)}, got {self.architecture!r}")
        _check(self.downsamples >= 1, f"downsamples must be >= 1, got {self.downsamples}")
        _check(self.hidden_channels >= 1,
               f"hidden_channels must be >= 1, got {self.hidden_channels}")
        _check(self.res_blocks >= 0, f"res_blocks must be >= 0, got {self.res_blocks}")
        self._check_architecture_options()
        factor = 2**self.downsamples
        fewer = ("a shorter --channel-mult" if self.architecture == "vqgan"
                 else "fewer --downsamples")
        _check(self.image_size % factor == 0,
               f"image size {self.image_size} is not divisible by 2^downsamples = {factor}: "
               f"pick a --size that is a multiple of {factor}, or {fewer}")
        _check(self.codebook_size >= 2, f"codebook_size must be >= 2, got {self.codebook_size}")
        _check(self.code_dim >= 1, f"code_dim must be >= 1, got {self.code_dim}")
        _check(self.beta >= 0.0, f"beta must be >= 0, got {self.beta}")
        _check(self.quantizer in get_args(QuantizerName),
               f"quantizer must be one of {get_args(QuantizerName)}, got {self.quantizer!r}")
        self._check_quantizer_options()
        _check(self.weight_init in get_args(WeightInit),
               f"weight_init must be one of {get_args(WeightInit)}, got {self.weight_init!r}")

    def _check_architecture_options(self) -> None:
        """Options of the other architecture must keep their defaults (they would do nothing)."""
        # JSON gives lists; keep a hashable tuple so configs compare equal after a round trip.
        object.__setattr__(self, "channel_mult", tuple(self.channel_mult))
        _check(all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                   for m in self.channel_mult),
               f"channel_mult must be integers >= 1, got {self.channel_mult}")
        _check(isinstance(self.attention, bool),
               f"attention must be true or false, got {self.attention!r}")
        _check(self.norm_groups >= 1, f"norm_groups must be >= 1, got {self.norm_groups}")
        _check(isinstance(self.middle_attention_only, bool),
               f"middle_attention_only must be true or false, got {self.middle_attention_only!r}")
        _check(self.downsample_padding in get_args(DownsamplePadding),
               f"downsample_padding must be one of {get_args(DownsamplePadding)}, got "
               f"{self.downsample_padding!r}")
        _check(self.decoder_res_blocks is None or self.decoder_res_blocks >= 1,
               f"decoder_res_blocks must be >= 1, got {self.decoder_res_blocks}")
        _check(self.latent_channels is None or self.latent_channels >= 1,
               f"latent_channels must be >= 1, got {self.latent_channels}")
        _check(0.0 < self.bn_momentum <= 1.0,
               f"bn_momentum must be in (0, 1], got {self.bn_momentum}")
        _check(self.bn_eps > 0.0, f"bn_eps must be > 0, got {self.bn_eps}")
        _check(self.upsample in get_args(Upsample),
               f"upsample must be one of {get_args(Upsample)}, got {self.upsample!r}")
        other = [f"{f.name} ({f.metadata['architecture']} only)" for f in fields(self)
                 if f.metadata.get("architecture") not in (None, self.architecture)
                 and getattr(self, f.name) != f.default]
        _check(not other, f"architecture {self.architecture!r} has no use for "
               f"{', '.join(other)}: leave it at its default, or choose that --architecture")
        if self.architecture != "vqgan":
            return
        _check(self.res_blocks >= 1, "vqgan needs res_blocks >= 1 (its residual blocks change "
               f"the width between levels), got {self.res_blocks}")
        mult, levels = self.channel_mult, self.downsamples + 1
        like = ",".join(map(str, (mult + mult[-1:] * levels)[:levels]))
        _check(not mult or len(mult) == levels,
               f"channel_mult {','.join(map(str, mult))} has {len(mult)} levels, i.e. "
               f"{len(mult) - 1} downsamplings, but downsamples is {self.downsamples}: give "
               f"{levels} values to --channel-mult (e.g. {like}), or --channel-mult alone (it "
               f"sets downsamples)")
        _check(self.attention or not self.middle_attention_only,
               "middle_attention_only places the attention that --attention adds: it needs "
               "--attention")
        widths = self.level_widths
        _check(all(w % self.norm_groups == 0 for w in widths),
               f"GroupNorm with norm_groups {self.norm_groups} needs every level's width to be a "
               f"multiple of it, but hidden_channels {self.hidden_channels} x channel_mult gives "
               f"{widths}: change --hidden-channels, or --norm-groups to a divisor of them all "
               f"(e.g. {math.gcd(*widths)})")

    def _check_quantizer_options(self) -> None:
        _check(isinstance(self.kmeans_init, bool), f"kmeans_init must be true or false, "
               f"got {self.kmeans_init!r}")
        _check(isinstance(self.cosine, bool), f"cosine must be true or false, got {self.cosine!r}")
        _check(self.restart_after >= 0, f"restart_after must be >= 0, got {self.restart_after}")
        _check(self.lookup_dim is None or self.lookup_dim >= 1,
               f"lookup_dim must be >= 1, got {self.lookup_dim}")
        _check(self.estimator in get_args(Estimator),
               f"estimator must be one of {get_args(Estimator)}, got {self.estimator!r}")
        _check(0.0 < self.ema_decay < 1.0, f"ema_decay must be in (0, 1), got {self.ema_decay}")
        _check(self.ema_epsilon > 0.0, f"ema_epsilon must be > 0, got {self.ema_epsilon}")
        # JSON gives lists; keep a hashable tuple so configs compare equal after a round trip.
        object.__setattr__(self, "fsq_levels", tuple(self.fsq_levels))
        _check(all(isinstance(n, int) and n >= 2 for n in self.fsq_levels),
               f"fsq_levels must be integers >= 2, got {self.fsq_levels}")
        object.__setattr__(self, "scales", tuple(self.scales))
        _check(all(isinstance(n, int) and not isinstance(n, bool) for n in self.scales),
               f"scales must be integers, got {self.scales}")
        if self.quantizer == "multiscale":
            self._check_scales()
        else:
            _check(not self.scales, f"scales are the multiscale quantizer's token map sides: "
                   f"quantizer {self.quantizer!r} has one {self.latent_size}x{self.latent_size} "
                   f"grid (drop --scales, or pass --quantizer multiscale)")
        if self.quantizer != "fsq":
            return
        _check(self.estimator == "ste", f"fsq has no codebook vectors to rotate encoder outputs "
               f"onto: estimator {self.estimator!r} applies to vq and ema only (use ste with fsq)")
        codebook_only = [name for name, on in (
            ("kmeans_init", self.kmeans_init), ("restart_after", self.restart_after > 0),
            ("cosine", self.cosine), ("lookup_dim", self.lookup_dim is not None)) if on]
        _check(not codebook_only, f"fsq has no learned codebook: {', '.join(codebook_only)} "
               f"do(es) not apply to it")
        product = math.prod(self.quantizer_levels)
        _check(product == self.codebook_size,
               f"fsq_levels {self.fsq_levels} give {product} codes but codebook_size is "
               f"{self.codebook_size}: the product of the levels must equal codebook_size")

    def _check_scales(self) -> None:
        scales, side = self.scales, self.latent_size
        _check(self.fsq_levels == (), "fsq_levels are fsq's: the multiscale quantizer has a "
               "learned codebook")
        # VAR's lookup: plain L2 in the latent space, the decoder's gradient passed to the encoder
        # at the summed map (no per-code snap to rotate; unit-norm codes cannot shrink with the
        # residual they quantize)
        other = [name for name, on in (("cosine", self.cosine),
                                       ("lookup_dim", self.lookup_dim is not None),
                                       ("estimator rotation", self.estimator != "ste")) if on]
        _check(not other, f"the multiscale quantizer looks codes up by L2 distance in the latent "
               f"space itself, straight-through at the summed map: {', '.join(other)} do(es) "
               f"not apply to it")
        if not scales:
            return
        text = ",".join(map(str, scales))
        _check(scales[0] >= 1 and all(a < b for a, b in zip(scales, scales[1:])),
               f"scales {text} must rise from at least 1, each side larger than the one before")
        _check(scales[-1] == side, f"scales {text} must end at the code grid's side {side} "
               f"(image size {self.image_size} / 2^{self.downsamples}): e.g. "
               f"{','.join(map(str, default_scales(side)))}")

    @property
    def quantizer_scales(self) -> tuple[int, ...]:
        """multiscale's token map sides: ``scales``, or :func:`default_scales` of the grid."""
        return self.scales or default_scales(self.latent_size)

    @property
    def quantizer_levels(self) -> tuple[int, ...]:
        """fsq's levels: ``fsq_levels``, or ``codebook_size`` factorised when none are given."""
        return self.fsq_levels or fsq_levels_for(self.codebook_size)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2**self.downsamples

    @property
    def decoder_blocks(self) -> int:
        """vqgan: residual blocks per decoder level: ``decoder_res_blocks``, else ``res_blocks``."""
        return self.decoder_res_blocks or self.res_blocks

    @property
    def level_widths(self) -> tuple[int, ...]:
        """vqgan: channels of each resolution level, full resolution first (hidden_channels x
        ``channel_mult``, or hidden_channels at every level when it is empty)."""
        mult = self.channel_mult or (1,) * (self.downsamples + 1)
        return tuple(self.hidden_channels * m for m in mult)


def architecture_options() -> tuple[str, ...]:
    """The fields of :class:`VQVAEConfig` that belong to one architecture (``resnet``'s BatchNorm,
    ``vqgan``'s levels, attention and GroupNorm); any other architecture keeps their defaults."""
    return tuple(f.name for f in fields(VQVAEConfig) if f.metadata.get("architecture"))


def quantizer_options() -> tuple[str, ...]:
    """The fields of :class:`VQVAEConfig` that belong to one quantizer (not to the model)."""
    return tuple(f.name for f in fields(VQVAEConfig) if f.metadata.get("quantizer_option"))


def _defaults(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: VQVAEConfig.__dataclass_fields__[name].default for name in names}


# VAR's schedules (Tian et al. 2024) for the grids it names; other sides: a geometric series.
KNOWN_SCALES = {8: (1, 2, 3, 4, 6, 8), 16: (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)}


def default_scales(side: int) -> tuple[int, ...]:
    """Token map sides from 1 to ``side`` for the multiscale quantizer: VAR's for 8 and 16,
    else about 2 log2(side) sides in a geometric series (32 -> 1,2,3,5,7,10,15,22,32)."""
    if side in KNOWN_SCALES:
        return KNOWN_SCALES[side]
    m = max(2, math.ceil(2 * math.log2(max(side, 2))))
    return tuple(sorted({round(side ** (i / (m - 1))) for i in range(m)} | {1, side}))


def fsq_levels_for(codebook_size: int) -> tuple[int, ...]:
    """``codebook_size`` as a product of about log8(K) levels, as equal as the factors allow
    (512 -> 8,8,8; 1000 -> 10,10,10; 64 -> 8,8; a prime K -> one channel of K levels)."""
    factors, n, p = [], codebook_size, 2
    while n > 1:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    channels = max(1, round(math.log(codebook_size, 8)))
    levels = [1] * channels
    for f in sorted(factors, reverse=True):  # largest factors first, each into the smallest bin
        levels[levels.index(min(levels))] *= f
    return tuple(sorted((n for n in levels if n > 1), reverse=True))


# --- presets ---------------------------------------------------------------------------------


def seed_model(image_size: int = 128, in_channels: int = 3) -> VQVAEConfig:
    """The blog post's VQ-VAE exactly: z_dim 128, 64 codes, beta 0.25, int(log2(size) - 4)
    blocks."""
    return VQVAEConfig(
        image_size=image_size, in_channels=in_channels, hidden_channels=128, downsamples=2,
        res_blocks=max(0, int(math.log2(image_size)) - 4), codebook_size=64, code_dim=128,
        beta=0.25, quantizer="vq", kmeans_init=False, restart_after=0, cosine=False,
        lookup_dim=None, weight_init="keras", bn_momentum=0.01, bn_eps=1e-3)


def default_model(image_size: int = 128, in_channels: int = 3) -> VQVAEConfig:
    """The seed's architecture with at least two residual blocks and PyTorch's BN/init defaults,
    and the quantizer that won benchmarks/quantizers.py (docs/quantizers.md): 512 cosine codes
    looked up in 8 dimensions, k-means init, restarted after 20 unused steps."""
    seed = seed_model(image_size, in_channels)
    return replace(seed, res_blocks=max(2, seed.res_blocks), weight_init="torch",
                   bn_momentum=0.1, bn_eps=1e-5, codebook_size=512, kmeans_init=True,
                   restart_after=20, cosine=True, lookup_dim=8)


def vqgan_model(image_size: int = 256, in_channels: int = 3) -> VQVAEConfig:
    """A VQGAN-class tokenizer (Esser et al. 2021) with the default preset's quantizer: widths
    128-128-256-512 (channel_mult 1,1,2,4), two GroupNorm residual blocks per level, attention at
    the lowest resolution. f8 from 64 px (a 16x16 grid at 128 px); smaller images drop the last
    levels so that the grid stays 8x8 (32 px: f4, channel_mult 1,1,2; 16 px: f2, 1,1), and so do
    sizes that 8 does not divide (100 px: f4)."""
    deepest = max(1, min(3, int(math.log2(image_size)) - 3))
    downsamples = next((d for d in range(deepest, 0, -1) if image_size % 2**d == 0), deepest)
    vqgan = dict(image_size=image_size, architecture="vqgan", hidden_channels=128,
                 downsamples=downsamples, channel_mult=(1, 1, 2, 4)[:downsamples + 1],
                 res_blocks=2, attention=True, norm_groups=32)
    # The default preset's quantizer and initialisation (its model built at a size it accepts);
    # its BatchNorm options belong to resnet: back to their (unused) defaults.
    return replace(default_model(128, in_channels), **(_defaults(architecture_options()) | vqgan))
