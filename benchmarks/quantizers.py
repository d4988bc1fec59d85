"""Quantizer benchmark: every variant trained for the same CPU time on Fashion-MNIST 32x32.

Budgets are process CPU seconds (``time.process_time()``, one thread per run), not wall time, so
a busy machine slows every variant alike instead of biasing the comparison. Every step is the
training loop's (``vqvae.training.stage1.train_step``: the seed's MSE loss, Adam at ``--lr``).
Scores are on the full held-out t10k set. Usage:
``python benchmarks/quantizers.py --cpu-minutes 2 --jobs 2``.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import functools
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

from vqvae import VQVAE, DataConfig, load_splits, to_float
from vqvae.config import TrainConfig, VQVAEConfig, default_model, seed_model
from vqvae.data.sources import NAMED_IDX, BatchStream
from vqvae.evaluation.metrics import evaluate_autoencoder

from common import environment, stage1_trainer

SIZE, CHANNELS = 32, 1
RESTART_AFTER = 20  # steps: a code with a fair share of a 4096-vector batch expects ~8 hits/step


def _arch(k: int) -> VQVAEConfig:
    """The fixed architecture every non-seed variant uses: the default preset's, with a plain
    vq quantizer that each variant then changes."""
    return replace(default_model(SIZE, CHANNELS), codebook_size=k, quantizer="vq",
                   kmeans_init=False, restart_after=0, cosine=False, lookup_dim=None)


# name -> config at codebook size K. "seed" is the seed preset itself (at K=64 exactly).
VARIANTS: dict[str, Callable[[int], VQVAEConfig]] = {
    "seed preset (vq)": lambda k: replace(seed_model(SIZE, CHANNELS), codebook_size=k),
    "vq": _arch,
    "vq +kmeans +restart": lambda k: replace(_arch(k), kmeans_init=True,
                                             restart_after=RESTART_AFTER),
    "vq cosine d8 +kmeans +restart": lambda k: replace(
        _arch(k), kmeans_init=True, restart_after=RESTART_AFTER, cosine=True, lookup_dim=8),
    "ema": lambda k: replace(_arch(k), quantizer="ema"),
    "ema +kmeans +restart": lambda k: replace(_arch(k), quantizer="ema", kmeans_init=True,
                                              restart_after=RESTART_AFTER),
    "ema cosine d8 +kmeans +restart": lambda k: replace(
        _arch(k), quantizer="ema", kmeans_init=True, restart_after=RESTART_AFTER, cosine=True,
        lookup_dim=8),
    "fsq": lambda k: replace(_arch(k), quantizer="fsq"),
}


def ensure_fashion_mnist() -> None:
    """Find Debian's dataset-fashion-mnist, installing it when running as root."""
    directory, package = NAMED_IDX["fashion-mnist"]
    if Path(directory).is_dir():
        return
    if hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get"):
        print(f"{directory} not found: installing {package}", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", package], check=False)
    if not Path(directory).is_dir():
        sys.exit(f"Fashion-MNIST not found in {directory}: run `apt-get install {package}` "
                 f"(as root) and try again")


@functools.lru_cache(maxsize=1)
def _splits():  # loaded once per worker process
    return load_splits(DataConfig(source="fashion-mnist", size=SIZE, channels=CHANNELS))


def run_variant(name: str, k: int, cpu_seconds: float, batch_size: int, lr: float,
                seed: int) -> dict:
    """Train one variant for ``cpu_seconds`` of process CPU time; score it on all of t10k."""
    torch.set_num_threads(1)
    splits = _splits()
    cfg = replace(VARIANTS[name](k), image_size=SIZE, in_channels=CHANNELS)
    torch.manual_seed(seed)
    model = VQVAE(cfg).train()
    # the seed's MSE loss, Adam at a constant rate, contiguous (NCHW) memory: what every row of
    # docs/quantizers-benchmark.json trained with
    tc = TrainConfig(batch_size=batch_size, lr=lr, recon_loss="mse", channels_last=False)
    train_step = stage1_trainer(model, tc, torch.device("cpu"))
    stream = BatchStream(len(splits.train), batch_size, seed)
    step, start = 0, time.process_time()
    while time.process_time() - start < cpu_seconds:
        train_step(to_float(splits.train.images[stream.indices(step)]))
        step += 1
    spent = time.process_time() - start
    m = evaluate_autoencoder(model, splits.test.images)
    return {"variant": name, "K": k, "psnr": m["psnr"], "psnr_noq": m["psnr_noq"],
            "usage": m["usage"], "perplexity": m["perplexity"], "dead_codes": m["dead_codes"],
            "steps": step, "cpu_s": spent, "steps_per_cpu_s": step / spent,
            "test_images": m["images"]}


def table(rows: list[dict]) -> str:
    lines = ["| K | variant | test PSNR (dB) | usage % | perplexity | dead codes | steps | "
             "steps/CPU-s |", "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['K']} | {r['variant']} | {r['psnr']:.2f} | {r['usage']:.1f} | "
                     f"{r['perplexity']:.1f} | {r['dead_codes']} | {r['steps']} | "
                     f"{r['steps_per_cpu_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-minutes", type=float, default=2.0,
                   help="process CPU minutes of training per variant (default: 2)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 512],
                   help="codebook sizes K (default: 64 512)")
    p.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS),
                   metavar="NAME", help=f"which variants (default: all): {', '.join(VARIANTS)}")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs in parallel, one CPU thread each (default: 1)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    ensure_fashion_mnist()
    runs = [(name, k) for k in args.sizes for name in args.variants]
    print(f"# {len(runs)} runs x {args.cpu_minutes} CPU-min, Fashion-MNIST {SIZE}x{SIZE}, "
          f"batch {args.batch_size}, lr {args.lr}, seed {args.seed}, {environment(threads=1)} "
          f"per run",
          flush=True)
    ctx = mp.get_context("spawn")
    with cf.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        futures = {pool.submit(run_variant, name, k, 60 * args.cpu_minutes, args.batch_size,
                               args.lr, args.seed): (name, k) for name, k in runs}
        done = {}
        for future in cf.as_completed(futures):
            row = future.result()
            done[futures[future]] = row
            print(f"  done: K={row['K']} {row['variant']}: PSNR {row['psnr']:.2f}, usage "
                  f"{row['usage']:.1f}%, {row['steps']} steps", file=sys.stderr, flush=True)
    rows = [done[run] for run in runs]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    print(table(rows))


if __name__ == "__main__":
    main()
