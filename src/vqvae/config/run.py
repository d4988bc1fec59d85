"""A run's whole config per stage (``RunConfig``, ``PriorRunConfig``), the named presets that
start one (``PRESETS``, ``PRIOR_PRESETS``), and the default prior fitted to its data."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Literal

from .autoencoder import (VQVAEConfig, _defaults, architecture_options, default_model,
                          quantizer_options, seed_model, vqgan_model)
from .base import _check
from .data import DataConfig
from .loop import LoopConfig, PriorTrainConfig, TrainConfig
from .prior import PriorConfig, default_prior, seed_prior

PresetName = Literal["seed", "default", "vqgan"]  # stage 1
PriorPresetName = Literal["seed", "default"]


@dataclass(frozen=True)
class RunConfig:
    """Everything a stage-1 run needs; saved as ``RUN_DIR/config.json``."""

    data: DataConfig
    model: VQVAEConfig
    train: TrainConfig
    preset: PresetName = "default"


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
# and a tie at 3000 (docs/tokenizer.md, "Stage 1's pixel loss and schedule"). No --sharpen phase:
# on this recipe it raised the reconstruction distance (docs/tokenizer.md, "--sharpen").
DEFAULT_TRAIN = TrainConfig(recon_loss="l1", schedule="cosine")
PRESETS = {"seed": Preset(seed_model, TrainConfig()),
           "default": Preset(default_model, DEFAULT_TRAIN),
           "vqgan": Preset(vqgan_model, VQGAN_TRAIN)}


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
