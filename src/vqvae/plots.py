"""Training curves as a PNG: loss terms per step and held-out metrics per evaluation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(train: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]], path: Path,
                losses: Sequence[str] = ("mse_x", "mse_e", "mse_z"),
                metrics: Sequence[tuple[str, str]] = (("psnr", "test PSNR (dB)"),
                                                      ("usage", "codebook usage (%)"),
                                                      ("perplexity", "perplexity"))) -> Path:
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
            ax.plot(*zip(*points), marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_title(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    os.replace(tmp, path)
    return path
