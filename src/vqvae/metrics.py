"""Reconstruction and codebook metrics: PSNR, codebook usage, perplexity, bits per code.

Usage and perplexity are counted over a whole set of images, not per batch: a code counts as used
if any held-out vector maps to it. During training, :class:`CodeUsage` counts over a window of
recent steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .autoencoder import VQVAE
from .files import FileSet
from .images import ImageSet, to_float
from .distributed import all_reduce_sum, sum_over_ranks


def psnr(mse: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """PSNR in dB from mean squared errors of images spanning ``data_range`` ([-1, 1] -> 2)."""
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


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
    decode the quantizer's continuous path (no snap to a code). PSNR is the mean of per-image PSNR on the [-1, 1] scale
    (identical to the [0, 255] scale).
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
    sums = {"mse": 0.0, "psnr": 0.0, "mse_noq": 0.0, "psnr_noq": 0.0}
    for batch in images.batches(batch_size, workers=workers):
        x = to_float(batch.images.to(device))
        n += x.shape[0]
        z = model.encode_latents(x)
        q = model.quantizer(z)
        for name, rec in (("", model.decode(q.quantized)), ("_noq", model.decode(model.quantizer.continuous(z)))):
            mse = (rec.float() - x).pow(2).flatten(1).mean(1)  # (B,)
            sums["mse" + name] += mse.sum().item()
            sums["psnr" + name] += psnr(mse).sum().item()
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
