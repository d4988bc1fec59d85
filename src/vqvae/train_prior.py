"""Stage-2 training: fit the autoregressive prior to a codes file, with stage 1's run-folder habits.

Teacher forcing with next-code cross-entropy, as the seed; held-out negative log-likelihood is
logged in bits per code. Checkpoints, resume, time/step budgets, logs and data parallelism
(DistributedDataParallel under torchrun, sharded evaluation, rank-0 I/O) reuse :mod:`vqvae.train`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from . import checkpoint as ckpt
from .autoencoder import VQVAE
from .codes import Codes, CodeSplit, check_stage1, load_codes, save_codes
from .config import PriorConfig, PriorRunConfig, to_dict
from .data import BatchStream, DataError
from .distributed import data_parallel, main_does, mean_over_ranks
from .metrics import evaluate_prior
from .plots import plot_curves
from .prior import Prior
from .sample import decode_codes, samples_grid, save_png
from .train import (LOG_EVERY, METRICS_LOG, TRAIN_LOG, Budget, Runtime, read_run_config,
                    append_jsonl, pick_device, prepare_run_dir, read_jsonl, truncate_log,
                    _batch_info, warn_if_global_batch_changes)

CODES_FILE = "codes.safetensors"  # codes encoded on the fly are kept here, for resume


def load_prior_run_config(run_dir: str | Path) -> PriorRunConfig:
    return read_run_config(run_dir, PriorRunConfig, ckpt.PRIOR_KIND)


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


def load_stage1(cfg: PriorRunConfig, device: torch.device | str = "cpu") -> VQVAE:
    """The stage-1 model that decodes this prior's codes, after checking its fingerprint."""
    directory = Path(cfg.stage1)
    if not directory.is_dir():
        raise ckpt.CheckpointError(f"the stage-1 checkpoint {directory} is gone")
    check_stage1(cfg.stage1_sha256, cfg.stage1, directory)
    model = ckpt.load_autoencoder(directory, device)
    if model.cfg.codebook_size != cfg.model.codebook_size:
        raise DataError(f"stage-1 model has {model.cfg.codebook_size} codes, the prior "
                        f"{cfg.model.codebook_size}")
    return model


@dataclass(frozen=True)
class PriorTrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]
    samples: Path | None


def train_prior(cfg: PriorRunConfig, run_dir: str | Path, *, resume: bool = False,
                codes: Codes | None = None, runtime: Runtime | None = None,
                progress: bool = True) -> PriorTrainResult:
    """Train (or, with ``resume``, continue) a prior in ``run_dir``; returns held-out metrics.

    ``codes`` may be passed in memory (e.g. just encoded); when ``cfg.codes`` is empty they are
    written into the run folder so that a resume finds them.
    """
    run_dir = Path(run_dir)
    runtime = runtime or Runtime(pick_device(cfg.train.device))
    if not cfg.codes:
        cfg = replace(cfg, codes=str((run_dir / CODES_FILE).resolve()))
    elif codes is None:
        codes = load_codes(cfg.codes)
    assert codes is not None, "codes must be given when cfg.codes is empty"
    check_compatible(cfg.model, codes)
    stage1 = load_stage1(cfg, runtime.device)
    check_stage1(codes.stage1_sha256, codes.stage1, cfg.stage1)
    train, test = codes.split("train"), codes.split("test")
    tc = cfg.train
    torch.manual_seed(tc.seed)
    prior = Prior(cfg.model).to(runtime.device)
    opt = _optimizer(prior, tc.lr, tc.weight_decay)
    start = _restore(run_dir, prior, opt, cfg, runtime) if resume else 0
    main_does(lambda: _prepare(run_dir, cfg, resume, start, codes), runtime,
              "prepare the run folder")
    nll = data_parallel(PriorNLL(prior), runtime)  # trains; ``prior`` is saved and evaluated
    labels = train.labels if cfg.model.num_classes else None
    stream = BatchStream(len(train), tc.batch_size, tc.seed, runtime.rank, runtime.world_size)
    step, window, window_steps, metrics = start, 0.0, 0, {}
    t_window = time.perf_counter()
    prior.train()
    with Budget(tc.steps, tc.every, tc.minutes, runtime) as budget:
        bar = budget.progress(start, "train prior", progress)
        while step < tc.steps:
            index = stream.indices(step)
            batch_labels = None if labels is None else _drop_labels(labels[index], tc.p_uncond,
                                                                    prior.null_class)
            loss = _train_step(nll, prior, opt, train.codes[index], batch_labels, step, cfg)
            step += 1
            window += loss
            window_steps += 1
            if step % LOG_EVERY == 0 or step == tc.steps:
                elapsed = time.perf_counter() - t_window
                nats = mean_over_ranks({"nats": window / window_steps}, runtime)["nats"]
                if not math.isfinite(nats):
                    raise FloatingPointError(f"loss became non-finite at step {step}")
                record = {"step": step, "loss": nats, "bits": nats / math.log(2),
                          "lr": _lr(step - 1, tc.lr, tc.warmup),
                          "steps_per_s": window_steps / max(elapsed, 1e-9)}
                window, window_steps, t_window = 0.0, 0, time.perf_counter()
                if runtime.is_main:
                    append_jsonl(run_dir / TRAIN_LOG, record)
                bar.set_postfix({"bits": f"{record['bits']:.3f}"}
                                | ({"test": f"{metrics['bits_per_code']:.3f}"} if metrics else {}))
            bar.update(1)
            save, stop = budget.check(step)
            if save:
                metrics = _save_all(run_dir, step, prior, opt, cfg, stage1, test, runtime)
            if stop:
                break
    bar.close()
    final = _evaluate(prior, test, 0, runtime)
    if not runtime.is_main:
        return PriorTrainResult(run_dir, step, final, None)
    ckpt.write_json(run_dir / "eval.json", {"step": step, "split": "test", **final})
    return PriorTrainResult(run_dir, step, final, run_dir / "samples.png")


class PriorNLL(nn.Module):
    """The training loss as a module's forward, so DistributedDataParallel (which hooks
    ``forward``) can wrap it: (B, h, w) codes -> (B, h*w) nats."""

    def __init__(self, prior: Prior):
        super().__init__()
        self.prior = prior

    def forward(self, codes: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.prior.nll(codes, labels)


def _prepare(run_dir: Path, cfg: PriorRunConfig, resume: bool, start: int, codes: Codes) -> None:
    prepare_run_dir(run_dir, cfg, resume)
    if not Path(cfg.codes).exists():
        save_codes(codes, cfg.codes)
    for log in (TRAIN_LOG, METRICS_LOG):
        truncate_log(run_dir / log, start)


def _evaluate(prior: Prior, test: CodeSplit, limit: int, runtime: Runtime) -> dict[str, float]:
    """Held-out bits per code of the first ``limit`` grids (0: all), sharded over ranks."""
    limit = limit or len(test)
    labels = None if test.labels is None else test.labels[:limit]
    return evaluate_prior(prior, test.codes[:limit], labels, device=runtime.device,
                          rank=runtime.rank, world_size=runtime.world_size)


def _optimizer(prior: Prior, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; weight decay only on matrices, never on biases, norms or embeddings."""
    decay = [p for n, p in prior.named_parameters() if p.dim() >= 2 and "weight" in n
             and not isinstance(_owner(prior, n), torch.nn.Embedding)]
    ids = {id(p) for p in decay}
    rest = [p for p in prior.parameters() if id(p) not in ids]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


def _owner(model: torch.nn.Module, name: str) -> torch.nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


def _lr(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up to ``peak``, then constant (a time budget leaves the end unknown)."""
    return peak * min(1.0, (step + 1) / warmup) if warmup else peak


def _drop_labels(labels: torch.Tensor, p: float, null: int) -> torch.Tensor:
    """Replace each label by the null class with probability ``p`` (classifier-free guidance)."""
    if p == 0.0:
        return labels
    return torch.where(torch.rand(labels.shape) < p, torch.full_like(labels, null), labels)


def _train_step(nll: nn.Module, prior: Prior, opt: torch.optim.Optimizer, codes: torch.Tensor,
                labels: torch.Tensor | None, step: int, cfg: PriorRunConfig) -> float:
    device = prior.head.weight.device
    for group in opt.param_groups:
        group["lr"] = _lr(step, cfg.train.lr, cfg.train.warmup)
    codes = codes.to(device, non_blocking=True)
    labels = None if labels is None else labels.to(device, non_blocking=True)
    loss = nll(codes, labels).mean()  # over the local batch; DDP averages gradients over ranks
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.train.grad_clip:
        torch.nn.utils.clip_grad_norm_(prior.parameters(), cfg.train.grad_clip)
    opt.step()
    return loss.item()


def sample_grid(prior: Prior, stage1: VQVAE, n: int, seed: int = 0) -> Image.Image:
    """An n x n grid of new images; a conditional prior draws one class per row."""
    labels = None
    if prior.cfg.num_classes:
        labels = (torch.arange(n * n) // n) % prior.cfg.num_classes
    gen = torch.Generator().manual_seed(seed)
    codes = prior.generate(n * n, labels=labels, generator=gen)
    return samples_grid(decode_codes(stage1, codes), n)


def _save_all(run_dir: Path, step: int, prior: Prior, opt: torch.optim.Optimizer,
              cfg: PriorRunConfig, stage1: VQVAE, test: CodeSplit,
              runtime: Runtime) -> dict[str, float]:
    """Checkpoint, a sample grid and the curve plot on the main process; held-out bits/code
    sharded over all ranks (the others wait there while rank 0 samples: no collective in it)."""
    if runtime.is_main:
        ckpt.write_checkpoint(run_dir, step, prior, ckpt.PRIOR_KIND, to_dict(cfg.model), opt,
                              extra=_batch_info(cfg.train.batch_size, runtime))
        grid = sample_grid(prior, stage1, cfg.train.grid, cfg.train.seed)
        save_png(grid, run_dir / "samples" / f"prior_{step:07d}.png")
        save_png(grid, run_dir / "samples.png")
    metrics = _evaluate(prior, test, cfg.train.eval_codes, runtime)
    if not runtime.is_main:
        return metrics
    append_jsonl(run_dir / METRICS_LOG, {"step": step, "split": "test", **metrics})
    plot_curves(read_jsonl(run_dir / TRAIN_LOG), read_jsonl(run_dir / METRICS_LOG),
                run_dir / "curves.png", losses=("bits",),
                metrics=(("bits_per_code", "test bits/code"),))
    return metrics


def _restore(run_dir: Path, prior: Prior, opt: torch.optim.Optimizer, cfg: PriorRunConfig,
             runtime: Runtime) -> int:
    meta = ckpt.restore(run_dir, prior, opt, ckpt.PRIOR_KIND, cfg.model)
    warn_if_global_batch_changes(meta, cfg.train.batch_size, runtime)
    return int(meta["step"])
