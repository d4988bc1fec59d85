"""Typed, frozen configs for data, the VQ-VAE and its training, and the named presets.

Each config validates itself in ``__post_init__`` and round-trips through JSON, so the exact
config a model was trained with is saved next to its weights (``config.json``).
"""

from __future__ import annotations

import math
import types
import warnings
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from typing import Any, Callable, Literal, Union, get_args, get_origin, get_type_hints

from ..errors import ConfigError

QuantizerName = Literal["vq", "ema", "fsq"]
PresetName = Literal["seed", "default", "vqgan"]  # stage 1
PriorPresetName = Literal["seed", "default"]
Architecture = Literal["resnet", "vqgan"]
Precision = Literal["auto", "fp32", "tf32", "bf16", "fp16"]
SamplePrecision = Literal["fp32", "bf16", "fp16"]
WeightInit = Literal["keras", "torch"]
CacheMode = Literal["auto", "memory", "stream"]
CropMode = Literal["center", "random"]
Estimator = Literal["ste", "rotation"]
Upsample = Literal["transpose", "nearest"]
LRSchedule = Literal["constant", "cosine"]
GanLoss = Literal["hinge", "ns"]
ReconLoss = Literal["mse", "l1"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]



def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _help(text: str, **extra: Any) -> dict[str, Any]:
    return {"help": text, **extra}


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="digits", metadata=_help(
        "digits | fashion-mnist | mnist | a directory of images or IDX files | a .npy/.npz file",
        flag="data"))
    size: int = field(default=16, metadata=_help("image side in pixels (resized, centre-cropped)"))
    channels: int | None = field(default=None, metadata=_help(
        "1 (grayscale) or 3 (RGB); default: the source's own (1 for digits/IDX, 3 for folders)"))
    holdout: float = field(default=0.1, metadata=_help(
        "fraction held out for evaluation when the source has no test split of its own"))
    split_seed: int = field(default=0, metadata=_help("seed of the deterministic held-out split"))
    cache: CacheMode = field(default="auto", metadata=_help(
        "memory: decode every image into RAM before step 1 | stream: decode batches as they are "
        "needed, in worker processes (folders, shards) | auto: memory for arrays, IDX files and "
        "small folders, stream for large folders and shards"))
    crop: CropMode = field(default="center", metadata=_help(
        "training crop: center (the shorter side resized to size) | random (a random square "
        "covering 80-100%% of the shorter side); held-out images are always centre-cropped"))
    flip: bool = field(default=False, metadata=_help(
        "flip training images left-right at random (held-out images never)"))
    workers: int = field(default=2, metadata=_help(
        "worker processes decoding streamed images (0: decode in the training process); with "
        "shards, also the readers each rank splits its shards over"))

    def __post_init__(self) -> None:
        _check(bool(self.source), "data source is empty")
        _check(self.size >= 4, f"size must be at least 4 pixels, got {self.size}")
        _check(self.channels in (None, 1, 3), f"channels must be 1 or 3, got {self.channels}")
        _check(0.0 < self.holdout < 1.0, f"holdout must be in (0, 1), got {self.holdout}")
        _check(self.cache in get_args(CacheMode),
               f"cache must be one of {get_args(CacheMode)}, got {self.cache!r}")
        _check(self.crop in get_args(CropMode),
               f"crop must be one of {get_args(CropMode)}, got {self.crop!r}")
        _check(isinstance(self.flip, bool), f"flip must be true or false, got {self.flip!r}")
        _check(0 <= self.workers <= 64, f"workers must be in [0, 64], got {self.workers}")

    @property
    def augmented(self) -> bool:
        return self.crop == "random" or self.flip


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
    codebook_size: int = field(default=64, metadata=_help("number of codes K"))
    code_dim: int = field(default=128, metadata=_help("dimension D of each code"))
    beta: float = field(default=0.25, metadata=_help("commitment loss weight"))
    quantizer: QuantizerName = field(default="vq", metadata=_help(
        "vq: the seed's (codebook + commitment loss) | ema: codes are moving averages of their "
        "vectors, commitment loss only | fsq: finite scalar quantization, an implicit codebook"))
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
    weight_init: WeightInit = field(default="keras", metadata=_help(
        "keras: glorot-uniform convs, U(-0.05, 0.05) codebook (the seed's); torch: PyTorch defaults"))
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
        _check(self.hidden_channels >= 1, f"hidden_channels must be >= 1, got {self.hidden_channels}")
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

    @property
    def quantizer_levels(self) -> tuple[int, ...]:
        """fsq's levels: ``fsq_levels``, or ``codebook_size`` factorised when none are given."""
        return self.fsq_levels or fsq_levels_for(self.codebook_size)

    @property
    def latent_size(self) -> int:
        return self.image_size // 2**self.downsamples

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


def _defaults(names: tuple[str, ...]) -> dict[str, Any]:
    return {name: VQVAEConfig.__dataclass_fields__[name].default for name in names}


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


@dataclass(frozen=True)
class LoopConfig:
    """What both stages' training loops share (:func:`vqvae.loop.fit`): the budget, the batch, the
    step size, the seed, how often to save and score, where to run and what to log."""

    steps: int = field(default=2000, metadata=_help("total optimisation steps"))
    minutes: float | None = field(default=None, metadata=_help(
        "wall-clock training budget of the run in minutes, counted over all its invocations "
        "like --steps (stops early, saving a checkpoint)"))
    batch_size: int = field(default=64, metadata=_help(
        "examples per step and process: under torchrun the global batch is N x this"))
    lr: float = field(default=1e-3, metadata=_help("peak learning rate"))
    warmup: int = field(default=0, metadata=_help("steps of linear learning-rate warm-up"))
    schedule: LRSchedule = field(default="constant", metadata=_help(
        "learning rate after the warm-up: constant | cosine (to zero at the end of the run: "
        "at --steps, or when --minutes runs out first, by the share of the budget spent)"))
    seed: int = field(default=0, metadata=_help("seed for initialisation and data order"))
    every: int = field(default=200, metadata=_help(
        "steps between checkpoints, sample grids and held-out metrics"))
    eval_count: int = field(default=2048, metadata=_help(
        "held-out examples (images, or code grids for a prior) scored at each --every "
        "(0 = all of them)"))
    grid: int = field(default=8, metadata=_help("sample grids are grid x grid images"))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | cuda:N | mps"))
    precision: Precision = field(default="auto", metadata=_help(
        "auto (tf32 on CUDA, fp32 elsewhere) | fp32 (strict, also on CUDA) | tf32 (CUDA: TF32 "
        "matmuls and convolutions) | bf16 (autocast; the quantizer's lookup, statistics and "
        "losses stay fp32; weights and checkpoints are fp32) | fp16 (the same with fp16 and "
        "dynamic loss scaling, for GPUs without bf16)"))
    deterministic: bool = field(default=False, metadata=_help(
        "deterministic CUDA kernels, so that a resumed run continues exactly as an "
        "uninterrupted one (slower; a CPU is deterministic already)"))
    keep: int = field(default=2, metadata=_help(
        "newest checkpoints kept (older ones are pruned, except --keep-every and those that codes "
        "or a prior depend on)"))
    keep_every: int = field(default=0, metadata=_help(
        "also keep every checkpoint whose step is a multiple of this (0 = none)"))
    tensorboard: bool = field(default=False, metadata=_help(
        "also log scalars and sample grids to RUN_DIR/tensorboard (needs the tensorboard "
        "package: pip install 'vqvae[tensorboard]')"))

    def __post_init__(self) -> None:
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.minutes is None or self.minutes > 0, f"minutes must be > 0, got {self.minutes}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.lr > 0.0, f"lr must be > 0, got {self.lr}")
        _check(self.warmup >= 0, f"warmup must be >= 0, got {self.warmup}")
        _check(self.schedule in get_args(LRSchedule),
               f"schedule must be one of {get_args(LRSchedule)}, got {self.schedule!r}")
        _check(self.every >= 1, f"every must be >= 1, got {self.every}")
        _check(self.eval_count >= 0, f"eval_count must be >= 0, got {self.eval_count}")
        _check(self.grid >= 2, f"grid must be >= 2, got {self.grid}")
        _check(self.precision in get_args(Precision),
               f"precision must be one of {get_args(Precision)}, got {self.precision!r}")
        _check(isinstance(self.deterministic, bool),
               f"deterministic must be true or false, got {self.deterministic!r}")
        _check(self.keep >= 1, f"keep must be >= 1, got {self.keep}")
        _check(self.keep_every >= 0, f"keep_every must be >= 0, got {self.keep_every}")
        _check(isinstance(self.tensorboard, bool),
               f"tensorboard must be true or false, got {self.tensorboard!r}")


# Loop fields a resumed run may change (the rest is the run's identity); batch_size so that a
# resume with another number of processes can keep the global batch (N x batch_size).
RESUMABLE = frozenset({"steps", "minutes", "device", "batch_size", "tensorboard", "keep",
                       "keep_every"})


def resumed(cfg: Any, **changes: Any) -> Any:
    """A saved run config (stage 1 or 2) with resumable loop fields changed; anything else is an
    error (it would silently not apply to a run that already has its model and data)."""
    fixed = sorted(set(changes) - RESUMABLE)
    _check(not fixed, f"with --resume only {', '.join(sorted(RESUMABLE))} may be given, not "
           f"{', '.join(fixed)}: the rest is the run's own config")
    steps = changes.get("steps", cfg.train.steps)
    if cfg.train.schedule == "cosine" and steps != cfg.train.steps:
        warnings.warn(f"--steps {steps} changes this run's cosine schedule (it anneals to zero at "
                      f"step {cfg.train.steps}): from here the rate follows a cosine over "
                      f"{steps} steps, not the one an uninterrupted run of {steps} would have "
                      f"had", UserWarning, stacklevel=2)
    minutes = changes.get("minutes", cfg.train.minutes)
    if cfg.train.schedule == "cosine" and minutes != cfg.train.minutes:
        was = ("no time budget" if cfg.train.minutes is None
               else f"it anneals to zero when its {cfg.train.minutes:g} minutes are spent")
        warnings.warn(f"--minutes {minutes:g} changes this run's cosine schedule ({was}): from "
                      f"here the rate follows the share of {minutes:g} minutes spent",
                      UserWarning, stacklevel=2)
    return replace(cfg, train=replace(cfg.train, **changes))


@dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """Stage 1's loop: Adam on the VQ-VAE loss."""

    channels_last: bool = field(default=True, metadata=_help(
        "keep images and activations in channels-last memory (on: 1.2-1.4x faster training on a "
        "CPU, docs/benchmarks.md)"))
    compile: bool = field(default=False, metadata=_help(
        "torch.compile the autoencoder for training (off: no faster on a CPU, and a compile "
        "of 10-30 s first, docs/benchmarks.md)"))
    compile_mode: CompileMode = field(default="default", metadata=_help(
        "torch.compile's mode with --compile: default | reduce-overhead (CUDA graphs: small "
        "steps that are launch-bound on a GPU) | max-autotune"))
    recon_loss: ReconLoss = field(default="mse", metadata=_help(
        "the pixel reconstruction loss: mse (the seed's) | l1 (mean absolute error, VQGAN's; "
        "the default preset's; docs/tokenizer.md)"))
    freq_weight: float = field(default=0.0, metadata=_help(
        "focal frequency loss weight (Jiang et al. 2021): the error in the Fourier domain, "
        "each frequency weighted by its own error, added to the pixel loss; needs no weights "
        "(docs/tokenizer.md); 0: off"))
    freq_alpha: float = field(default=1.0, metadata=_help(
        "the focal frequency loss's focusing exponent: 0 weighs every frequency alike (then "
        "the loss is the MSE), larger puts more on the worst ones"))
    gan_weight: float = field(default=0.0, metadata=_help(
        "adversarial loss weight, times the adaptive weight (reconstruction / adversarial "
        "gradient norm at the decoder's last layer); 0: off. VQGAN-style runs use 0.1-0.8"))
    gan_start: int = field(default=0, metadata=_help(
        "step at which the PatchGAN discriminator and the adversarial loss start"))
    gan_loss: GanLoss = field(default="hinge", metadata=_help(
        "hinge | ns (non-saturating)"))
    disc_lr: float | None = field(default=None, metadata=_help(
        "the discriminator's Adam learning rate (default: --lr)"))
    disc_channels: int = field(default=64, metadata=_help(
        "channels of the discriminator's first layer (doubled per layer, at most 8x)"))
    disc_layers: int = field(default=3, metadata=_help(
        "stride-2 layers of the discriminator (fewer when the image is small: 16 px -> 2)"))
    lecam: float = field(default=0.0, metadata=_help(
        "LeCAM regularisation weight of the discriminator (e.g. 0.001; 0: off)"))
    diffaug: bool = field(default=False, metadata=_help(
        "DiffAugment (colour, translation, cutout) on what the discriminator sees"))
    perceptual_weight: float = field(default=0.0, metadata=_help(
        "LPIPS perceptual loss weight (needs --perceptual-weights; 0: off)"))
    perceptual_weights: str | None = field(default=None, metadata=_help(
        "a safetensors file of VGG16 + LPIPS weights (docs/perceptual.md; nothing is "
        "downloaded)"))
    init_from: str | None = field(default=None, metadata=_help(
        "the stage-1 checkpoint whose weights the run starts from", cli=False))
    decoder_only: bool = field(default=False, metadata=_help(
        "train the decoder alone: encoder and codebook frozen (vqvae finetune-decoder)",
        cli=False))
    codes_sha256: str | None = field(default=None, metadata=_help(
        "the fingerprint of the stage-1 checkpoint whose codes this model's codes equal "
        "(a decoder-only fine-tune keeps them)", cli=False))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.batch_size >= 2, f"batch_size must be >= 2 (BatchNorm), got {self.batch_size}")
        for name in ("gan_weight", "gan_start", "lecam", "perceptual_weight", "freq_weight",
                     "freq_alpha"):
            _check(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _check(self.compile_mode in get_args(CompileMode),
               f"compile_mode must be one of {get_args(CompileMode)}, got {self.compile_mode!r}")
        _check(self.recon_loss in get_args(ReconLoss),
               f"recon_loss must be one of {get_args(ReconLoss)}, got {self.recon_loss!r}")
        _check(self.gan_loss in get_args(GanLoss),
               f"gan_loss must be one of {get_args(GanLoss)}, got {self.gan_loss!r}")
        _check(self.disc_lr is None or self.disc_lr > 0, f"disc_lr must be > 0, got {self.disc_lr}")
        _check(self.disc_channels >= 1 and self.disc_layers >= 1,
               f"disc_channels and disc_layers must be >= 1, got {self.disc_channels}, "
               f"{self.disc_layers}")
        _check(isinstance(self.diffaug, bool), f"diffaug must be true or false, got {self.diffaug!r}")
        _check(self.precision != "fp16" or self.gan_weight == 0,
               "precision fp16 with --gan-weight is not supported (the discriminator and the "
               "adaptive weight would need loss scaling of their own): use --precision bf16")
        _check(not self.decoder_only or bool(self.init_from and self.codes_sha256),
               "decoder_only needs the checkpoint to start from (init_from, codes_sha256)")
        _check(self.perceptual_weight == 0 or bool(self.perceptual_weights),
               "perceptual_weight needs --perceptual-weights PATH, a safetensors file of VGG16 + "
               "LPIPS weights (docs/perceptual.md says where they come from); nothing is "
               "downloaded")

    @property
    def adversarial(self) -> bool:
        return self.gan_weight > 0

@dataclass(frozen=True)
class RunConfig:
    """Everything a stage-1 run needs; saved as ``RUN_DIR/config.json``."""

    data: DataConfig
    model: VQVAEConfig
    train: TrainConfig
    preset: PresetName = "default"


# --- presets ---------------------------------------------------------------------------------


def seed_model(image_size: int = 128, in_channels: int = 3) -> VQVAEConfig:
    """The blog post's VQ-VAE exactly: z_dim 128, 64 codes, beta 0.25, int(log2(size) - 4) blocks."""
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


@dataclass(frozen=True)
class Preset:
    """A named starting point of one stage: its model config for the data's shape (a function of
    image size and channels, or of codebook size, grid and classes) and its loop config."""

    model: Callable[..., Any]
    train: LoopConfig


# VQGAN-class tokenizers train with Adam around 1e-4 (LlamaGen: 1e-4) on small per-device batches.
VQGAN_TRAIN = TrainConfig(batch_size=16, lr=1e-4)
# The default recipe: the L1 pixel loss and a cosine schedule. Against the seed's MSE at a constant
# rate: +1.5 dB on 64-px photo tiles, -36% reconstruction distance on Fashion-MNIST at 1200 steps
# and a tie at 3000 (docs/tokenizer.md, "Stage 1's pixel loss and schedule").
DEFAULT_TRAIN = TrainConfig(recon_loss="l1", schedule="cosine")
PRESETS = {"seed": Preset(seed_model, TrainConfig()),
           "default": Preset(default_model, DEFAULT_TRAIN),
           "vqgan": Preset(vqgan_model, VQGAN_TRAIN)}


def quantizer_options() -> tuple[str, ...]:
    """The fields of :class:`VQVAEConfig` that belong to one quantizer (not to the model)."""
    return tuple(f.name for f in fields(VQVAEConfig) if f.metadata.get("quantizer_option"))


def run_config(preset: PresetName = "default", data: DataConfig | None = None,
               model: dict[str, Any] | None = None,
               train: dict[str, Any] | None = None) -> RunConfig:
    """A stage-1 run config: ``preset``'s model for ``data``, with fields of ``model`` and
    ``train`` overridden (what ``vqvae train`` builds from its options)."""
    _check(preset in PRESETS, f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    data = data or DataConfig()
    given = dict(model or {})
    base = PRESETS[preset].model(data.size, data.channels or 3)
    if given.get("quantizer", base.quantizer) != base.quantizer:
        # The preset's quantizer options belong to its quantizer: another one starts clean.
        base = replace(base, **_defaults(quantizer_options()))
    if given.get("quantizer", base.quantizer) == "fsq" and "fsq_levels" in given:
        given.setdefault("codebook_size", math.prod(given["fsq_levels"]))
    if given.get("architecture", base.architecture) != base.architecture:
        # Likewise the preset's BatchNorm or level options belong to its architecture.
        base = replace(base, **_defaults(architecture_options()))
    if given.get("channel_mult"):
        given.setdefault("downsamples", len(given["channel_mult"]) - 1)
    return RunConfig(data=data, model=replace(base, **given),
                     train=replace(PRESETS[preset].train, **(train or {})), preset=preset)


# --- JSON round trip -------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
    return asdict(cfg)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a JSON value has a field's type (int for float is fine; bool is not a number)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return value in args
    if origin in (Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_fits(v, args[0]) for v in value)
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, annotation) if isinstance(annotation, type) else True


def _describe(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_describe(args[0])}"
    return "null" if annotation is type(None) else getattr(annotation, "__name__", str(annotation))


def from_dict(cls: type, data: dict[str, Any], what: str | None = None) -> Any:
    """Build a config dataclass from a dict, refusing unknown keys with a clear message."""
    what = what or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a JSON object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{what}: unknown field(s) {', '.join(unknown)}")
    hints = get_type_hints(cls)
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                raise ConfigError(f"{what}: missing field {f.name!r}")
            continue
        value = data[f.name]
        sub = hints[f.name]
        if isinstance(sub, type) and hasattr(sub, "__dataclass_fields__"):
            value = from_dict(sub, value, f"{what}.{f.name}")
        elif not _fits(value, sub):
            raise ConfigError(f"{what}: {f.name} must be {_describe(sub)}, got "
                              f"{type(value).__name__} {value!r}")
        kwargs[f.name] = value
    try:
        return cls(**kwargs)
    except TypeError as e:  # e.g. a value of the wrong JSON type reaching a comparison
        raise ConfigError(f"{what}: {e}") from None


# --- stage 2: the prior ----------------------------------------------------------------------

PriorVariant = Literal["seed", "gpt", "maskgit"]
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
        "(vqvae sample --steps); the default preset picks seed or gpt from the codes"))
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

    @property
    def seq_len(self) -> int:
        return self.height * self.width


@dataclass(frozen=True)
class PriorTrainConfig(LoopConfig):
    """Stage 2's loop: AdamW with warm-up, weight decay and clipping on next-code cross-entropy."""

    steps: int = field(default=5000, metadata=LoopConfig.__dataclass_fields__["steps"].metadata)
    every: int = field(default=500, metadata=LoopConfig.__dataclass_fields__["every"].metadata)
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay on matrices"))
    grad_clip: float = field(default=0.0, metadata=_help("gradient-norm clip, 0 = none"))
    p_uncond: float = field(default=0.1, metadata=_help(
        "conditional priors: probability of training with the null class (for guidance)"))
    token_dropout: float = field(default=0.0, metadata=_help(
        "probability of replacing each input code by a random one while training (targets "
        "stay true): against overfitting small data sets"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.token_dropout < 1.0,
               f"token_dropout must be in [0, 1), got {self.token_dropout}")
        _check(self.weight_decay >= 0.0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0.0, f"grad_clip must be >= 0, got {self.grad_clip}")
        _check(0.0 <= self.p_uncond < 1.0, f"p_uncond must be in [0, 1), got {self.p_uncond}")


@dataclass(frozen=True)
class PriorRunConfig:
    """Everything a stage-2 run needs; saved as ``RUN_DIR/config.json``.

    ``codes`` is the codes file trained on; ``stage1`` the stage-1 checkpoint folder that decodes
    the samples and ``stage1_sha256`` its fingerprint (sha256 of its model.safetensors).
    """

    model: PriorConfig
    train: PriorTrainConfig
    codes: str
    stage1: str
    stage1_sha256: str
    preset: PriorPresetName = "default"


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


# The seed's optimiser: Adam at Keras' default 1e-3, batch 32, no schedule.
SEED_PRIOR_TRAIN = PriorTrainConfig(batch_size=32, lr=1e-3, warmup=0, weight_decay=0.0,
                                    grad_clip=0.0)
# AdamW at 3e-3 (a small pre-norm model takes it; 2e-3 on small code sets, prior_for_data) with
# a short warm-up, then a cosine to zero at the end of the run, weight decay on matrices and
# gradient clipping; batch 16: at a few hundred CPU steps more updates beat larger ones.
DEFAULT_PRIOR_TRAIN = PriorTrainConfig(batch_size=16, lr=3e-3, warmup=10, schedule="cosine",
                                       weight_decay=0.01, grad_clip=1.0)
SMALL_SET_LR = 2e-3  # the default prior's learning rate on a small code set (prior_for_data)
PRIOR_PRESETS = {"seed": Preset(seed_prior, SEED_PRIOR_TRAIN),
                 "default": Preset(default_prior, DEFAULT_PRIOR_TRAIN)}

# Training codes (grids x codes per grid) from which on the default prior needs no dropout: the
# budgets it is tuned for see such a set less than once (Fashion-MNIST's 60,000 grids of 8x8 are
# 3.8M codes; 5 CPU minutes saw 17k grids), while the 1,617 digit grids of 4x4 (26k codes) are
# seen dozens of times and overfit (docs/prior.md).
LARGE_CODE_SET = 1_000_000


def prior_for_data(model: PriorConfig, train: PriorTrainConfig,
                   train_grids: int) -> tuple[PriorConfig, PriorTrainConfig]:
    """The default prior fitted to its training codes. On a large set: the seed's post-norm
    blocks at the default's width and no dropout (which only slows learning within any budget
    that sees the data a few times); a step costs half a GPT block's, and on Fashion-MNIST it
    beat both the GPT stack and the seed's prior at every CPU budget measured; a maskgit prior
    (``--variant maskgit``) gets them too, bidirectional (at 2,000 steps its samples were closer
    to the data than on GPT blocks, in half the time). On a small set, seen many times over: the
    GPT stack (it overfits less there) with dropout 0.1, token dropout 0.1 and a lower learning
    rate (on the digits at 4e-3 its samples were far worse)."""
    if train_grids * model.seq_len >= LARGE_CODE_SET:
        return (replace(model, variant="seed", maskgit_blocks="seed", dropout=0.0),
                replace(train, token_dropout=0.0))
    return (replace(model, dropout=0.1),
            replace(train, token_dropout=0.1, lr=min(train.lr, SMALL_SET_LR)))


# --- sampling --------------------------------------------------------------------------------


# Parallel decoding: Gumbel noise on the confidences at the first iteration, annealed to 0 at the
# last. MaskGIT used 4.5 on 16x16 grids; on the 8x8 and 4x4 grids measured here 10 draws better
# samples (a more random unmasking order; docs/prior.md, "Decoding settings").
CHOICE_TEMPERATURE = 10.0


def check_sampling(temperature: float, top_k: int | None, top_p: float | None,
                   guidance: float, choice_temperature: float = CHOICE_TEMPERATURE) -> None:
    """The sampling knobs' valid ranges, for :class:`SampleConfig` and ``Prior.generate`` alike."""
    _check(math.isfinite(temperature) and temperature >= 0,
           f"temperature must be a finite number >= 0, got {temperature}")
    _check(top_k is None or top_k >= 1, f"top_k must be >= 1, got {top_k}")
    _check(top_p is None or 0.0 < top_p <= 1.0, f"top_p must be in (0, 1], got {top_p}")
    _check(math.isfinite(guidance), f"guidance must be a finite number, got {guidance}")
    _check(math.isfinite(choice_temperature) and choice_temperature >= 0,
           f"choice_temperature must be a finite number >= 0, got {choice_temperature}")


@dataclass(frozen=True)
class SampleConfig:
    """How ``vqvae sample`` (:func:`vqvae.sample.sample_images`) draws new images from a prior."""

    n: int = field(default=64, metadata=_help(
        "images to draw, laid out ceil(sqrt(n)) per row (64: an 8 x 8 grid)"))
    temperature: float = field(default=1.0, metadata=_help("0 = greedy"))
    top_k: int | None = field(default=None, metadata=_help("keep only the k most probable codes"))
    top_p: float | None = field(default=None, metadata=_help(
        "keep the smallest set of codes with probability mass >= p"))
    label: int | None = field(default=None, metadata=_help(
        "class id to draw (class-conditional priors)", flag="class"))
    all_classes: bool = field(default=False, metadata=_help(
        "draw the classes in turn: image i gets class i mod classes (--n 100: each row 0-9)"))
    guidance: float = field(default=1.0, metadata=_help(
        "classifier-free guidance scale with --class or --all-classes, 1 = none"))
    seed: int = field(default=0, metadata=_help("random seed: the same seed draws the same images"))
    batch_size: int = field(default=64, metadata=_help("grids drawn at once"))
    steps: int = field(default=12, metadata=_help(
        "maskgit priors: parallel decoding iterations (autoregressive priors draw one code per "
        "step whatever this says)"))
    choice_temperature: float = field(default=CHOICE_TEMPERATURE, metadata=_help(
        "maskgit priors: Gumbel noise on the confidences at the first iteration, annealed to 0 "
        "(0: most confident codes first; large: a random order; MaskGIT's paper used 4.5)"))
    decoder: str | None = field(default=None, metadata=_help(
        "decode with this stage-1 run or checkpoint instead of the prior's own: one fine-tuned "
        "from it by `vqvae finetune-decoder` (same codes, sharper decoder)"))
    no_cache: bool = field(default=False, metadata=_help(
        "recompute the whole prefix at every step (the seed's way; slow, the same codes)"))
    precision: SamplePrecision = field(default="fp32", metadata=_help(
        "fp32 | bf16 | fp16: the prior's forward passes under autocast (codes are drawn from "
        "fp32 probabilities)"))
    graph: bool = field(default=False, metadata=_help(
        "autoregressive priors on CUDA: replay each one-code step from a CUDA graph over a "
        "static KV cache (fewer kernel launches; on a CPU the same step runs uncaptured)"))

    def __post_init__(self) -> None:
        _check(self.n >= 1, f"n must be >= 1, got {self.n}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        _check(self.precision in get_args(SamplePrecision),
               f"precision must be one of {get_args(SamplePrecision)}, got {self.precision!r}")
        _check(isinstance(self.graph, bool), f"graph must be true or false, got {self.graph!r}")
        check_sampling(self.temperature, self.top_k, self.top_p, self.guidance,
                       self.choice_temperature)
        _check(self.label is None or self.label >= 0, f"--class must be >= 0, got {self.label}")
        _check(self.label is None or not self.all_classes,
               "--class and --all-classes exclude each other")
        _check(self.guidance == 1.0 or self.label is not None or self.all_classes,
               "--guidance needs --class or --all-classes")
