"""Pictures of training: loss and metric curves, and the codebook usage histogram, as PNGs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(train: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], path: Path,
                losses: Sequence[str] = ("mse_x", "mse_e", "mse_z"),
                metrics: Sequence[tuple[str, str]] = (("psnr", "test PSNR (dB)"),
                                                      ("usage", "codebook usage (%)"),
                                                      ("perplexity", "perplexity"),
                                                      ("dead_codes", "dead codes"))) -> Path:
    """One row of panels: the training loss terms (log scale), then each held-out metric."""
    panels = 1 + len(metrics)
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4), squeeze=False)
    ax = axes[0, 0]
    steps = [r["step"] for r in train]
    for name in losses:
        values = [r.get(name) for r in train]
        if steps and all(v is not None and v > 0 for v in values):
            ax.plot(steps, values, label=name, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("training losses")
    if ax.lines:
        ax.legend()
    for ax, (key, title) in zip(axes[0, 1:], metrics):
        points = [(r["step"], r[key]) for r in evals if key in r]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3, label="held-out")
        window = [(r["step"], r[f"window_{key}"]) for r in train if f"window_{key}" in r]
        if window:  # the same statistic over the recent training window
            ax.plot(*zip(*window), linewidth=1, alpha=0.7, label="training window")
            ax.legend()
        ax.set_xlabel("step")
        ax.set_title(title)
    return _save(fig, path)


def plot_code_usage(counts: torch.Tensor, path: Path, title: str = "held-out code usage") -> Path:
    """Per-code assignment counts (K,), sorted from most to least used, on a log scale; dead
    codes are the red stretch at the right."""
    counts = counts.detach().cpu().double()
    k = counts.numel()
    ordered = counts.sort(descending=True).values.numpy()
    used = int((counts > 0).sum())
    p = counts[counts > 0] / counts.sum().clamp_min(1.0)
    perplexity = float(torch.exp(-(p * p.log()).sum())) if used else 0.0
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if used:  # one filled step artist, not K bars: cheap for large codebooks
        ax.stairs(ordered[:used], [i - 0.5 for i in range(used + 1)], fill=True,
                  color="tab:blue")
    if used < k:
        ax.axvspan(used - 0.5, k - 0.5, color="tab:red", alpha=0.25, label=f"{k - used} dead")
        ax.legend(loc="upper right")
    ax.set_yscale("log")
    ax.set_xlim(-0.5, k - 0.5)
    ax.set_xlabel("codes, most used first")
    ax.set_ylabel("assignments")
    ax.set_title(f"{title}: {used}/{k} used ({100 * used / k:.1f}%), perplexity {perplexity:.1f}",
                 fontsize=9)
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
