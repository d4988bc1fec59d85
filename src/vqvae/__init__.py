"""vqvae: turn a pile of images into a discrete visual vocabulary and back.

Stage 1 is a VQ-VAE (van den Oord et al., 2017): encoder -> vector quantizer -> decoder.
Stage 2 is an autoregressive Transformer prior over its code grids.
"""

__version__ = "0.1.0"

from .models.autoencoder import (QUANTIZERS, VQVAE, ResidualBlock, VQVAEOutput,  # noqa: E402
                          build_quantizer)
from .store.checkpoint import (CheckpointError, from_pretrained, load_autoencoder,  # noqa: E402
                               load_prior)
from .generation.codes import (CodeSplit, Codes, encode_dataset, encode_set, load_codes, load_stage1,  # noqa: E402
                    load_trained, save_codes)
from .config import (PRESETS, PRIOR_PRESETS, ConfigError, DataConfig, LoopConfig,  # noqa: E402
                     Preset, PriorConfig, PriorRunConfig, PriorTrainConfig, RunConfig,
                     SampleConfig, TrainConfig, VQVAEConfig, default_model, default_prior,
                     run_config, seed_model, seed_prior, vqgan_model)
from .data.sources import DataError, ImageSet, Splits, load_splits, to_float, to_uint8  # noqa: E402
from .data.files import FileSet  # noqa: E402
from .data.shards import pack  # noqa: E402
from .distributed import Runtime  # noqa: E402
from .models.quantizers.fsq import FiniteScalarQuantizer  # noqa: E402
from .evaluation.metrics import (CodeUsage, codebook_stats, evaluate_autoencoder, psnr,  # noqa: E402
                      score_autoencoder, ssim)
from .models.lpips import LPIPS, PerceptualWeightsError, load_perceptual  # noqa: E402
from .models.prior import Prior  # noqa: E402
from .evaluation.quality import (Classifier, ClassifierConfig, frechet_distance, judge,  # noqa: E402
                      train_classifier)
from .models.quantizers.vq import EMAVectorQuantizer, QuantizerOutput, VectorQuantizer  # noqa: E402
from .training.driver import RunResult  # noqa: E402
from .generation.sample import (Samples, decode_codes, interpolation_grid, load_samples,  # noqa: E402
                     reconstruction_grid, sample_images, samples_grid, save_samples)
from .training.stage1 import load_run_config, train_autoencoder  # noqa: E402
from .training.stage2 import load_prior_run_config, prior_run_config, train_prior  # noqa: E402

__all__ = [
    # stage 1
    "VQVAE", "VQVAEOutput", "ResidualBlock", "VectorQuantizer", "EMAVectorQuantizer",
    "FiniteScalarQuantizer", "QuantizerOutput", "QUANTIZERS", "build_quantizer",
    "VQVAEConfig", "DataConfig", "LoopConfig", "TrainConfig", "RunConfig", "Preset", "PRESETS",
    "run_config", "seed_model", "default_model", "vqgan_model", "ConfigError", "DataError",
    "CheckpointError",
    "ImageSet", "FileSet", "Splits", "load_splits", "pack", "to_float", "to_uint8",
    "load_autoencoder", "from_pretrained",
    "load_run_config", "load_trained", "train_autoencoder", "Runtime", "RunResult",
    "evaluate_autoencoder", "score_autoencoder", "CodeUsage", "codebook_stats", "psnr",
    "ssim", "reconstruction_grid", "interpolation_grid", "LPIPS", "load_perceptual",
    "PerceptualWeightsError",
    # stage 2
    "Prior", "PriorConfig", "PriorTrainConfig", "PriorRunConfig", "PRIOR_PRESETS", "seed_prior",
    "default_prior", "prior_run_config", "Codes", "CodeSplit", "encode_dataset", "encode_set",
    "load_codes",
    "save_codes", "load_prior", "load_prior_run_config", "load_stage1", "train_prior",
    "SampleConfig", "Samples", "sample_images", "save_samples", "load_samples", "decode_codes",
    "samples_grid",
    # sample quality
    "Classifier", "ClassifierConfig", "train_classifier", "frechet_distance", "judge",
]
