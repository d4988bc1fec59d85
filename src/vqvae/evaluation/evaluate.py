"""A trained stage-1 model scored on a whole split of its data (``vqvae eval``): held-out
metrics as JSON and the code usage histogram beside it."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from ..distributed import pick_device
from ..errors import ConfigError
from ..fileio import write_json
from ..data.sources import load_whole
from ..generation.codes import load_trained, stage1_data
from ..store.checkpoint import load_autoencoder, resolve
from ..store.runs import beside
from .metrics import score_autoencoder
from .plots import plot_code_usage


class RunScores(NamedTuple):
    scores: dict[str, float]  # PSNR, SSIM (with and without quantization), usage, perplexity, ...
    json: Path  # where they were written
    histogram: Path  # the code usage histogram
    measured_on: str = ""  # which images, in words

    def summary(self) -> str:
        """What ``vqvae eval`` prints: the images, a line per score, then where they went."""
        return "\n".join([f"measured on {self.measured_on}",
                           *(f"{k:18s} {v:.4f}" if isinstance(v, float) else f"{k:18s} {v}"
                             for k, v in self.scores.items()),
                           f"written to {self.json}", f"code usage histogram: {self.histogram}"])


def evaluate_run(run: str | Path, *, split: str = "test", data: str | None = None,
                 out: str | Path | None = None, device: str | torch.device = "auto"
                 ) -> RunScores:
    """Score the stage-1 model at ``run`` (a run or checkpoint folder) on every image of its
    data's ``split`` (or every image of ``data``, another source: a test split of its own when
    ``split`` is test and it has one); write the scores to ``out`` (default:
    ``RUN/eval_SPLIT.json``) and the usage histogram beside them."""
    out = Path(out or beside(run, f"eval_{split}.json"))
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the JSON file to write")
    device = pick_device(device)
    if data is None:
        model, splits = load_trained(run, None, device)
        images = getattr(splits, split)
        measured_on = (f"the {split} split of the run's data" + (
            f" ({splits.held_out})" if split == "test" and splits.held_out else ""))
    else:
        model = load_autoencoder(resolve(run), device)
        images = load_whole(stage1_data(run, model, data), split)
        measured_on = f"every image of {data}"
    scores, counts = score_autoencoder(model, images, device=device)
    write_json(out, {"split": split, "measured_on": measured_on, **scores})
    return RunScores(scores, out, plot_code_usage(counts, out.with_name(f"code_usage_{split}.png"),
                                                  f"{split} code usage"), measured_on)
