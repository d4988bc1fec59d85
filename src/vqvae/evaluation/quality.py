"""Sample quality judged by a small classifier: its confidence, class coverage and a Fréchet
distance between its penultimate features (Heusel et al., 2017, arXiv:1706.08500).

This is a classifier-feature FID, not Inception FID: the features come from a small CNN trained
here on the data set's own training split, so its numbers compare only within one benchmark
(same data, size, classifier and sample count), never with published FIDs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from ..data.sources import BatchStream, to_float
from ..errors import ConfigError


@dataclass(frozen=True)
class ClassifierConfig:
    """How :func:`train_classifier` trains the judge: Adam on seeded batches, no augmentation."""

    steps: int = 600
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 1e-4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"classifier {name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"classifier lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"classifier weight_decay must be >= 0, got {self.weight_decay}")


class Classifier(nn.Module):
    """A small CNN: [conv3x3 -> ReLU -> max-pool 2] until the map is at most 4 px, then
    flatten -> linear -> ReLU (the features) -> linear (the class logits)."""

    def __init__(self, channels: int, image_size: int, classes: int, width: int = 32,
                 feature_dim: int = 64):
        super().__init__()
        if channels < 1 or image_size < 4 or classes < 2:
            raise ConfigError(f"classifier needs channels >= 1, image_size >= 4 and classes >= 2, "
                              f"got {channels}, {image_size}, {classes}")
        layers, c, s = [], channels, image_size
        while s > 4:  # 16 px: 2 stages, 32 px: 3; (B, c, s, s) -> (B, out, s // 2, s // 2)
            out = width if not layers else 2 * width
            layers += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
            c, s = out, s // 2
        self.body = nn.Sequential(*layers, nn.Flatten())
        self.embed = nn.Sequential(nn.Linear(c * s * s, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, classes)
        self.image_size, self.classes, self.feature_dim = image_size, classes, feature_dim

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (B, C, S, S) -> penultimate features (B, feature_dim)."""
        return self.embed(self.body(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, classes) logits


def train_classifier(images: torch.Tensor, labels: torch.Tensor, classes: int,
                     cfg: ClassifierConfig = ClassifierConfig(),
                     progress: bool = True) -> Classifier:
    """Train a :class:`Classifier` on uint8 images (N, C, S, S) and labels (N,) on the CPU, seeded
    by ``cfg.seed`` (weights and batches; the global RNG is left as it was), with a progress
    bar (``progress``). Eval mode."""
    if labels.shape != (images.shape[0],) or len(labels) == 0:
        raise ValueError(f"need one label per image, got {tuple(labels.shape)} for "
                         f"{images.shape[0]} images")
    if int(labels.min()) < 0 or int(labels.max()) >= classes:
        raise ValueError(f"labels must lie in [0, {classes - 1}]")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Classifier(images.shape[1], images.shape[-1], classes)
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, cfg.lr, total_steps=cfg.steps,
                                                    pct_start=0.1)
        stream = BatchStream(len(images), min(cfg.batch_size, len(images)), cfg.seed)
        model.train()
        for step in tqdm(range(cfg.steps), desc="train the judging classifier", unit="step",
                         disable=not progress, leave=False, dynamic_ncols=True,
                         mininterval=0.1 if sys.stderr.isatty() else 15.0):  # sparse in logs
            index = stream.indices(step)
            loss = F.cross_entropy(model(to_float(images[index])), labels[index])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.inference_mode()
def _features(classifier: Classifier, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    was_training = classifier.training
    classifier.eval()
    device = next(classifier.parameters()).device
    feats = torch.cat([classifier.features(to_float(images[s:s + batch_size].to(device))).cpu()
                       for s in range(0, images.shape[0], batch_size)])
    classifier.train(was_training)
    return feats  # (N, F) float32


def features(classifier: Classifier, images: torch.Tensor, batch_size: int = 512) -> np.ndarray:
    """uint8 images (N, C, S, S) -> the classifier's penultimate features, float64 (N, F)."""
    return _features(classifier, images, batch_size).double().numpy()


@torch.inference_mode()
def accuracy(classifier: Classifier, images: torch.Tensor, labels: torch.Tensor,
             batch_size: int = 512) -> float:
    """Share of uint8 images (N, C, S, S) whose top class is their label."""
    logits = classifier.head(_features(classifier, images, batch_size).to(
        next(classifier.parameters()).device)).cpu()
    return float((logits.argmax(1) == labels).double().mean())


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (N, F) and (M, F):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), covariances with ddof=1.

    tr((S_a S_b)^(1/2)) = tr((A S_b A)^(1/2)) with A = S_a^(1/2), a symmetric PSD matrix: its
    square root's trace is the sum of the square roots of its eigenvalues (no complex parts)."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two feature sets (N >= 2, F) of one width, got {a.shape} and "
                         f"{b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False, ddof=1), np.cov(b, rowvar=False, ddof=1)
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root_a = _psd_sqrt(cov_a)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None)).sum()
    d = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross)
    return max(d, 0.0)  # rounding can leave -1e-12 for identical sets


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def copied_share(grids: torch.Tensor, train: torch.Tensor) -> float:
    """Share of code grids (N, h, w) that are exactly one of the training grids (M, h, w): a
    prior that memorised its data draws copies, which a distance to the training images'
    features rewards (:func:`judge`'s ``frechet``), so read the two together."""
    if grids.shape[1:] != train.shape[1:] or grids.shape[0] == 0:
        raise ValueError(f"need sampled grids (N >= 1, h, w) shaped like the training grids "
                         f"{tuple(train.shape[1:])}, got {tuple(grids.shape)}")
    seen = {row.tobytes() for row in train.flatten(1).long().numpy()}
    return sum(row.tobytes() in seen for row in grids.flatten(1).long().numpy()) / grids.shape[0]


def judge(classifier: Classifier, images: torch.Tensor, reference: np.ndarray | None = None,
          threshold: float = 0.8, batch_size: int = 512) -> dict[str, float]:
    """How a classifier sees uint8 images (N, C, S, S): ``confidence`` (mean top-1 probability),
    ``confident`` (share with top-1 >= ``threshold``), ``coverage`` (classes predicted with
    top-1 >= ``threshold`` at least once), ``classes``, ``n`` and, given ``reference`` features
    (M, F), ``frechet`` (:func:`frechet_distance` of the images' features to them)."""
    if images.shape[0] == 0:
        raise ValueError("no images to judge")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must lie in (0, 1], got {threshold}")
    feats = _features(classifier, images, batch_size)  # (N, F)
    with torch.inference_mode():
        probs = classifier.head(feats.to(next(classifier.parameters()).device)).softmax(1).cpu()
    top, predicted = probs.max(1)  # (N,), (N,)
    sure = top >= threshold
    result = {"n": int(images.shape[0]), "confidence": float(top.double().mean()),
              "confident": float(sure.double().mean()),
              "coverage": int(predicted[sure].unique().numel()), "classes": classifier.classes}
    if reference is not None:
        result["frechet"] = frechet_distance(feats.double().numpy(), reference)
    return result
