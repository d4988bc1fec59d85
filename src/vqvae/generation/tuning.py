"""Sampling settings chosen by measurement: a short sweep at the end of `vqvae train-prior` draws
code grids under a few temperatures and truncations (and guidance scales, for a conditional
prior) and keeps the setting whose grids lie closest to the held-out ones, by the Fréchet
distance of their pooled code embeddings; `vqvae sample` draws with it unless told otherwise.

The features need no classifier: each grid's codes looked up in the stage-1 codebook, projected
on the codebook's first principal axes and average-pooled to at most 4 x 4 cells. On the
Fashion-MNIST prior of docs/prior.md this distance ranks the settings as the classifier-feature
distance of decoded images does (docs/prior.md, "Sampling defaults, chosen per prior").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..config import SampleConfig
from ..errors import ConfigError
from ..evaluation.quality import frechet_distance
from ..fileio import write_json
from ..models.autoencoder import VQVAE
from ..models.prior import Prior
from ..models.quantizers.multiscale import MultiScaleQuantizer
from ..store import checkpoint as ckpt
from ..store import runs
from .codes import Codes, load_codes, load_stage1

SAMPLING = "sampling.json"  # the chosen settings, in the prior's run folder
FORMAT = "vqvae-sampling/1"
KNOBS = ("temperature", "top_k", "top_p", "guidance")
PLAIN = {"temperature": 1.0, "top_k": None, "top_p": None, "guidance": 1.0}
AXES = 8  # principal axes of the codebook the features keep
CELLS = 4  # the grid is average-pooled to at most CELLS x CELLS
GUIDANCE = (1.5, 2.0, 3.0)  # scales a conditional prior tries before the truncations


class Swept(NamedTuple):
    """A sweep's outcome: the chosen knobs, and every setting tried with its distance per draw."""

    chosen: dict[str, Any]
    tried: list[tuple[dict[str, Any], list[float]]]
    floor: float  # n training grids' distance to the held-out ones: a reference for the rest


@torch.no_grad()
def code_features(stage1: VQVAE, grids: torch.Tensor, axes: torch.Tensor) -> np.ndarray:
    """(N, h, w) code ids -> (N, AXES * cells) features: the codebook vectors, projected on
    ``axes`` (D, AXES), average-pooled to at most CELLS x CELLS."""
    out = []
    for part in grids.split(512):
        vectors = stage1.quantizer.indices_to_codes(part.long().to(axes.device))  # (n, D, h, w)
        z = torch.einsum("ndhw,dk->nkhw", vectors.float(), axes)
        cells = (min(CELLS, z.shape[-2]), min(CELLS, z.shape[-1]))
        out.append(F.adaptive_avg_pool2d(z, cells).flatten(1).cpu())
    return torch.cat(out).double().numpy()


@torch.no_grad()
def codebook_axes(stage1: VQVAE, size: int) -> torch.Tensor:
    """The first :data:`AXES` principal axes (D, k) of the ``size`` codebook vectors."""
    if isinstance(stage1.quantizer, MultiScaleQuantizer):  # its shared codebook, (K, D)
        vectors = stage1.quantizer.vq.codebook.detach().float()
    else:
        ids = torch.arange(size, device=next(stage1.parameters()).device).view(-1, 1, 1)
        vectors = stage1.quantizer.indices_to_codes(ids).flatten(1).float()  # (K, D)
    vectors = vectors - vectors.mean(0)
    _, _, v = torch.linalg.svd(vectors, full_matrices=False)
    return v[:min(AXES, v.shape[0])].T.contiguous()


def candidates(prior: Prior, guidance: float) -> list[dict[str, Any]]:
    """The settings tried after the guidance: plain, cooler and warmer, nucleus and top-k."""
    k = max(8, prior.cfg.codebook_size // 8)
    tries = [{}, {"temperature": 0.95}, {"temperature": 1.05}, {"top_p": 0.95}, {"top_k": k}]
    return [{**PLAIN, "guidance": guidance, **t} for t in tries]


@torch.inference_mode()
def sweep(prior: Prior, stage1: VQVAE, held: torch.Tensor, held_labels: torch.Tensor | None,
          train: torch.Tensor, *, n: int = 512, draws: int = 2, batch_size: int = 256,
          progress: bool = False) -> Swept:
    """Draw ``draws`` x ``n`` grids per setting (the same seeds for every setting) and keep the
    lowest mean distance to the held-out grids ``held``; a setting other than plain sampling
    wins only by more than twice the noise (the draws' spread, pooled over the settings): within
    it, plain stays. A conditional prior draws the held-out grids' classes and first picks a
    guidance scale the same way."""
    n = min(n, len(held))
    if n < 16:
        raise ConfigError(f"choosing sampling settings needs >= 16 held-out grids, got {n}")
    prior.eval()
    stage1.eval()
    axes = codebook_axes(stage1, prior.cfg.codebook_size)
    reference = code_features(stage1, held, axes)
    floor = frechet_distance(code_features(stage1, train[:n], axes), reference)
    labels = None if held_labels is None or not prior.cfg.num_classes else held_labels[:n]
    tried: list[tuple[dict[str, Any], list[float]]] = []
    settings = len(candidates(prior, 1.0)) + (len(GUIDANCE) + 1 if labels is not None else 0)
    bar = tqdm(total=settings * draws, desc="choose sampling settings", unit="draw",
               disable=not progress, leave=False)

    def measure(setting: dict[str, Any]) -> list[float]:
        distances = []
        for seed in range(draws):
            cfg = SampleConfig(n=n, batch_size=batch_size, seed=seed, **setting)
            grids = prior.generate(cfg, labels)
            distances.append(frechet_distance(code_features(stage1, grids, axes), reference))
            bar.set_postfix_str(f"{describe(setting)}: {np.mean(distances):.3f}")
            bar.update()
        tried.append((setting, distances))
        return distances

    def best(settings: list[dict[str, Any]]) -> dict[str, Any]:
        scores = [(setting, measure(setting)) for setting in settings]
        means = [float(np.mean(d)) for _, d in scores]
        # the draws' spread within a setting, pooled over all: the noise of one mean's difference
        noise = math.sqrt(float(np.mean([np.var(d, ddof=1) for _, d in scores])))
        at = int(np.argmin(means))
        return scores[at][0] if means[at] < means[0] - 2 * noise else scores[0][0]

    with bar:
        guidance = 1.0
        if labels is not None:
            guidance = best([{**PLAIN, "guidance": g} for g in (1.0, *GUIDANCE)])["guidance"]
        return Swept(best(candidates(prior, guidance)), tried, floor)


def describe(setting: dict[str, Any]) -> str:
    """'temperature 1, top-k 64, guidance 2' (the knobs sampling uses, in words)."""
    words = [f"temperature {setting['temperature']:g}"]
    words += [f"top-k {setting['top_k']}"] if setting.get("top_k") else []
    words += [f"top-p {setting['top_p']:g}"] if setting.get("top_p") else []
    words += ([f"guidance {setting['guidance']:g}"] if setting.get("guidance", 1.0) != 1.0
              else [])
    return ", ".join(words)


def write_sampling(run_dir: str | Path, swept: Swept) -> Path:
    """``RUN/sampling.json``: the chosen knobs, the table behind them and the reference."""
    record = {"format": FORMAT, "chosen": swept.chosen, "floor": swept.floor,
              "tried": [{"setting": s, "distances": d} for s, d in swept.tried]}
    return write_json(Path(run_dir) / SAMPLING, record)


def read_sampling(prior_run: str | Path) -> dict[str, Any]:
    """The knobs chosen for the prior of ``prior_run`` ({} when its run chose none: an older run,
    or a checkpoint outside a run folder); a damaged file is a one-line error."""
    run_dir = runs.find_run(prior_run)
    path = None if run_dir is None else Path(run_dir) / SAMPLING
    if path is None or not path.is_file():
        return {}
    try:
        record = json.loads(path.read_text())
        chosen = {k: record["chosen"][k] for k in KNOBS}
        if record.get("format") != FORMAT:
            raise ValueError(f"format {record.get('format')!r}")
        SampleConfig(**chosen)  # in range
    except (ValueError, KeyError, TypeError, ConfigError) as exc:
        raise ConfigError(f"{path}: not a sampling settings file ({exc}); delete it to sample "
                          f"with the plain settings") from None
    return chosen


def sample_config(prior_run: str | Path, **given: Any) -> SampleConfig:
    """The settings to sample ``prior_run`` with: those its training chose (:data:`SAMPLING`),
    with the fields in ``given`` (what the user set) taking precedence. A guidance scale only
    applies to draws given a class."""
    chosen = read_sampling(prior_run)
    if not (given.get("label") is not None or given.get("all_classes")):
        chosen.pop("guidance", None)
    return SampleConfig(**(chosen | given))


def tune_sampling(prior_run: str | Path, device: str | torch.device = "cpu", *,
                  n: int = 512, progress: bool = False, codes: Codes | None = None,
                  stage1: VQVAE | None = None) -> Swept:
    """Run :func:`sweep` for the prior of ``prior_run`` (the checkpoint ``vqvae sample`` uses) on
    its run's held-out codes, and write ``RUN/sampling.json``. ``codes`` and ``stage1``: the run's
    codes and stage-1 model when the caller holds them already (read from the run otherwise)."""
    run_dir = runs.find_run(prior_run)
    if run_dir is None:
        raise ConfigError(f"{prior_run}: not inside a prior's run folder")
    cfg = runs.read_run_config(prior_run, ckpt.PRIOR_KIND)
    codes = codes if codes is not None else load_codes(cfg.codes)
    held = codes.split("test")
    stage1 = stage1 if stage1 is not None else load_stage1(cfg, device)
    swept = sweep(ckpt.load_prior(prior_run, device), stage1,
                  held.codes, held.labels, codes.split("train").codes, n=n, progress=progress)
    write_sampling(run_dir, swept)
    return swept
