"""vqvae: turn a pile of images into a discrete visual vocabulary and back.

Stage 1 is a VQ-VAE (van den Oord et al., 2017): encoder -> vector quantizer -> decoder.
Stage 2 is an autoregressive Transformer prior over its code grids.
"""

__version__ = "0.1.0"

from .autoencoder import VQVAE, ResidualBlock, VQVAEOutput, build_quantizer  # noqa: E402
from .checkpoint import CheckpointError, load_autoencoder  # noqa: E402
from .config import (PRESETS, ConfigError, DataConfig, RunConfig, TrainConfig,  # noqa: E402
                     VQVAEConfig, default_model, seed_model)
from .data import DataError, ImageSet, Splits, load_splits, to_float, to_uint8  # noqa: E402
from .metrics import (CodeUsage, codebook_stats, evaluate_autoencoder, psnr,  # noqa: E402
                      score_autoencoder)
from .quantize import (QUANTIZERS, EMAVectorQuantizer, FiniteScalarQuantizer,  # noqa: E402
                       QuantizerOutput, VectorQuantizer)
from .sample import interpolation_grid, reconstruction_grid  # noqa: E402
from .train import Runtime, TrainResult, train_autoencoder  # noqa: E402
from .checkpoint import load_prior  # noqa: E402
from .codes import CodeSplit, Codes, encode_dataset, load_codes, save_codes  # noqa: E402
from .config import (PRIOR_PRESETS, PriorConfig, PriorRunConfig,  # noqa: E402
                     PriorTrainConfig, default_prior, seed_prior)
from .prior import Prior  # noqa: E402
from .sample import decode_codes, samples_grid  # noqa: E402
from .train_prior import load_prior_run_config, load_stage1, train_prior  # noqa: E402

__all__ = [
    "VQVAE", "VQVAEOutput", "ResidualBlock", "VectorQuantizer", "EMAVectorQuantizer",
    "FiniteScalarQuantizer", "QuantizerOutput", "QUANTIZERS", "build_quantizer",
    "VQVAEConfig", "DataConfig", "TrainConfig", "RunConfig", "PRESETS", "seed_model",
    "default_model", "ConfigError", "DataError", "CheckpointError", "ImageSet", "Splits",
    "load_splits", "to_float", "to_uint8", "load_autoencoder", "train_autoencoder", "Runtime",
    "TrainResult", "evaluate_autoencoder", "score_autoencoder", "CodeUsage", "codebook_stats",
    "psnr", "reconstruction_grid",
    "interpolation_grid",
    # stage 2
    "Prior", "PriorConfig", "PriorTrainConfig", "PriorRunConfig", "PRIOR_PRESETS", "seed_prior",
    "default_prior", "Codes", "CodeSplit", "encode_dataset", "load_codes", "save_codes",
    "load_prior", "load_prior_run_config", "load_stage1", "train_prior", "decode_codes",
    "samples_grid",
]
