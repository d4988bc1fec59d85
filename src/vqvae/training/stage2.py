"""Stage-2 training: the prior's setup, step and save hook over :func:`vqvae.loop.fit`.

Teacher forcing with next-code cross-entropy, as the seed; held-out negative log-likelihood is
logged in bits per code. Run folders, checkpoints, resume, budgets, logs and data parallelism are
the shared loop's (:mod:`vqvae.runs`); nothing here comes from stage 1's trainer.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import loop
from ..store import runs
from ..store.checkpoint import (CHECKPOINTS, PRIOR_KIND, needs, protect, step_folders, step_name,
                         step_of, unprotect)
from ..models.autoencoder import VQVAE
from ..generation.codes import Codes, check_stage1, load_codes, load_stage1, save_codes
from ..config import (PRIOR_PRESETS, ConfigError, PriorConfig, PriorPresetName, PriorRunConfig,
                     SampleConfig, prior_for_data)
from ..data.sources import BatchStream, DataError
from ..distributed import Runtime, data_parallel, main_does, pick_device
from ..data.loader import RESIDENT_BYTES
from ..evaluation.metrics import evaluate_prior
from ..evaluation.plots import plot_curves
from ..precision import autocast, loss_scaler, numerics
from ..models.prior import Prior, build_prior
from ..generation.sample import draw, samples_grid, save_png
from .schedule import RunClock, Schedule

CODES_FILE = "codes.safetensors"  # codes encoded on the fly are kept here, for resume


def load_prior_run_config(path: str | Path) -> PriorRunConfig:
    """The config of the prior run folder holding ``path`` (the run or one of its checkpoints)."""
    return runs.read_run_config(path, PRIOR_KIND)


def prior_run_config(codes: Codes, codes_path: str = "", preset: PriorPresetName = "default",
                     conditional: bool = False, model: dict[str, Any] | None = None,
                     train: dict[str, Any] | None = None) -> PriorRunConfig:
    """A prior run config for ``codes``: ``preset``'s model sized to their vocabulary, grid and
    (``conditional``) classes, with fields of ``model`` and ``train`` overridden. An empty
    ``codes_path`` keeps the codes in the run folder."""
    if preset not in PRIOR_PRESETS:
        raise ConfigError(f"preset must be one of {sorted(PRIOR_PRESETS)}, got {preset!r}")
    if conditional and not codes.num_classes:
        raise ConfigError("--conditional needs class labels, and these codes have none")
    h, w = codes.grid
    chosen = PRIOR_PRESETS[preset]
    base = chosen.model(codes.codebook_size, h, w, codes.num_classes if conditional else 0)
    base_train = chosen.train
    if preset == "default":  # the seed stays the blog post's prior whatever the data
        base, base_train = prior_for_data(base, base_train, len(codes.split("train")))
    model = dict(model or {})
    if "dropout" not in model and seed_blocks(replace(base, **model)):
        model["dropout"] = 0.0  # the seed's blocks have no dropout to keep
    chosen_model = replace(base, **model)
    # Checked for new runs only: run configs saved before this check still load.
    if "maskgit_blocks" in model and chosen_model.variant != "maskgit":
        raise ConfigError(f"--maskgit-blocks is for --variant maskgit; the "
                          f"{chosen_model.variant!r} prior is named by its blocks")
    if "mask_schedule" in model and chosen_model.variant != "maskgit":
        raise ConfigError(f"--mask-schedule is for --variant maskgit; the "
                          f"{chosen_model.variant!r} prior predicts every code")
    if seed_blocks(chosen_model) and chosen_model.dropout:
        raise ConfigError(f"the seed's blocks have no dropout, got dropout "
                          f"{chosen_model.dropout}: pass --variant gpt (--maskgit-blocks gpt) "
                          f"for dropout")
    return PriorRunConfig(chosen_model, replace(base_train, **(train or {})),
                          codes_path, codes.stage1, codes.stage1_sha256, preset)


def seed_blocks(model: PriorConfig) -> bool:
    """Whether a prior is built of the seed's blocks (autoregressive or maskgit)."""
    return model.variant == "seed" or (model.variant == "maskgit"
                                       and model.maskgit_blocks == "seed")


def prior_summary(cfg: PriorRunConfig) -> str:
    """One line on what a run will train: the blocks, size and recipe its preset and data chose."""
    m, t = cfg.model, cfg.train
    blocks = {"seed": "the seed's post-norm blocks", "gpt": "pre-norm GPT blocks",
              "maskgit": f"bidirectional {'seed' if m.maskgit_blocks == 'seed' else 'GPT'} "
                         f"blocks (maskgit)"}[m.variant]
    return (f"{cfg.preset} preset: {blocks}, d_model {m.d_model}, layers {m.layers}, heads "
            f"{m.heads}, dropout {m.dropout:g}, token dropout {t.token_dropout:g}; lr {t.lr:g} "
            f"({t.schedule}), batch {t.batch_size}")


def check_compatible(model: PriorConfig, codes: Codes) -> None:
    """The prior's vocabulary, grid and classes must be those of the codes."""
    if model.codebook_size != codes.codebook_size:
        raise DataError(f"the codes use {codes.codebook_size} codes, the prior "
                        f"{model.codebook_size}")
    if (model.height, model.width) != codes.grid:
        raise DataError(f"the codes are {codes.grid[0]}x{codes.grid[1]} grids, the prior models "
                        f"{model.height}x{model.width}")
    if model.num_classes and model.num_classes != codes.num_classes:
        raise DataError(f"the prior conditions on {model.num_classes} classes, the codes have "
                        f"{codes.num_classes or 'no labels'}")


class PriorLoss(nn.Module):
    """The training loss as a module's forward, so DistributedDataParallel (which hooks
    ``forward``) can wrap it: (B, h, w) codes -> mean nats over the codes the prior predicts
    (all of them, or a maskgit prior's masked ones)."""

    def __init__(self, prior: nn.Module, token_dropout: float = 0.0):
        super().__init__()
        self.prior, self.token_dropout = prior, token_dropout

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        nats, weights = self.prior.loss_terms(codes, labels, noise=self.token_dropout)
        return nats.mean() if weights is None else nats.sum() / weights.sum()


def resident(codes: torch.Tensor, codebook_size: int, device: torch.device) -> torch.Tensor:
    """The training grids (N, h, w) where the training steps read them: on a GPU, all of them as
    int16 / int32 when that fits in :data:`RESIDENT_BYTES`; in host memory otherwise."""
    if device.type != "cuda":
        return codes
    dtype = torch.int16 if codebook_size <= torch.iinfo(torch.int16).max else torch.int32
    if codes.numel() * dtype.itemsize > RESIDENT_BYTES:
        return codes
    return codes.to(device=device, dtype=dtype)


def optimizer(prior: Prior, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices, never on biases, norms or embeddings; fused (one
    kernel per update) on CUDA."""
    decay = [p for n, p in prior.named_parameters() if p.dim() >= 2 and "weight" in n
             and not isinstance(prior.get_submodule(n.rsplit(".", 1)[0]), nn.Embedding)]
    ids = {id(p) for p in decay}
    rest = [p for p in prior.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr,
                             fused=prior.head.weight.is_cuda)


def drop_labels(labels: torch.Tensor, p: float, null: int) -> torch.Tensor:
    """Replace each label by the null class with probability ``p`` (classifier-free guidance)."""
    if p == 0.0:
        return labels
    return torch.where(torch.rand(labels.shape) < p, torch.full_like(labels, null), labels)


class Stage2:
    """Stage 2's hooks for :func:`vqvae.loop.fit`: one AdamW step on next-code cross-entropy,
    and a save with a sample grid and held-out bits per code."""

    def __init__(self, cfg: PriorRunConfig, run_dir: Path, prior: Prior,
                 opt: torch.optim.Optimizer, codes: Codes, stage1: VQVAE, runtime: Runtime,
                 scaler: torch.amp.GradScaler, clock: RunClock | None = None):
        tc = cfg.train
        self.cfg, self.run_dir, self.prior, self.opt = cfg, run_dir, prior, opt
        self.runtime, self.scaler = runtime, scaler
        self.train, self.test = codes.split("train"), codes.split("test")
        self.labels = self.train.labels if cfg.model.num_classes else None
        self.loss = data_parallel(PriorLoss(prior, tc.token_dropout), runtime)  # ``prior`` is saved
        self.codes = resident(self.train.codes, codebook_size=cfg.model.codebook_size,
                              device=runtime.device)
        self.stream = BatchStream(len(self.train), tc.batch_size, tc.seed, runtime.rank,
                                  runtime.world_size)
        self.stage1 = stage1  # decodes the sample grids
        self.schedule = Schedule(tc, opt, clock)  # its clock's seconds go in checkpoints
        # (held-out bits/code, checkpoint): the run's best, kept from pruning (rank 0's files)
        self.best = kept_best(run_dir) if runtime.is_main else None

    def step(self, step: int) -> dict[str, torch.Tensor]:
        tc, device = self.cfg.train, self.runtime.device
        index = self.stream.indices(step)
        labels = None
        if self.labels is not None:
            labels = drop_labels(self.labels[index], tc.p_uncond, self.prior.null_class)
            labels = labels.to(device, non_blocking=True)
        self.schedule.set(step)
        codes = self.codes[index.to(self.codes.device)].to(device, torch.long, non_blocking=True)
        with autocast(tc.precision, device):
            loss = self.loss(codes, labels)  # over the local batch; DDP averages gradients
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tc.grad_clip:
            self.scaler.unscale_(self.opt)  # clip the true gradients, not fp16's scaled ones
            torch.nn.utils.clip_grad_norm_(self.prior.parameters(), tc.grad_clip)
        self.scaler.step(self.opt)  # fp16: skipped (and the scale lowered) on inf/nan gradients
        self.scaler.update()
        return {"loss": loss}

    def describe(self, step: int, means: dict[str, float]) -> dict[str, float]:
        return {"bits": means["loss"] / math.log(2), "lr": self.schedule.lr}  # the last step's

    def postfix(self, record: dict[str, float], metrics: dict[str, float]) -> dict[str, str]:
        return ({"bits": f"{record['bits']:.3f}"}
                | ({"test": f"{metrics['bits_per_code']:.3f}"} if metrics else {}))

    def evaluate(self, limit: int) -> dict[str, float]:
        """Held-out bits per code of the first ``limit`` grids (0: all), sharded over ranks."""
        limit = limit or len(self.test)
        labels = None if self.test.labels is None else self.test.labels[:limit]
        return evaluate_prior(self.prior, self.test.codes[:limit], labels,
                              device=self.runtime.device, rank=self.runtime.rank,
                              world_size=self.runtime.world_size)

    def save(self, step: int) -> loop.Saved:
        """Checkpoint and a sample grid on the main process; held-out bits/code sharded over all
        ranks (the others wait there while rank 0 samples: no collective in it)."""
        tc, pictures = self.cfg.train, {}
        saved = None
        if self.runtime.is_main:
            saved = runs.save_checkpoint(self.run_dir, step, self.prior, PRIOR_KIND,
                                         self.cfg.model, self.opt, tc, self.runtime,
                                         scaler=self.scaler, seconds=self.schedule.clock.seconds)
            images, _ = draw(self.prior, self.stage1, SampleConfig(n=tc.grid**2, seed=tc.seed),
                             self._row_labels(tc.grid))
            grid = samples_grid(images, tc.grid)
            pictures["samples"] = save_png(grid,
                                           self.run_dir / "samples" / f"prior_{step:07d}.png")
            save_png(grid, self.run_dir / "samples.png")
        metrics = self.evaluate(tc.eval_count)
        if saved is not None:
            self._keep_if_best(metrics["bits_per_code"], saved)
        return loop.Saved(metrics, pictures)

    def _keep_if_best(self, bits: float, checkpoint: Path) -> None:
        """Keep the checkpoint with the lowest held-out bits/code from pruning (the one to sample
        when the run overfits), and release the one kept before it."""
        if self.best is not None and bits >= self.best[0]:
            return
        protect(checkpoint, BEST)
        if self.best is not None and self.best[1] != checkpoint:
            unprotect(self.best[1], BEST)
        self.best = (bits, checkpoint)

    def _row_labels(self, n: int) -> torch.Tensor | None:
        """A conditional prior draws one class per row of an n x n grid."""
        k = self.prior.cfg.num_classes
        return (torch.arange(n * n) // n) % k if k else None


def train_prior(cfg: PriorRunConfig, run_dir: str | Path, *, resume: bool = False,
                codes: Codes | None = None, runtime: Runtime | None = None,
                progress: bool = True) -> loop.RunResult:
    """Train (or, with ``resume``, continue) a prior in ``run_dir``; returns held-out metrics.

    ``codes`` may be passed in memory (e.g. just encoded); when ``cfg.codes`` is empty they are
    written into the run folder so that a resume finds them.
    """
    run_dir = Path(run_dir)
    runs.check_loggers(cfg.train)
    runtime = runtime or Runtime(pick_device(cfg.train.device))
    if not cfg.codes:
        cfg = replace(cfg, codes=str((run_dir / CODES_FILE).resolve()))
    elif codes is None:
        codes = load_codes(cfg.codes)
    if codes is None:
        raise ConfigError("train_prior: pass the codes when cfg.codes is empty")
    check_compatible(cfg.model, codes)
    stage1 = load_stage1(cfg, runtime.device)  # before seeding: building it draws random weights
    check_stage1(codes.stage1_sha256, codes.stage1, cfg.stage1)
    tc = cfg.train
    torch.manual_seed(tc.seed)
    prior = build_prior(cfg.model).to(runtime.device)
    opt = optimizer(prior, tc.lr, tc.weight_decay)
    scaler = loss_scaler(tc.precision, runtime.device)
    with (numerics(tc.precision, runtime.device, tc.deterministic),
          runs.opened(run_dir, resume, runtime)):
        start, seconds = (runs.restore(run_dir, prior, opt, PRIOR_KIND, cfg.model,
                                       tc.batch_size, runtime, scaler=scaler)
                          if resume else (0, 0.0))
        runs.check_steps(start, tc.steps, seconds, tc.minutes)
        main_does(lambda: _prepare(run_dir, cfg, start, codes), runtime, "prepare the run folder")
        clock = RunClock(tc.steps, tc.minutes, seconds)
        stage = Stage2(cfg, run_dir, prior, opt, codes, stage1, runtime, scaler, clock)
        prior.train()
        with runs.open_logger(run_dir, tc, start, runtime, lambda train, evals: plot_curves(
                train, evals, run_dir / "curves.png", losses=("bits",),
                metrics=(("bits_per_code", "test bits/code"),))) as logger:
            step, signum = loop.fit(stage, tc, runtime, start, logger, "train prior", progress,
                                    clock)
        final = stage.evaluate(0)
        if runtime.is_main:
            runs.write_eval(run_dir, step, final)
            note = overfit_note(runs.read_jsonl(run_dir / "metrics.jsonl"),
                                stage.best[1] if stage.best else None)
            if note:
                warnings.warn(note)
    uncond = (f" ({final['bits_per_code_uncond']:.4f} with the null class)"
              if "bits_per_code_uncond" in final else "")
    return loop.RunResult(run_dir, step, final,
                          {"samples": run_dir / "samples.png"} if runtime.is_main else {},
                          f"trained the prior to step {step}; run folder: {run_dir}\n"
                          f"held-out ({final['grids']} grids): {final['bits_per_code']:.4f} "
                          f"bits/code{uncond}", signum)


BEST = "the lowest held-out bits/code of its run"  # who needs the best checkpoint (keep.json)


def kept_best(run_dir: Path) -> tuple[float, Path] | None:
    """The checkpoint a run keeps for its lowest held-out bits/code, with them (from
    ``metrics.jsonl``; infinite if the log lost them, so the next checkpoint takes over); None
    for a new run or one saved before runs kept it. The mark only moves to lower figures, so
    the newest marked checkpoint is the best: older marks (a process killed between marking
    the new one and releasing the old) are released."""
    kept = [c for c in step_folders(run_dir / CHECKPOINTS) if needs(c, BEST)]
    if not kept:
        return None
    for stale in kept[:-1]:
        unprotect(stale, BEST)
    step = step_of(kept[-1])
    bits = [r["bits_per_code"] for r in runs.read_jsonl(run_dir / "metrics.jsonl")
            if r.get("step") == step and isinstance(r.get("bits_per_code"), (int, float))]
    return (bits[0] if bits else math.inf), kept[-1]


# How far above its lowest a run's held-out bits/code may end before it is called overfitting:
# the checkpoints score the same held-out grids, so a rise is no sampling noise; 2% leaves room
# for a plateau's wobble (a 15-minute default prior on the digits rose 60%: docs/prior.md).
OVERFIT_RISE = 0.02


def overfit_note(records: list[dict[str, Any]], kept: Path | None = None) -> str:
    """A one-line warning when the held-out bits/code of a run's checkpoints (``metrics.jsonl``
    records) ended more than OVERFIT_RISE above their lowest; "" otherwise. A warning, not a
    stop: the run's checkpoints and figures are still what was asked for. ``kept``: the best
    checkpoint, which the run keeps from pruning (named, to sample it)."""
    scored = [r for r in records if isinstance(r.get("bits_per_code"), (int, float))]
    if len(scored) < 2:
        return ""
    best, last = min(scored, key=lambda r: r["bits_per_code"]), scored[-1]
    if last["bits_per_code"] <= best["bits_per_code"] * (1 + OVERFIT_RISE):
        return ""
    if kept is not None and kept.name != step_name(best["step"]):
        kept = None  # the lowest figure is older than the mark (a run from before it)
    return (f"held-out bits/code was lowest at step {best['step']} "
            f"({best['bits_per_code']:.4f}) and is {last['bits_per_code']:.4f} at step "
            f"{last['step']}: the prior overfits its training codes (trained on, its samples "
            f"turn into copies of training grids); train it for about {best['step']} steps "
            f"(--steps)" + (f", or sample the checkpoint kept from then: vqvae sample {kept}"
                            if kept is not None else ""))


def _prepare(run_dir: Path, cfg: PriorRunConfig, start: int, codes: Codes) -> None:
    runs.prepare_run(run_dir, PRIOR_KIND, cfg, start)
    if not Path(cfg.codes).exists():
        save_codes(codes, cfg.codes)
    protect(Path(cfg.stage1), f"prior {run_dir.resolve()}")  # its codes decode only there
