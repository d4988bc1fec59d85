"""vqvae: turn a pile of images into a discrete visual vocabulary and back.

Stage 1 is a VQ-VAE (van den Oord et al., 2017): encoder -> vector quantizer -> decoder.
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

__all__ = [
    "VQVAE", "VQVAEOutput", "ResidualBlock", "VectorQuantizer", "EMAVectorQuantizer",
    "FiniteScalarQuantizer", "QuantizerOutput", "QUANTIZERS", "build_quantizer",
    "VQVAEConfig", "DataConfig", "TrainConfig", "RunConfig", "PRESETS", "seed_model",
    "default_model", "ConfigError", "DataError", "CheckpointError", "ImageSet", "Splits",
    "load_splits", "to_float", "to_uint8", "load_autoencoder", "train_autoencoder", "Runtime",
    "TrainResult", "evaluate_autoencoder", "score_autoencoder", "CodeUsage", "codebook_stats",
    "psnr", "reconstruction_grid",
    "interpolation_grid",
]
