"""The two-stage pipeline: a prior and the stage-1 model that decodes its codes, loaded once,
and what users do with them: encode, decode, sample, inpaint (taming-transformers' two-stage
split; diffusers' pipeline objects). ``vqvae sample`` and ``vqvae inpaint`` go through it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import PriorRunConfig, SampleConfig
from ..data.images import to_float
from ..data.sources import read_image, read_mask
from ..distributed import pick_device
from ..fileio import check_writable
from ..errors import ConfigError
from ..models.autoencoder import VQVAE
from ..models.prior import Prior
from ..store import checkpoint as ckpt
from ..store import runs
from .codes import Codes, CodeSplit, load_stage1
from .grids import decode_codes, save_png, tile
from .inpaint import Inpainted, check_ring, inpaint_codes
from .sample import Samples, draw, save_samples
from .tuning import sample_config


class Pipeline:
    """A trained prior with its stage-1 model (its fingerprint checked once, from what its
    checkpoint recorded): images <-> code grids, new images, inpainting."""

    def __init__(self, prior: Prior, stage1: VQVAE, run_cfg: PriorRunConfig,
                 name: str = "prior"):
        self.prior, self.stage1, self.run_cfg, self.name = prior, stage1, run_cfg, name

    @classmethod
    def from_run(cls, prior_run: str | Path, device: str | torch.device = "auto",
                 decoder: str | Path | None = None) -> Pipeline:
        """The prior of ``prior_run`` (a prior run folder or one of its checkpoints) and the
        stage-1 checkpoint it was trained on, or ``decoder``: one fine-tuned from it by
        ``vqvae finetune-decoder`` (same codes, sharper decoder)."""
        device = pick_device(device)
        run_cfg = runs.read_run_config(prior_run, ckpt.PRIOR_KIND)
        return cls(ckpt.load_prior(prior_run, device), load_stage1(run_cfg, device, decoder),
                   run_cfg, f"prior {prior_run}")

    @property
    def device(self) -> torch.device:
        return self.prior.head.weight.device

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, C, H, W) at the stage-1 model's size -> code grids (B, h, w)."""
        self.stage1.eval()
        return self.stage1.encode(to_float(images.to(self.device))).indices

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Code grids (B, h, w) -> uint8 images (B, C, H, W)."""
        return decode_codes(self.stage1, codes)

    def sample(self, cfg: SampleConfig = SampleConfig(), labels: torch.Tensor | None = None,
               **overrides: Any) -> Samples:
        """``cfg.n`` new images (``overrides`` replace fields of ``cfg``; ``labels``, default
        ``cfg``'s class or classes, for a conditional prior) and their codes, which name the
        stage-1 model that decodes them."""
        cfg = replace(cfg, **overrides) if overrides else cfg
        classes = self.prior.cfg.num_classes
        labels = cfg.labels(classes) if labels is None else labels
        images, codes = draw(self.prior, self.stage1, cfg, labels)
        names = tuple(str(i) for i in range(classes)) if classes else None
        split = CodeSplit(codes.cpu(), None if labels is None else torch.as_tensor(labels).cpu())
        return Samples(images, Codes({"samples": split}, self.prior.cfg.codebook_size,
                                     self.run_cfg.stage1, self.run_cfg.stage1_sha256, self.name,
                                     names, self.prior.cfg.scales or None))

    def inpaint(self, image: torch.Tensor, mask: torch.Tensor,
                cfg: SampleConfig = SampleConfig(), ring: int = 1) -> Inpainted:
        """Redraw the part of ``image`` (uint8 (C, H, W) at the stage-1 model's size) under
        ``mask`` ((H, W) bool, True = redraw) and ``ring`` code cells around it (a maskgit
        prior's parallel decoding, ``cfg.steps`` iterations)."""
        require_parallel(self.prior.cfg.variant, self.name)
        return inpaint_codes(self.prior, self.stage1, image, mask, cfg, ring)


def sample_images(prior_run: str | Path, cfg: SampleConfig | None = None,
                  device: str | torch.device = "auto") -> Samples:
    """New images from the prior of ``prior_run`` (a prior run folder or one of its checkpoints),
    decoded by the stage-1 checkpoint it was trained on (or ``cfg.decoder``); ``cfg`` defaults
    to the settings its training chose (:func:`vqvae.generation.tuning.sample_config`)."""
    cfg = cfg or sample_config(prior_run)
    return Pipeline.from_run(prior_run, device, cfg.decoder).sample(cfg)


def write_samples(prior_run: str | Path, cfg: SampleConfig | None = None,
                  out: str | Path | None = None, device: str | torch.device = "auto"
                  ) -> tuple[Samples, Path, Path]:
    """``vqvae sample``: :func:`sample_images` saved by :func:`save_samples` to ``out`` (default:
    ``RUN/sample``); the samples and the paths of the PNG grid and the codes."""
    samples = sample_images(prior_run, cfg, device)
    return (samples, *save_samples(samples, out or runs.beside(prior_run, "sample")))


def inpaint(prior_run: str | Path, image: torch.Tensor, mask: torch.Tensor,
            cfg: SampleConfig | None = None, ring: int = 1,
            device: str | torch.device = "auto") -> Inpainted:
    """:meth:`Pipeline.inpaint` with the maskgit prior of ``prior_run`` (``cfg``: default, the
    settings its training chose)."""
    _check_parallel(prior_run)  # before loading anything
    return Pipeline.from_run(prior_run, device).inpaint(image, mask,
                                                        cfg or sample_config(prior_run), ring)


def require_parallel(variant: str, name: str | Path) -> None:
    """Inpainting redraws codes given the others around them: a maskgit prior's parallel decoding,
    not an autoregressive prior's left-to-right one."""
    if variant != "maskgit":
        raise ConfigError(f"{name}: inpainting needs a parallel-decoding prior "
                          f"(train-prior --variant maskgit)")


def _check_parallel(prior_run: str | Path) -> None:
    """:func:`require_parallel` from the prior's saved config, before anything is loaded."""
    require_parallel(ckpt.load_model_config(ckpt.resolve(prior_run), ckpt.PRIOR_KIND).variant,
                     prior_run)


def inpaint_files(prior_run: str | Path, image_path: str | Path, mask_path: str | Path,
                  cfg: SampleConfig | None = None, out: str | Path | None = None,
                  ring: int = 1, device: str | torch.device = "auto") -> tuple[Path, Path]:
    """``vqvae inpaint``: :func:`inpaint` on an image file and a mask file of the same size
    (white = redraw), both resized to the model's size; writes the result (default:
    ``IMAGE.inpainted.png`` beside the input) and a comparison strip (original, mask, result).
    Returns both paths."""
    _check_parallel(prior_run)
    check_ring(ring)  # before loading the models
    out = Path(out) if out else Path(image_path).with_suffix(".inpainted.png")
    compare = out.with_name(out.stem + ".compare.png")
    for path in (out, compare):
        check_writable(path, "result PNG to write (e.g. result.png)")
    pipe = Pipeline.from_run(prior_run, device)
    size, channels = pipe.stage1.cfg.image_size, pipe.stage1.cfg.in_channels
    image = read_image(image_path, size, channels)[0]
    mask = read_mask(mask_path, size, like=image_path)
    done = pipe.inpaint(image, mask, cfg or sample_config(prior_run), ring)
    strip = torch.stack([image, torch.where(mask, 255, image).to(torch.uint8), done.image])
    return (save_png(tile(done.image[None], 1, min_tile=1, gap=0), out),
            save_png(tile(strip, 3), compare))
