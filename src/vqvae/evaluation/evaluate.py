"""A trained stage-1 model scored on a whole split of its data (``vqvae eval``): held-out
metrics as JSON and the code usage histogram beside it."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from ..distributed import pick_device
from ..errors import ConfigError
from ..fileio import write_json
from ..generation.codes import load_trained
from ..store.runs import beside
from .metrics import score_autoencoder
from .plots import plot_code_usage


class RunScores(NamedTuple):
    scores: dict[str, float]  # PSNR, SSIM (with and without quantization), usage, perplexity, ...
    json: Path  # where they were written
    histogram: Path  # the code usage histogram

    def summary(self) -> str:
        """What ``vqvae eval`` prints: a line per score, then where they went."""
        return "\n".join([*(f"{k:18s} {v:.4f}" if isinstance(v, float) else f"{k:18s} {v}"
                             for k, v in self.scores.items()),
                           f"written to {self.json}", f"code usage histogram: {self.histogram}"])


def evaluate_run(run: str | Path, *, split: str = "test", data: str | None = None,
                 out: str | Path | None = None, device: str | torch.device = "auto"
                 ) -> RunScores:
    """Score the stage-1 model at ``run`` (a run or checkpoint folder) on every image of its
    data's ``split`` (or of ``data``); write the scores to ``out`` (default:
    ``RUN/eval_SPLIT.json``) and the usage histogram beside them."""
    out = Path(out or beside(run, f"eval_{split}.json"))
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the JSON file to write")
    device = pick_device(device)
    model, splits = load_trained(run, data, device)
    scores, counts = score_autoencoder(model, getattr(splits, split), device=device)
    write_json(out, {"split": split, **scores})
    return RunScores(scores, out, plot_code_usage(counts, out.with_name(f"code_usage_{split}.png"),
                                                  f"{split} code usage"))
