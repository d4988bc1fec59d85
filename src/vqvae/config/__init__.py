"""Typed, frozen configs for data, the VQ-VAE and its training, and the named presets.

Each config validates itself in ``__post_init__`` and round-trips through JSON, so the exact
config a model was trained with is saved next to its weights (``config.json``). One module per
concern; this package re-exports them all, so ``from vqvae.config import X`` is the one spelling.
"""

from ..errors import ConfigError
from .autoencoder import (Architecture, Estimator, QuantizerName, Upsample, VQVAEConfig, WeightInit,
                          architecture_options, default_model, default_scales, fsq_levels_for,
                          quantizer_options, seed_model, vqgan_model)
from .base import from_dict, to_dict
from .data import CacheMode, CropMode, DataConfig
from .loop import (RESUMABLE, CompileMode, GanLoss, LoopConfig, LRSchedule, Precision,
                   PriorTrainConfig, ReconLoss, TrainConfig, resumed)
from .prior import MaskGITBlocks, MaskSchedule, PriorConfig, PriorVariant, default_prior, seed_prior
from .run import (DEFAULT_PRIOR_TRAIN, DEFAULT_TRAIN, LARGE_CODE_SET, PRESETS, PRIOR_PRESETS,
                  SEED_PRIOR_TRAIN, SMALL_SET_LR, VQGAN_TRAIN, Preset, PresetName, PriorPresetName,
                  PriorRunConfig, RunConfig, prior_for_data, run_config)
from .sample import CHOICE_TEMPERATURE, SampleConfig, SamplePrecision, check_sampling

__all__ = [
    "ConfigError", "to_dict", "from_dict",
    # data
    "DataConfig", "CacheMode", "CropMode",
    # stage 1's model
    "VQVAEConfig", "Architecture", "QuantizerName", "WeightInit", "Estimator", "Upsample",
    "architecture_options", "quantizer_options", "fsq_levels_for", "default_scales", "seed_model",
    "default_model", "vqgan_model",
    # stage 2's model
    "PriorConfig", "PriorVariant", "MaskGITBlocks", "MaskSchedule", "seed_prior", "default_prior",
    # the loops
    "LoopConfig", "TrainConfig", "PriorTrainConfig", "RESUMABLE", "resumed", "Precision",
    "LRSchedule", "GanLoss", "ReconLoss", "CompileMode",
    # runs and presets
    "RunConfig", "PriorRunConfig", "Preset", "PresetName", "PriorPresetName", "PRESETS",
    "PRIOR_PRESETS", "VQGAN_TRAIN", "DEFAULT_TRAIN", "SEED_PRIOR_TRAIN", "DEFAULT_PRIOR_TRAIN",
    "SMALL_SET_LR", "LARGE_CODE_SET", "prior_for_data", "run_config",
    # sampling
    "SampleConfig", "SamplePrecision", "CHOICE_TEMPERATURE", "check_sampling",
]
