"""Stage-2 training: the prior's run config, one training step, and what stage 2 brings to the
run driver (:func:`vqvae.training.driver.run`): its setup, samples and held-out bits per code.

Teacher forcing with next-code cross-entropy, as the seed; held-out negative log-likelihood is
logged in bits per code. Run folders, checkpoints, resume, budgets, logs and data parallelism are
the driver's (:mod:`vqvae.training.driver`); nothing here comes from stage 1's trainer.
"""

from __future__ import annotations

import math
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import (PRIOR_PRESETS, PriorConfig, PriorPresetName, PriorRunConfig, PriorTrainConfig,
                      SampleConfig, prior_for_data)
from ..data.loader import RESIDENT_BYTES
from ..data.sources import BatchStream
from ..distributed import Runtime, data_parallel, launch, pick_device
from ..errors import ConfigError, DataError
from ..evaluation.metrics import evaluate_prior
from ..evaluation.plots import plot_curves
from ..generation.tuning import SAMPLING, Swept, describe, tune_sampling
from ..generation.codes import (Codes, check_stage1, encode_dataset, load_codes, load_stage1,
                                save_codes)
from ..generation.grids import samples_grid, save_png
from ..generation.sample import draw
from ..models.prior import Prior, build_prior
from ..precision import autocast, loss_scaler
from ..store import runs
from ..store.checkpoint import (CHECKPOINTS, PRIOR_KIND, needs, protect, step_folders, step_name,
                                step_of, unprotect)
from ..store.runs import TrainingState
from .driver import RunResult, Scored, run
from .loggers import check_loggers
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
    model = dict(model or {}) | next_scale(codes, model or {})
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


def next_scale(codes: Codes, model: dict[str, Any]) -> dict[str, Any]:
    """A multiscale tokenizer's codes get a var prior of their scales (the variant named or not);
    any other prior on them, or a var prior on grid codes, is refused in one line."""
    variant = model.get("variant")
    if codes.scales:
        if variant not in (None, "var"):
            raise ConfigError(f"these codes are a multiscale tokenizer's token maps (scales "
                              f"{','.join(map(str, codes.scales))}): train --variant var on "
                              f"them, not {variant}")
        return {"variant": "var", "scales": codes.scales}
    if variant == "var":
        raise ConfigError(f"--variant var predicts a multiscale tokenizer's token maps, and these "
                          f"codes are {codes.grid[0]}x{codes.grid[1]} grids: encode with a "
                          f"stage-1 model trained with --quantizer multiscale")
    return {}


def seed_blocks(model: PriorConfig) -> bool:
    """Whether a prior is built of the seed's blocks (autoregressive or maskgit)."""
    return model.variant == "seed" or (model.variant == "maskgit"
                                       and model.maskgit_blocks == "seed")


def prior_summary(cfg: PriorRunConfig) -> str:
    """One line on what a run will train: the blocks, size and recipe its preset and data chose."""
    m, t = cfg.model, cfg.train
    blocks = {"seed": "the seed's post-norm blocks", "gpt": "pre-norm GPT blocks",
              "maskgit": f"bidirectional {'seed' if m.maskgit_blocks == 'seed' else 'GPT'} "
                         f"blocks (maskgit)",
              "var": f"block-causal GPT blocks over {len(m.scales)} scales (var)"}[m.variant]
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
    if tuple(model.scales) != tuple(codes.scales or ()):
        have = ",".join(map(str, codes.scales)) if codes.scales else "grids"
        raise DataError(f"the prior models token maps of scales "
                        f"{','.join(map(str, model.scales)) or 'none (a grid)'}, the codes are "
                        f"{have}")
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


def train_step(loss: nn.Module, prior: nn.Module, opt: torch.optim.Optimizer,
               scaler: torch.amp.GradScaler, codes: torch.Tensor, labels: torch.Tensor | None,
               tc: PriorTrainConfig) -> torch.Tensor:
    """One AdamW step on a batch of code grids (B, h, w) (long, on the device) and their labels:
    ``loss`` (a :class:`PriorLoss`, maybe wrapped for data parallelism) under ``tc.precision``'s
    autocast, the backward through fp16's loss ``scaler``, gradients clipped to
    ``tc.grad_clip``. Returns the loss (0-d, on the device). What the training loop and every
    benchmark of a step call."""
    with autocast(tc.precision, codes.device):
        value = loss(codes, labels)  # over the local batch; DDP averages gradients
    opt.zero_grad(set_to_none=True)
    scaler.scale(value).backward()
    if tc.grad_clip:
        scaler.unscale_(opt)  # clip the true gradients, not fp16's scaled ones
        torch.nn.utils.clip_grad_norm_(prior.parameters(), tc.grad_clip)
    scaler.step(opt)  # fp16: skipped (and the scale lowered) on inf/nan gradients
    scaler.update()
    return value


class Stage2:
    """Stage 2 for the run driver (:func:`vqvae.training.driver.run`): the prior and AdamW; one
    step on next-code cross-entropy (a maskgit prior's masked codes); a sample grid and held-out
    bits per code at each save, keeping the checkpoint with the lowest from pruning.

    ``codes`` may be passed in memory (e.g. just encoded); when ``cfg.codes`` is empty they are
    written into the run folder so that a resume finds them."""

    desc = "train prior"
    halt = None  # its codes are in memory: nothing to go missing while it trains

    def __init__(self, cfg: PriorRunConfig, run_dir: str | Path, runtime: Runtime,
                 codes: Codes | None = None):
        self.run_dir, self.runtime = Path(run_dir), runtime
        if not cfg.codes:
            cfg = replace(cfg, codes=str((self.run_dir / CODES_FILE).resolve()))
        elif codes is None:
            codes = load_codes(cfg.codes)
        if codes is None:
            raise ConfigError("train_prior: pass the codes when cfg.codes is empty")
        check_compatible(cfg.model, codes)
        # before seeding: building it draws random weights; decodes the sample grids
        self.stage1 = load_stage1(cfg, runtime.device)
        check_stage1(codes.stage1_sha256, codes.stage1, cfg.stage1)
        tc = cfg.train
        torch.manual_seed(tc.seed)
        prior = build_prior(cfg.model).to(runtime.device)
        opt = optimizer(prior, tc.lr, tc.weight_decay)
        self.state = TrainingState(PRIOR_KIND, prior, cfg.model, opt,
                                   loss_scaler(tc.precision, runtime.device))
        self.cfg, self.prior, self.opt, self.codes = cfg, prior, opt, codes
        self.train, self.test = codes.split("train"), codes.split("test")
        self.labels = self.train.labels if cfg.model.num_classes else None
        self.swept: Swept | None = None  # the sampling settings chosen at the end

    @property
    def loop(self) -> PriorTrainConfig:
        return self.cfg.train

    def prepare(self, start: int) -> None:
        runs.prepare_run(self.run_dir, PRIOR_KIND, self.cfg, start)
        if not Path(self.cfg.codes).exists():
            save_codes(self.codes, self.cfg.codes)
        # its codes decode only there: the stage-1 checkpoint is kept from pruning
        protect(Path(self.cfg.stage1), f"prior {self.run_dir.resolve()}")

    def begin(self, clock: RunClock) -> None:
        tc, runtime = self.cfg.train, self.runtime
        self.loss = data_parallel(PriorLoss(self.prior, tc.token_dropout), runtime)
        self.resident = resident(self.train.codes, codebook_size=self.cfg.model.codebook_size,
                                 device=runtime.device)
        self.stream = BatchStream(len(self.train), tc.batch_size, tc.seed, runtime.rank,
                                  runtime.world_size)
        self.schedule = Schedule(tc, self.opt, clock)
        # (held-out bits/code, checkpoint): the run's best, kept from pruning (rank 0's files)
        self.best = kept_best(self.run_dir) if runtime.is_main else None

    def step(self, step: int) -> dict[str, torch.Tensor]:
        tc, device = self.cfg.train, self.runtime.device
        index = self.stream.indices(step)
        labels = None
        if self.labels is not None:
            labels = drop_labels(self.labels[index], tc.p_uncond, self.prior.null_class)
            labels = labels.to(device, non_blocking=True)
        self.schedule.set(step)
        codes = self.resident[index.to(self.resident.device)].to(device, torch.long,
                                                                  non_blocking=True)
        return {"loss": train_step(self.loss, self.prior, self.opt, self.state.scaler, codes,
                                   labels, tc)}

    def describe(self, step: int, means: dict[str, float]) -> dict[str, float]:
        return {"bits": means["loss"] / math.log(2), "lr": self.schedule.lr}  # the last step's

    def postfix(self, record: dict[str, float], metrics: dict[str, float]) -> dict[str, str]:
        return ({"bits": f"{record['bits']:.3f}"}
                | ({"test": f"{metrics['bits_per_code']:.3f}"} if metrics else {}))

    def curves(self, train: list[dict], evals: list[dict]) -> Path:
        return plot_curves(train, evals, self.run_dir / "curves.png", losses=("bits",),
                           metrics=(("bits_per_code", "test bits/code"),))

    def evaluate(self, limit: int) -> Scored:
        """Held-out bits per code of the first ``limit`` grids (0: all), sharded over ranks."""
        limit = limit or len(self.test)
        labels = None if self.test.labels is None else self.test.labels[:limit]
        return Scored(evaluate_prior(self.prior, self.test.codes[:limit], labels,
                                     device=self.runtime.device, rank=self.runtime.rank,
                                     world_size=self.runtime.world_size))

    def pictures(self, step: int | None) -> dict[str, Path]:
        """A grid of samples (one class per row for a conditional prior) per checkpoint, the
        newest also as ``samples.png`` in the run folder."""
        latest = self.run_dir / "samples.png"
        if step is None:
            return {"samples": latest}
        tc = self.cfg.train
        images, _ = draw(self.prior, self.stage1, SampleConfig(n=tc.grid**2, seed=tc.seed),
                         self._row_labels(tc.grid))
        grid = samples_grid(images, tc.grid)
        save_png(grid, latest)
        return {"samples": save_png(grid, self.run_dir / "samples" / f"prior_{step:07d}.png")}

    def saved(self, step: int, scored: Scored, checkpoint: Path) -> dict[str, Path]:
        """Keep the checkpoint with the lowest held-out bits/code from pruning (the one to sample
        when the run overfits), and release the one kept before it."""
        bits = scored.metrics["bits_per_code"]
        if self.best is None or bits < self.best[0]:
            protect(checkpoint, BEST)
            if self.best is not None and self.best[1] != checkpoint:
                unprotect(self.best[1], BEST)
            self.best = (bits, checkpoint)
        return {}

    def finished(self, step: int, scored: Scored) -> dict[str, Path]:
        note = overfit_note(runs.read_jsonl(self.run_dir / "metrics.jsonl"),
                            self.best[1] if self.best else None)
        if note:
            warnings.warn(note)
        n = self.cfg.train.tune_sampling
        if n and len(self.test) >= 16:  # the settings `vqvae sample` will use, measured
            self.swept = tune_sampling(self.run_dir, self.runtime.device, n=n, progress=True,
                                       codes=self.codes, stage1=self.stage1)
            return {"sampling": self.run_dir / SAMPLING}
        return {}

    def headline(self, step: int, final: dict[str, float]) -> str:
        uncond = (f" ({final['bits_per_code_uncond']:.4f} with the null class)"
                  if "bits_per_code_uncond" in final else "")
        chosen = ("" if self.swept is None else
                  f"\nsampling with {describe(self.swept.chosen)} (closest to the held-out codes "
                  f"of {len(self.swept.tried)} settings tried)")
        return (f"trained the prior to step {step}; run folder: {self.run_dir}\n"
                f"held-out ({final['grids']} grids): {final['bits_per_code']:.4f} "
                f"bits/code{uncond}{chosen}")

    def _row_labels(self, n: int) -> torch.Tensor | None:
        """A conditional prior draws one class per row of an n x n grid."""
        k = self.prior.cfg.num_classes
        return (torch.arange(n * n) // n) % k if k else None


def train_prior(cfg: PriorRunConfig, run_dir: str | Path, *, resume: bool = False,
                codes: Codes | None = None, runtime: Runtime | None = None,
                progress: bool = True) -> RunResult:
    """Train (or, with ``resume``, continue) a prior in ``run_dir``; returns held-out metrics.

    ``codes`` may be passed in memory (e.g. just encoded); when ``cfg.codes`` is empty they are
    written into the run folder so that a resume finds them.
    """
    check_loggers(cfg.train)  # before the codes and the stage-1 model load
    with nullcontext(runtime) if runtime else launch(cfg.train.device) as runtime:
        return run(Stage2(cfg, run_dir, runtime, codes), resume=resume, progress=progress)


def prior_setup(*, codes: str | Path | None = None, stage1: str | Path | None = None,
                data: str | None = None, preset: PriorPresetName = "default",
                conditional: bool = False, model: dict[str, Any] | None = None,
                train: dict[str, Any] | None = None, device: str | torch.device = "auto",
                progress: bool = True) -> tuple[PriorRunConfig, Codes]:
    """The config and codes of a new prior run (``vqvae train-prior``): on a codes file, or on
    the data of a stage-1 run (``data``: another source) encoded now; ``preset``'s prior sized
    to them with fields of ``model`` and ``train`` overridden (:func:`prior_run_config`).
    Under torchrun every rank encodes the same codes (no collective)."""
    if bool(codes) == bool(stage1):
        raise ConfigError("give either --codes CODES or --stage1 RUN_DIR (which encodes its data)")
    if codes and data:
        raise ConfigError("--data goes with --stage1; a codes file already names its data")
    if codes:
        found, path = load_codes(codes), str(Path(codes).resolve())
    else:
        found, path = encode_dataset(stage1, data, device=pick_device(device),
                                     progress=progress), ""
    return prior_run_config(found, path, preset, conditional, model, train), found


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

