"""vqvae: turn a pile of images into a discrete visual vocabulary and back.

Stage 1 is a VQ-VAE (van den Oord et al., 2017): encoder -> vector quantizer -> decoder.
Stage 2 is a Transformer prior over its code grids (autoregressive, or MaskGIT's parallel one), or
over a multiscale tokenizer's token maps (next-scale, VAR).
Every CLI command is one of the functions below (``vqvae.cli`` only parses and prints).
"""

# first, before torch: Ctrl-C while the `vqvae` command imports is one line, not a traceback
from . import startup

# compression: the prior as an entropy coder
from .codec.compress import (Compressed, Decompressed, compress, compress_codes, compress_files,
                             decompress, decompress_codes, decompress_file)
from .codec.surprise import Surprise, SurpriseReport, surprise, write_surprise

# configs and presets
from .config import (PRESETS, PRIOR_PRESETS, DataConfig, LoopConfig, PriorConfig, PriorRunConfig,
                     PriorTrainConfig, RunConfig, SampleConfig, TrainConfig, VQVAEConfig,
                     default_model, default_prior, run_config, seed_model, seed_prior, vqgan_model)

# data
from .data.files import FileSet
from .data.images import ImageSet, to_float, to_uint8
from .data.shards import pack
from .data.sources import Splits, load_splits
from .distributed import Runtime
from .errors import CheckpointError, ConfigError, DataError, NonFiniteError, PerceptualWeightsError

# evaluation
from .evaluation.evaluate import RunScores, evaluate_run
from .evaluation.metrics import (CodeUsage, codebook_stats, evaluate_autoencoder, evaluate_prior,
                                 psnr, score_autoencoder, ssim)
from .evaluation.quality import (Classifier, ClassifierConfig, frechet_distance, judge,
                                 train_classifier)

# export to other runtimes
from .export import export_run
from .export.onnx import Parity, check_onnx

# generation: codes, grids, sampling, inpainting
from .generation.code_folders import encode_codes, encode_to_folder, read_code_folder
from .generation.codes import (Codes, CodeSplit, encode_dataset, encode_to_file, load_codes,
                               load_trained, save_codes)
from .generation.grids import (decode_codes, interpolation_grid, reconstruction_grid, samples_grid,
                               write_interpolation, write_reconstructions)
from .generation.inpaint import Inpainted
from .generation.pipeline import Pipeline, inpaint, inpaint_files, sample_images, write_samples
from .generation.tuning import sample_config, tune_sampling
from .generation.sample import Samples, load_samples, save_samples

# models
from .models.autoencoder import VQVAE, VQVAEOutput
from .models.lpips import LPIPS, load_perceptual
from .models.maskgit import MaskGITPrior
from .models.var import VARPrior
from .models.prior import Prior, build_prior
from .models.quantizers.fsq import FiniteScalarQuantizer
from .models.quantizers.multiscale import MultiScaleQuantizer, join_scales, split_scales
from .models.quantizers.vq import EMAVectorQuantizer, QuantizerOutput, VectorQuantizer

# the run report (vqvae report)
from .report.page import write_report

# checkpoints and run folders
from .store.checkpoint import from_pretrained, load_autoencoder, load_prior
from .store.diffusers import export_diffusers, load_diffusers

# training
from .training.driver import RunResult
from .training.stage1 import finetune_decoder, load_run_config, train_autoencoder
from .training.stage2 import load_prior_run_config, prior_run_config, prior_setup, train_prior

__version__ = "0.1.0"

startup.imported()

__all__ = [
    # configs
    "DataConfig", "VQVAEConfig", "TrainConfig", "RunConfig", "LoopConfig", "PriorConfig",
    "PriorTrainConfig", "PriorRunConfig", "SampleConfig", "PRESETS", "PRIOR_PRESETS",
    "run_config", "prior_run_config", "seed_model", "default_model", "vqgan_model", "seed_prior",
    "default_prior",
    # errors
    "ConfigError", "DataError", "CheckpointError", "NonFiniteError", "PerceptualWeightsError",
    # data
    "load_splits", "Splits", "ImageSet", "FileSet", "to_float", "to_uint8",
    # models
    "VQVAE", "VQVAEOutput", "VectorQuantizer", "EMAVectorQuantizer", "FiniteScalarQuantizer",
    "MultiScaleQuantizer", "split_scales", "join_scales", "VARPrior",
    "QuantizerOutput", "Prior", "MaskGITPrior", "build_prior", "LPIPS", "load_perceptual",
    "from_pretrained", "load_autoencoder", "load_prior", "load_run_config",
    "load_prior_run_config",
    # diffusers' VQModel folders, out and in (from_pretrained reads them too)
    "export_diffusers", "load_diffusers",
    # the commands, one function each (vqvae train, finetune-decoder, reconstruct, interpolate,
    # eval, pack, encode, train-prior, sample, inpaint, report, export; compress, decompress,
    # surprise below)
    "train_autoencoder", "finetune_decoder", "write_reconstructions", "write_interpolation",
    "evaluate_run", "pack", "encode_codes", "encode_to_file", "encode_to_folder",
    "read_code_folder", "prior_setup", "train_prior", "write_samples",
    "inpaint_files", "write_report", "export_run", "RunResult", "RunScores", "Runtime",
    # an ONNX export checked against its PyTorch model
    "check_onnx", "Parity",
    # the same in memory: a prior and its decoder loaded once
    "Pipeline",
    "encode_dataset", "load_trained", "Codes", "CodeSplit", "save_codes", "load_codes",
    "sample_images", "sample_config", "tune_sampling", "Samples", "save_samples", "load_samples",
    "inpaint", "Inpainted",
    "reconstruction_grid", "interpolation_grid", "samples_grid", "decode_codes",
    # compression and the surprise map (vqvae compress, decompress, surprise)
    "compress", "decompress", "compress_files", "decompress_file", "compress_codes",
    "decompress_codes", "Compressed", "Decompressed", "surprise", "write_surprise", "Surprise",
    "SurpriseReport",
    # metrics and sample quality
    "evaluate_autoencoder", "score_autoencoder", "evaluate_prior", "psnr", "ssim",
    "codebook_stats", "CodeUsage", "Classifier", "ClassifierConfig", "train_classifier",
    "frechet_distance", "judge",
]
