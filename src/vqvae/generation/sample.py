"""New images from a prior: prior -> code grids -> stage-1 decoder -> images, and their files
(a PNG grid and the codes).

Sampling follows taming-transformers' split: the prior draws codes and knows nothing about
pixels; the stage-1 model it was trained on (its fingerprint checked) decodes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from ..config import SampleConfig
from ..distributed import pick_device
from ..errors import ConfigError
from ..models.autoencoder import VQVAE
from ..models.prior import Prior
from ..store import checkpoint as ckpt
from ..store import runs
from .codes import Codes, CodeSplit, check_stage1, load_codes, load_stage1, save_codes
from .grids import decode_codes, samples_grid, save_png


class Samples(NamedTuple):
    images: torch.Tensor  # (n, C, H, W) uint8
    codes: Codes  # split "samples": the (n, h, w) code ids (and labels), with their stage 1


def draw(prior: Prior, stage1: VQVAE, cfg: SampleConfig,
         labels: torch.Tensor | int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``cfg.n`` new images: code grids drawn by ``prior`` (seeded by ``cfg.seed``; ``labels``,
    default :func:`sample_labels` of ``cfg``, for a conditional prior), decoded by ``stage1``.
    Returns uint8 images (n, C, H, W) and the codes (n, h, w)."""
    if labels is None:
        labels = sample_labels(cfg, prior.cfg.num_classes)
    codes = prior.generate(cfg.n, labels=labels, guidance=cfg.guidance,
                           temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                           generator=torch.Generator().manual_seed(cfg.seed),
                           batch_size=cfg.batch_size, use_cache=not cfg.no_cache,
                           steps=cfg.steps, precision=cfg.precision, graph=cfg.graph,
                           choice_temperature=cfg.choice_temperature)
    return decode_codes(stage1, codes), codes


def sample_labels(cfg: SampleConfig, classes: int) -> torch.Tensor | None:
    """The class of each of the ``cfg.n`` images (n,): ``cfg.label`` for all of them, or with
    ``cfg.all_classes`` 0, 1, ..., classes - 1, 0, 1, ...; None for unconditional draws.
    ``classes`` is the prior's number of classes (0: unconditional)."""
    flag = "--class" if cfg.label is not None else "--all-classes" if cfg.all_classes else None
    if flag and not classes:
        raise ConfigError(f"{flag} needs a class-conditional prior (train-prior --conditional)")
    if cfg.label is not None and cfg.label >= classes:
        raise ConfigError(f"--class {cfg.label} is out of range: this prior knows classes "
                          f"0..{classes - 1}")
    if cfg.label is not None:
        return torch.full((cfg.n,), cfg.label, dtype=torch.long)
    return torch.arange(cfg.n) % classes if cfg.all_classes else None


def sample_images(prior_run: str | Path, cfg: SampleConfig = SampleConfig(),
                  device: torch.device | str = "cpu") -> Samples:
    """New images from the prior of ``prior_run`` (a prior run folder or one of its checkpoints),
    decoded by the stage-1 checkpoint it was trained on (its fingerprint checked)."""
    run_cfg = runs.read_run_config(prior_run, ckpt.PRIOR_KIND)
    prior = ckpt.load_prior(prior_run, device)
    classes = prior.cfg.num_classes
    labels = sample_labels(cfg, classes)
    images, codes = draw(prior, load_stage1(run_cfg, device, cfg.decoder), cfg, labels)
    names = tuple(str(i) for i in range(classes)) if classes else None
    return Samples(images, Codes({"samples": CodeSplit(codes.cpu(), labels)},
                                 prior.cfg.codebook_size, run_cfg.stage1, run_cfg.stage1_sha256,
                                 f"prior {prior_run}", names))


def save_samples(samples: Samples, folder: str | Path) -> tuple[Path, Path]:
    """``folder/samples.png`` (a grid) and ``folder/samples.safetensors`` (the codes)."""
    folder = Path(folder)
    return (save_png(samples_grid(samples.images), folder / "samples.png"),
            save_codes(samples.codes, folder / "samples.safetensors"))


def load_samples(folder: str | Path, device: torch.device | str = "cpu") -> Samples:
    """What :func:`save_samples` wrote to ``folder``: the codes, decoded again by the stage-1
    checkpoint that made them (its fingerprint checked), so the images are the saved ones."""
    codes = load_codes(Path(folder) / "samples.safetensors")
    check_stage1(codes.stage1_sha256, codes.stage1, codes.stage1)
    model = ckpt.load_autoencoder(codes.stage1, device)
    return Samples(decode_codes(model, codes.split("samples").codes), codes)


def write_samples(prior_run: str | Path, cfg: SampleConfig = SampleConfig(),
                  out: str | Path | None = None, device: str | torch.device = "auto"
                  ) -> tuple[Samples, Path, Path]:
    """``vqvae sample``: :func:`sample_images` saved by :func:`save_samples` to ``out`` (default:
    ``RUN/sample``); the samples and the paths of the PNG grid and the codes."""
    samples = sample_images(prior_run, cfg, pick_device(device))
    return (samples, *save_samples(samples, out or runs.beside(prior_run, "sample")))
