"""The sampling config (``SampleConfig``: how ``vqvae sample`` draws images from a prior) and the
sampling knobs' valid ranges (``check_sampling``), shared with ``Prior.generate``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from .base import _check, _help

SamplePrecision = Literal["fp32", "bf16", "fp16"]


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
    """How ``vqvae sample`` (:func:`vqvae.generation.pipeline.sample_images`) draws new images
    from a prior."""

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

    def labels(self, classes: int) -> torch.Tensor | None:
        """The class of each of the ``n`` images (n,): ``label`` for all of them, or with
        ``all_classes`` 0, 1, ..., classes - 1, 0, 1, ...; None for unconditional draws.
        ``classes`` is the prior's number of classes (0: unconditional)."""
        flag = ("--class" if self.label is not None else "--all-classes" if self.all_classes
                else None)
        _check(self.guidance == 1.0 or flag is not None,
               "--guidance needs --class or --all-classes")
        _check(not flag or bool(classes),
               f"{flag} needs a class-conditional prior (train-prior --conditional)")
        _check(self.label is None or self.label < classes, f"--class {self.label} is out of "
               f"range: this prior knows classes 0..{classes - 1}")
        if self.label is not None:
            return torch.full((self.n,), self.label, dtype=torch.long)
        return torch.arange(self.n) % classes if self.all_classes else None
