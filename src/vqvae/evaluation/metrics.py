"""Reconstruction and codebook metrics: PSNR, SSIM, codebook usage, perplexity, bits per code.

SSIM: Wang et al., "Image Quality Assessment: From Error Visibility to Structural Similarity"
(2004), IEEE TIP 13(4).

Usage and perplexity are counted over a whole set of images, not per batch: a code counts as used
if any held-out vector maps to it. During training, :class:`CodeUsage` counts over a window of
recent steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..data.files import FileSet
from ..data.images import ImageSet, to_float
from ..distributed import all_reduce_sum, sum_over_ranks
from ..models.autoencoder import VQVAE


def psnr(mse: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB from mean squared errors of images spanning ``data_range`` ([-1, 1] -> 2)."""
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


# Wang et al.'s constants: an 11 x 11 Gaussian window of sigma 1.5, K1 = 0.01, K2 = 0.03.
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def ssim_window(height: int, width: int) -> int:
    """Side of the SSIM window for an image: 11, or the smaller image side rounded down to odd
    (8 x 8 digits: 7), so that small images still have at least one valid position."""
    side = min(SSIM_WINDOW, height, width)
    return side if side % 2 else side - 1


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Per-image SSIM (B,) of image batches (B, C, H, W) in [-data_range/2, data_range/2]
    (the package's [-1, 1] with the default ``data_range`` of 2).

    Wang et al. (2004): local means, variances and covariance under a Gaussian window (sigma
    1.5, normalised; population, not sample, statistics), SSIM at every valid position (no
    padding) of every channel, averaged over positions and channels. The window is 11 x 11, or
    shrunk to the image for images under 11 px (:func:`ssim_window`; sigma stays 1.5): such
    scores compare among themselves, not with 11-px-window SSIM. Computed in fp32.

    SSIM's luminance term is not shift-invariant and assumes intensities in [0, L]: the images
    are shifted by ``data_range / 2`` first, so [-1, 1] scores equal SSIM of the same images on
    [0, 255] with L = 255 (the usual convention), unlike SSIM of the raw [-1, 1] values.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim needs two (B, C, H, W) batches of one shape, got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.float() + data_range / 2, y.float() + data_range / 2  # -> [0, data_range]
    c = x.shape[1]
    side = ssim_window(x.shape[2], x.shape[3])
    g = torch.arange(side, dtype=torch.float32, device=x.device) - (side - 1) / 2
    g = torch.exp(-g.pow(2) / (2 * SSIM_SIGMA**2))
    g = g / g.sum()
    window = torch.outer(g, g).expand(5 * c, 1, side, side)  # one per channel of each moment
    # (B, 5C, H, W) -> (B, 5C, H', W'): local E[x], E[y], E[x^2], E[y^2], E[xy] of every channel
    moments = F.conv2d(torch.cat([x, y, x * x, y * y, x * y], 1), window, groups=5 * c)
    mu_x, mu_y, xx, yy, xy = moments.chunk(5, 1)
    var_x, var_y = xx - mu_x * mu_x, yy - mu_y * mu_y
    cov = xy - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)
             / ((mu_x * mu_x + mu_y * mu_y + c1) * (var_x + var_y + c2)))  # (B, C, H', W')
    return index.flatten(1).mean(1)


def codebook_stats(counts: torch.Tensor) -> dict[str, float]:
    """From per-code assignment counts (K,): usage %, dead codes, perplexity, bits per code."""
    counts = counts.double()
    total = counts.sum().clamp_min(1.0)
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()  # nats
    used = int((counts > 0).sum())
    return {"usage": 100.0 * used / counts.numel(), "used_codes": used,
            "dead_codes": counts.numel() - used, "perplexity": math.exp(entropy),
            "code_entropy_bits": entropy / math.log(2)}


class CodeUsage:
    """Per-code assignment counts over a sliding window of the last ``window`` training steps.

    Counts sit in a ring of at most ``MAX_BUCKETS`` rows (K,) of ``bucket`` steps each on the
    model's device, so memory stays small for large K and long windows; the window slides one
    bucket at a time (it spans between ``window - bucket`` and ``window`` steps). ``update``
    costs one bincount and no host sync, ``stats`` (usage %, dead codes, perplexity) syncs once.
    """

    MAX_BUCKETS = 64

    def __init__(self, codebook_size: int, window: int, device: torch.device | str = "cpu"):
        self.bucket = -(-window // self.MAX_BUCKETS)  # steps per ring row
        rows = -(-window // self.bucket)
        self.ring = torch.zeros(rows, codebook_size, dtype=torch.long, device=device)
        self.counts = torch.zeros(codebook_size, dtype=torch.long, device=device)
        self.slot, self.filled = 0, 0  # the row being filled, and its steps so far

    def update(self, indices: torch.Tensor) -> None:
        step = torch.bincount(indices.flatten(), minlength=self.counts.numel())
        if self.filled == 0:  # a new bucket replaces the oldest one
            self.counts -= self.ring[self.slot]
            self.ring[self.slot].zero_()
        self.ring[self.slot] += step
        self.counts += step
        self.filled += 1
        if self.filled == self.bucket:
            self.slot, self.filled = (self.slot + 1) % self.ring.shape[0], 0

    def stats(self) -> dict[str, float]:
        counts = all_reduce_sum(self.counts.clone())  # every rank's assignments
        return codebook_stats(counts.cpu())


class Evaluation(NamedTuple):
    metrics: dict[str, float]
    counts: torch.Tensor  # (K,) held-out assignments per code, for the usage histogram


@torch.no_grad()
def evaluate_autoencoder(model: VQVAE, images: torch.Tensor, batch_size: int = 256,
                         device: torch.device | str = "cpu") -> dict[str, float]:
    """Held-out metrics of ``model`` on uint8 images (N, C, H, W).

    ``psnr``/``mse`` go through the codebook (the real reconstruction); ``psnr_noq``/``mse_noq``
    decode the quantizer's continuous path (no snap to a code); ``ssim``/``ssim_noq`` likewise
    (:func:`ssim`, mean over images). PSNR is the mean of per-image PSNR on the [-1, 1] scale
    (identical to the [0, 255] scale); reconstructions are clamped to [-1, 1] first.
    """
    return score_autoencoder(model, images, batch_size, device).metrics


def _shard(data: torch.Tensor | None, rank: int, world_size: int) -> torch.Tensor | None:
    """Rank ``rank``'s contiguous slice of ``data`` (all of it in one process)."""
    return data if data is None or world_size == 1 else data.tensor_split(world_size)[rank]


@torch.no_grad()
def score_autoencoder(model: VQVAE, images: torch.Tensor | ImageSet | FileSet,
                      batch_size: int = 256, device: torch.device | str = "cpu", *,
                      rank: int = 0, world_size: int = 1, workers: int = 2) -> Evaluation:
    """:func:`evaluate_autoencoder`'s metrics and the per-code counts behind them, for uint8
    images (N, C, H, W) or an image set (a streamed one decoded by ``workers`` processes, its
    unreadable files left out).

    With ``world_size`` > 1 (a collective: every rank calls it with the same ``images``), each
    rank scores its slice and the sums and counts are summed over ranks.
    """
    images = images if isinstance(images, (ImageSet, FileSet)) else ImageSet(images)
    if world_size > 1:
        images = images.subset(torch.arange(len(images)).tensor_split(world_size)[rank])
    n = 0
    was_training = model.training
    model.eval()
    k = model.cfg.codebook_size
    counts = torch.zeros(k, dtype=torch.long, device=device)
    sums = dict.fromkeys(("mse", "psnr", "ssim", "mse_noq", "psnr_noq", "ssim_noq"), 0.0)
    for batch in images.batches(batch_size, workers=workers):
        x = to_float(batch.images.to(device))
        n += x.shape[0]
        z = model.encode_latents(x)
        q = model.quantizer(z)
        for name, z_hat in (("", q.quantized), ("_noq", model.quantizer.continuous(z))):
            # Score the picture that is shown: clamped like to_uint8 (a no-op after resnet's
            # tanh; vqgan's decoder is unbounded).
            rec = model.decode(z_hat).float().clamp(-1.0, 1.0)
            mse = (rec - x).pow(2).flatten(1).mean(1)  # (B,)
            sums["mse" + name] += mse.sum().item()
            sums["psnr" + name] += psnr(mse).sum().item()
            sums["ssim" + name] += ssim(rec, x).sum().item()
        counts += torch.bincount(q.indices.flatten(), minlength=k)
    model.train(was_training)
    sums = {**sums, "n": float(n)}
    sums = sum_over_ranks(sums, device) if world_size > 1 else sums
    n = int(sums.pop("n"))
    counts = (all_reduce_sum(counts) if world_size > 1 else counts).cpu()
    return Evaluation({**{name: value / max(n, 1) for name, value in sums.items()},
                       **codebook_stats(counts), "images": n}, counts)


@torch.no_grad()
def evaluate_prior(prior: torch.nn.Module, codes: torch.Tensor, labels: torch.Tensor | None = None,
                   batch_size: int = 256, device: torch.device | str = "cpu", *, rank: int = 0,
                   world_size: int = 1) -> dict[str, float]:
    """Held-out negative log-likelihood of code grids (N, h, w) in bits per code; for a maskgit
    prior, the cross-entropy of its masked codes under fixed (seeded) cosine-schedule masks,
    which is not a likelihood and compares only between maskgit priors.

    A conditional prior is scored with the true labels (``bits_per_code``) and with the null
    class (``bits_per_code_uncond``). ``world_size`` > 1: sharded like :func:`score_autoencoder`.
    """
    grids = int(codes.shape[0])
    first = 0 if world_size == 1 else sum(len(s) for s in codes.tensor_split(world_size)[:rank])
    codes, labels = _shard(codes, rank, world_size), _shard(labels, rank, world_size)
    was_training = prior.training
    prior.eval()
    conditional = labels is not None and prior.cfg.num_classes > 0
    keys = ("bits_per_code", "bits_per_code_uncond") if conditional else ("bits_per_code",)
    totals = dict.fromkeys([*keys, "weight"], 0.0)
    for start in range(0, codes.shape[0], batch_size):
        batch = codes[start:start + batch_size].to(device)
        batch_labels = labels[start:start + batch_size].to(device) if conditional else None
        for key, given in zip(keys, (batch_labels, None)):
            # the same masks for every rank count and both scorings: seeded by the first grid
            gen = torch.Generator().manual_seed(first + start)
            nats, weights = prior.loss_terms(batch, given, generator=gen)
            totals[key] += nats.double().sum().item()
            if key == "bits_per_code":
                totals["weight"] += (nats.numel() if weights is None
                                     else weights.double().sum().item())
    prior.train(was_training)
    totals = sum_over_ranks(totals, device) if world_size > 1 else totals
    weight = totals.pop("weight")
    return {**{k: v / max(weight, 1) / math.log(2) for k, v in totals.items()}, "grids": grids}
