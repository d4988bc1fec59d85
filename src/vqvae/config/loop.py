"""The training loops' configs: what both stages share (``LoopConfig``), stage 1's
(``TrainConfig``) and stage 2's (``PriorTrainConfig``), and which fields a resume may change."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Literal, get_args

from .base import _check, _help

Precision = Literal["auto", "fp32", "tf32", "bf16", "fp16"]
LRSchedule = Literal["constant", "cosine"]
GanLoss = Literal["hinge", "ns"]
ReconLoss = Literal["mse", "l1"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune"]


@dataclass(frozen=True)
class LoopConfig:
    """What both stages' training loops share (:func:`vqvae.training.loop.fit`): the budget, the
    batch, the step size, the seed, how often to save and score, where to run and what to log."""

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
    weight_ema: float = field(default=0.0, metadata=_help(
        "keep an exponential moving average of the weights with this decay (e.g. 0.999; 0: "
        "off): saved in every checkpoint beside the raw weights, and what held-out metrics, "
        "pictures, encode, sample and export use"))

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
        _check(0.0 <= self.weight_ema < 1.0,
               f"weight_ema must be in [0, 1), got {self.weight_ema}")


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
    sharpen = getattr(cfg.train, "sharpen", 0.0)
    if sharpen and (steps != cfg.train.steps
                    or changes.get("minutes", cfg.train.minutes) != cfg.train.minutes):
        warnings.warn(f"a new budget moves this run's --sharpen phase (the last {sharpen:.0%} of "
                      f"the budget): from here it starts at that share of the new one, and an "
                      f"earlier part of the run that trained the decoder alone may train the "
                      f"whole model again", UserWarning, stacklevel=2)
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
    sharpen: float = field(default=0.0, metadata=_help(
        "the last share of the budget (steps or --minutes) trains the decoder alone, encoder "
        "and codebook frozen so the codes stay, at a tenth of --lr and against a PatchGAN of "
        "weight --sharpen-gan (e.g. 0.25; measured in docs/tokenizer.md: not sharper than the "
        "default recipe on Fashion-MNIST); 0: off"))
    sharpen_gan: float = field(default=0.3, metadata=_help(
        "the adversarial weight of the --sharpen phase (times the adaptive weight; 0: the "
        "phase fine-tunes on the pixel loss alone)"))
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
                     "freq_alpha", "sharpen_gan"):
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
        _check(isinstance(self.diffaug, bool),
               f"diffaug must be true or false, got {self.diffaug!r}")
        _check(0.0 <= self.sharpen < 1.0, f"sharpen must be in [0, 1), got {self.sharpen}")
        _check(not (self.sharpen and self.gan_weight),
               "--sharpen trains a discriminator in its own phase (weight --sharpen-gan); with "
               "--gan-weight, one from --gan-start on: choose one (--sharpen 0 turns it off)")
        _check(not (self.sharpen and self.decoder_only),
               "a decoder-only fine-tune cannot have a --sharpen phase (it is one already): "
               "use --sharpen 0")
        _check(self.precision != "fp16" or not self.adversarial,
               "precision fp16 with a discriminator (--gan-weight, or --sharpen's "
               "--sharpen-gan) is not supported (it and the adaptive weight would need loss "
               "scaling of their own): use --precision bf16, or --sharpen-gan 0")
        _check(not self.decoder_only or bool(self.init_from and self.codes_sha256),
               "decoder_only needs the checkpoint to start from (init_from, codes_sha256)")
        _check(self.perceptual_weight == 0 or bool(self.perceptual_weights),
               "perceptual_weight needs --perceptual-weights PATH, a safetensors file of VGG16 + "
               "LPIPS weights (docs/perceptual.md says where they come from); nothing is "
               "downloaded")

    @property
    def adversarial(self) -> bool:
        """A discriminator trains: from ``gan_start``, or in the ``sharpen`` phase."""
        return self.adversary_weight > 0

    @property
    def adversary_weight(self) -> float:
        """The adversarial loss's weight (times the adaptive weight) while it applies."""
        return self.sharpen_gan if self.sharpen else self.gan_weight


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
    tune_sampling: int = field(default=512, metadata=_help(
        "at the end, draw this many grids (twice) under a few temperatures, truncations and "
        "guidance scales and keep the setting closest to the held-out codes for `vqvae "
        "sample` (RUN/sampling.json; docs/prior.md); 0: off"))

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(0.0 <= self.token_dropout < 1.0,
               f"token_dropout must be in [0, 1), got {self.token_dropout}")
        _check(self.weight_decay >= 0.0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.grad_clip >= 0.0, f"grad_clip must be >= 0, got {self.grad_clip}")
        _check(0.0 <= self.p_uncond < 1.0, f"p_uncond must be in [0, 1), got {self.p_uncond}")
        _check(self.tune_sampling == 0 or self.tune_sampling >= 16,
               f"tune_sampling must be 0 (off) or >= 16 grids, got {self.tune_sampling}")
