"""Stage-1 training: the VQ-VAE loss, a short loop over small helpers, resumable run folders.

Loss (the seed's): mse(x, x_rec) + mse(sg(z), e) + beta * mse(z, sg(e)), straight-through
estimator inside the quantizer. Under torchrun each rank trains a DistributedDataParallel copy
on its slice of every global batch (a per-rank :class:`~vqvae.data.BatchStream`), evaluation is
sharded, and I/O happens on the main process only (``Runtime.is_main``).
"""

from __future__ import annotations

import json
import math
import signal
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from . import checkpoint as ckpt
from .autoencoder import VQVAE, VQVAEOutput
from .config import ConfigError, RunConfig, TrainConfig, from_dict, to_dict
from .data import BatchStream, Splits, load_splits, source_channels, to_float
from .distributed import Runtime, any_rank, data_parallel, main_does, mean_over_ranks
from .metrics import CodeUsage, Evaluation, score_autoencoder
from .plots import plot_code_usage, plot_curves
from .sample import interpolation_grid, reconstruction_grid, save_png

TRAIN_LOG, METRICS_LOG, RUN_CONFIG = "train.jsonl", "metrics.jsonl", "config.json"
LOG_EVERY = 10  # steps averaged into one train.jsonl line
HEALTH = ("usage", "dead_codes", "perplexity")  # codebook health, logged over a window of steps


def pick_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then Apple MPS, then the CPU; anything else is passed to torch."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a valid torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def vqvae_losses(x: torch.Tensor, out: VQVAEOutput) -> dict[str, torch.Tensor]:
    """The seed's loss and its named terms (mse_x, mse_e = codebook, mse_z = commitment)."""
    mse_x = F.mse_loss(out.reconstruction, x)
    q = out.quantized
    return {"loss": mse_x + q.loss, "mse_x": mse_x, "mse_e": q.codebook_loss,
            "mse_z": q.commitment_loss}


# --- run folder --------------------------------------------------------------------------------


# A field that only one stage's run config has: tells a stage-1 run folder from a prior's.
RUN_KEYS = {ckpt.VQVAE_KIND: "data", ckpt.PRIOR_KIND: "codes"}


def read_run_config(run_dir: str | Path, cls: type, kind: str) -> Any:
    """``RUN_DIR/config.json`` as ``cls``; a run folder of the other stage is named as such."""
    path = Path(run_dir) / RUN_CONFIG
    if not path.exists():
        raise ckpt.CheckpointError(f"{run_dir} is not a {kind} run folder (no {RUN_CONFIG})")
    raw = ckpt.read_json(path)
    for other, key in RUN_KEYS.items():
        if other != kind and isinstance(raw, dict) and key in raw:
            raise ckpt.CheckpointError(f"{run_dir} is a {other} run folder, not a {kind} one")
    return from_dict(cls, raw, f"{kind} run config")


def load_run_config(run_dir: str | Path) -> RunConfig:
    return read_run_config(run_dir, RunConfig, ckpt.VQVAE_KIND)


def prepare_run_dir(run_dir: Path, cfg: Any, resume: bool) -> None:
    """Create (or, resuming, reuse) a run folder; write its config dataclass and command line."""
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir} already exists and is not empty: pass --resume "
                              f"{run_dir} to continue it, or choose another --out")
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt.write_json(run_dir / RUN_CONFIG, to_dict(cfg))
    with open(run_dir / "command.txt", "a") as f:
        f.write(" ".join(sys.argv) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log lines written after ``step`` (the checkpoint a resume restarts from)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- helpers of the loop -----------------------------------------------------------------------


def resolve_config(cfg: RunConfig, splits: Splits) -> RunConfig:
    """Take the image size and channel count from the loaded data."""
    channels = source_channels(splits.train)
    data = replace(cfg.data, channels=channels)
    model = replace(cfg.model, image_size=cfg.data.size, in_channels=channels)
    return replace(cfg, data=data, model=model)


class Budget:
    """When a training loop saves and stops: every ``every`` steps and at ``steps``, and early when
    the wall-clock ``minutes`` run out or SIGINT/SIGTERM arrives (a checkpoint first; a second
    SIGINT aborts). All ranks take the stop decision together, so they stop at the same step."""

    def __init__(self, steps: int, every: int, minutes: float | None, runtime: Runtime):
        self.steps, self.every, self.runtime = steps, every, runtime
        self.deadline = None if minutes is None else time.monotonic() + 60 * minutes
        self.signalled = False
        self._previous: dict[int, Any] = {}

    def check(self, step: int) -> tuple[bool, bool]:
        """(save, stop) after ``step`` steps."""
        out_of_time = self.deadline is not None and time.monotonic() >= self.deadline
        stop = any_rank(out_of_time or self.signalled, self.runtime)
        return step % self.every == 0 or step == self.steps or stop, stop

    def progress(self, start: int, desc: str, enabled: bool = True) -> tqdm:
        """The progress bar (main process only); sparse lines when stderr is not a terminal."""
        return tqdm(total=self.steps, initial=start, desc=desc, unit="step", dynamic_ncols=True,
                    disable=not (enabled and self.runtime.is_main),
                    mininterval=0.1 if sys.stderr.isatty() else 15.0)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signalled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signalled = True

    def __enter__(self) -> Budget:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no signal handling
            pass
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def next_batch(images: torch.Tensor, stream: BatchStream, step: int, device: torch.device,
               channels_last: bool = False) -> torch.Tensor:
    """The batch of ``step``: rows of the uint8 cache (N, C, H, W), moved as uint8 (a quarter of
    the bytes), then mapped to float [-1, 1] on the device, channels-last when asked."""
    x = to_float(images[stream.indices(step)].to(device, non_blocking=True))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def training_forward(model: VQVAE, tc: TrainConfig,
                     runtime: Runtime) -> Callable[[torch.Tensor], VQVAEOutput]:
    """What the loop calls: ``model``, wrapped for data parallelism on several ranks, compiled
    with ``tc.compile``; with ``channels_last`` the weights move to channels-last memory in place.
    Checkpoints, grids and evaluation keep using ``model``, so saved weights never carry a
    wrapper's prefixes (``module.``, ``_orig_mod.``)."""
    if tc.channels_last:
        model.to(memory_format=torch.channels_last)
    net = data_parallel(model, runtime)
    return torch.compile(net) if tc.compile else net


def _grid_images(splits: Splits, n: int) -> torch.Tensor:
    """A fixed selection of held-out images, so grids are comparable across steps."""
    need = -(-n // 2) * n
    test = splits.test.images
    if test.shape[0] >= need:
        return test[:need]
    return torch.cat([test, splits.train.images])[:need]


def write_pictures(model: VQVAE, images: torch.Tensor, n: int, folder: Path,
                   suffix: str = "") -> dict[str, Path]:
    """The seed's three pictures (``sample_ae_1``, ``sample_ae_2``, ``sample_inter``)."""
    half = images.shape[0] // 2
    pairs = min(n, half)
    return {
        "sample_ae_1": save_png(reconstruction_grid(model, images, n, quantize=False),
                                folder / f"sample_ae_1{suffix}.png"),
        "sample_ae_2": save_png(reconstruction_grid(model, images, n, quantize=True),
                                folder / f"sample_ae_2{suffix}.png"),
        "sample_inter": save_png(interpolation_grid(model, images[:pairs],
                                                    images[half:half + pairs], n),
                                 folder / f"sample_inter{suffix}.png"),
    }


def _evaluate(model: VQVAE, splits: Splits, limit: int, runtime: Runtime) -> Evaluation:
    images = splits.test.images if limit == 0 else splits.test.images[:limit]
    return score_autoencoder(model, images, device=runtime.device, rank=runtime.rank,
                             world_size=runtime.world_size)  # sharded over ranks


def _checkpoint(run_dir: Path, step: int, model: VQVAE, opt: torch.optim.Optimizer,
                cfg: RunConfig, runtime: Runtime) -> Path:
    return ckpt.write_checkpoint(run_dir, step, model, ckpt.VQVAE_KIND, to_dict(cfg.model), opt,
                                 extra=_batch_info(cfg.train.batch_size, runtime))


def _batch_info(batch_size: int, runtime: Runtime) -> dict[str, int]:
    """Saved beside a checkpoint, so a resume with another process count can say what changed."""
    return {"world_size": runtime.world_size, "global_batch": batch_size * runtime.world_size}


def warn_if_global_batch_changes(meta: dict[str, Any], batch_size: int, runtime: Runtime) -> None:
    """Resuming with another process count changes the global batch unless --batch-size follows."""
    before, now = int(meta.get("global_batch", batch_size)), batch_size * runtime.world_size
    if before == now or not runtime.is_main:
        return
    keep = (f"; --batch-size {before // runtime.world_size} would keep it"
            if before % runtime.world_size == 0 else "")
    warnings.warn(f"the global batch changes from {before} ({meta.get('world_size', 1)} "
                  f"process(es)) to {now} ({runtime.world_size} x --batch-size {batch_size}); "
                  f"the data order continues from another point{keep}")


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path
    step: int
    metrics: dict[str, float]
    pictures: dict[str, Path]


def train_autoencoder(cfg: RunConfig, run_dir: str | Path, *, resume: bool = False,
                      runtime: Runtime | None = None, progress: bool = True,
                      splits: Splits | None = None) -> TrainResult:
    """Train (or, with ``resume``, continue) a VQ-VAE in ``run_dir``; returns final metrics."""
    run_dir = Path(run_dir)
    runtime = runtime or Runtime(pick_device(cfg.train.device))
    splits = splits or load_splits(cfg.data)
    cfg = resolve_config(cfg, splits)
    tc = cfg.train
    torch.manual_seed(tc.seed)  # the same seed on every rank: identical initial weights
    model = VQVAE(cfg.model).to(runtime.device)
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr)
    start = 0
    if resume:
        start = _restore(run_dir, model, opt, cfg, runtime)
    main_does(lambda: _prepare(run_dir, cfg, resume, start), runtime, "prepare the run folder")
    net = training_forward(model, tc, runtime)  # trains; ``model`` is saved and evaluated
    stream = BatchStream(len(splits.train), tc.batch_size, tc.seed, runtime.rank,
                         runtime.world_size)
    grid_images = _grid_images(splits, tc.grid)
    step = start
    window: dict[str, float] = {}
    window_steps = 0
    metrics: dict[str, float] = {}
    usage = CodeUsage(cfg.model.codebook_size, tc.every, runtime.device)  # last --every steps
    t_window = time.perf_counter()
    model.train()
    with Budget(tc.steps, tc.every, tc.minutes, runtime) as budget:
        bar = budget.progress(start, "train vqvae", progress)
        while step < tc.steps:
            x = next_batch(splits.train.images, stream, step, runtime.device, tc.channels_last)
            out = net(x)
            losses = vqvae_losses(x, out)
            usage.update(out.quantized.indices)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            step += 1
            window_steps += 1
            for name, value in losses.items():
                window[name] = window.get(name, 0.0) + value.item()
            if step % LOG_EVERY == 0 or step == tc.steps:
                elapsed = time.perf_counter() - t_window
                health = usage.stats()
                means = mean_over_ranks({k: v / window_steps for k, v in window.items()}, runtime)
                record = {"step": step, **means,
                          **{f"window_{k}": health[k] for k in HEALTH},
                          "steps_per_s": window_steps / max(elapsed, 1e-9)}
                window, window_steps, t_window = {}, 0, time.perf_counter()
                if not all(math.isfinite(v) for v in record.values()):
                    raise FloatingPointError(f"loss became non-finite at step {step}: {record}")
                if runtime.is_main:
                    append_jsonl(run_dir / TRAIN_LOG, record)
                bar.set_postfix({k: f"{record[k]:.4f}" for k in ("mse_x", "mse_e", "mse_z")}
                                | {"use%": f"{health['usage']:.0f}", "dead": health["dead_codes"]}
                                | ({"psnr": f"{metrics['psnr']:.2f}"} if metrics else {}))
            bar.update(1)
            save, stop = budget.check(step)
            if save:
                metrics = _save_all(run_dir, step, model, opt, cfg, splits, grid_images, runtime)
            if stop:
                break
    bar.close()
    pictures = write_pictures(model, grid_images, tc.grid, run_dir) if runtime.is_main else {}
    final, counts = _evaluate(model, splits, 0, runtime)
    if runtime.is_main:
        pictures["code_usage"] = plot_code_usage(counts, run_dir / "code_usage.png")
        ckpt.write_json(run_dir / "eval.json", {"step": step, "split": "test", **final})
    return TrainResult(run_dir, step, final, pictures)


def _prepare(run_dir: Path, cfg: RunConfig, resume: bool, start: int) -> None:
    prepare_run_dir(run_dir, cfg, resume)
    for log in (TRAIN_LOG, METRICS_LOG):
        truncate_log(run_dir / log, start)


def _save_all(run_dir: Path, step: int, model: VQVAE, opt: torch.optim.Optimizer,
              cfg: RunConfig, splits: Splits, grid_images: torch.Tensor,
              runtime: Runtime) -> dict[str, float]:
    """Checkpoint, grids, usage histogram and curves on the main process; held-out metrics
    sharded over all ranks (the others wait for rank 0 there)."""
    if runtime.is_main:
        _checkpoint(run_dir, step, model, opt, cfg, runtime)
        write_pictures(model, grid_images, cfg.train.grid, run_dir / "samples", f"_{step:07d}")
    metrics, counts = _evaluate(model, splits, cfg.train.eval_images, runtime)
    if not runtime.is_main:
        return metrics
    plot_code_usage(counts, run_dir / "samples" / f"code_usage_{step:07d}.png")
    append_jsonl(run_dir / METRICS_LOG, {"step": step, "split": "test", **metrics})
    plot_curves(read_jsonl(run_dir / TRAIN_LOG), read_jsonl(run_dir / METRICS_LOG),
                run_dir / "curves.png")
    return metrics


def _restore(run_dir: Path, model: VQVAE, opt: torch.optim.Optimizer, cfg: RunConfig,
             runtime: Runtime) -> int:
    """Every rank loads the same checkpoint (weights, optimizer, rank 0's RNG state)."""
    meta = ckpt.restore(run_dir, model, opt, ckpt.VQVAE_KIND, cfg.model)
    warn_if_global_batch_changes(meta, cfg.train.batch_size, runtime)
    return int(meta["step"])
