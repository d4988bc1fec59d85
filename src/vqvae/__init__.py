"""vqvae: turn a pile of images into a discrete visual vocabulary and back.

Stage 1 is a VQ-VAE (van den Oord et al., 2017): encoder -> vector quantizer -> decoder.
"""

__version__ = "0.1.0"

from .autoencoder import VQVAE, ResidualBlock, VQVAEOutput  # noqa: E402
from .checkpoint import CheckpointError, load_autoencoder  # noqa: E402
from .config import (PRESETS, ConfigError, DataConfig, RunConfig, TrainConfig,  # noqa: E402
                     VQVAEConfig, default_model, seed_model)
from .data import DataError, ImageSet, Splits, load_splits, to_float, to_uint8  # noqa: E402
from .metrics import codebook_stats, evaluate_autoencoder, psnr  # noqa: E402
from .quantize import QUANTIZERS, QuantizerOutput, VectorQuantizer  # noqa: E402
from .sample import interpolation_grid, reconstruction_grid  # noqa: E402
from .train import Runtime, TrainResult, train_autoencoder  # noqa: E402

__all__ = [
    "VQVAE", "VQVAEOutput", "ResidualBlock", "VectorQuantizer", "QuantizerOutput", "QUANTIZERS",
    "VQVAEConfig", "DataConfig", "TrainConfig", "RunConfig", "PRESETS", "seed_model",
    "default_model", "ConfigError", "DataError", "CheckpointError", "ImageSet", "Splits",
    "load_splits", "to_float", "to_uint8", "load_autoencoder", "train_autoencoder", "Runtime",
    "TrainResult", "evaluate_autoencoder", "codebook_stats", "psnr", "reconstruction_grid",
    "interpolation_grid",
]
