"""Rotation trick vs straight-through estimator: the default preset at a fixed number of steps.

Fifty et al., "Restructuring Vector Quantization with the Rotation Trick" (2024),
arXiv:2410.06424. Every seed trains the ``default`` preset twice through
:func:`vqvae.train.train_autoencoder`, with ``estimator="ste"`` and ``estimator="rotation"``: the
same initial weights and batches, so the per-seed difference is paired. On the embedded digits
(16 px) and, when /usr/share/datasets/fashion-mnist exists, Fashion-MNIST at 32 px. Usage (one
CPU thread, ~10 minutes): ``OMP_NUM_THREADS=1 python benchmarks/rotation_trick.py``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vqvae import DataConfig, Splits, load_splits, run_config, train_autoencoder
from vqvae.data import NAMED_IDX

ESTIMATORS = ("ste", "rotation")
METRICS = (("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
           ("usage", "usage %", "{:.1f}"))  # (key, column label, format)


def held_out(splits: Splits, limit: int) -> Splits:
    """The first ``limit`` held-out images (0: all): the same ones for every run."""
    return splits if not limit else Splits(splits.train, splits.test.subset(torch.arange(
        min(limit, len(splits.test)))))


def run(data: DataConfig, splits: Splits, estimator: str, seed: int, steps: int,
        batch_size: int, run_dir: Path) -> dict:
    """Train the default preset with ``estimator`` for ``steps`` steps; its held-out metrics.
    MSE at a constant rate, the recipe docs/quantizers.md's table was measured with (the preset's
    is now L1 + cosine)."""
    cfg = run_config("default", data, model={"estimator": estimator},
                     train={"steps": steps, "every": steps, "eval_count": 64, "seed": seed,
                            "batch_size": batch_size, "device": "cpu", "recon_loss": "mse",
                            "schedule": "constant"})
    start = time.perf_counter()
    result = train_autoencoder(cfg, run_dir, progress=False, splits=splits)
    m = result.metrics
    return {"estimator": estimator, "seed": seed, "steps": result.step, "psnr": m["psnr"],
            "ssim": m["ssim"], "usage": m["usage"], "perplexity": m["perplexity"],
            "images": m["images"], "seconds": time.perf_counter() - start}


def _mean_std(values: list[float], fmt: str, signed: bool = False) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    mean = ("{:+" + fmt[2:]).format(statistics.mean(values)) if signed else fmt.format(
        statistics.mean(values))
    return f"{mean} ± {fmt.format(std)}"


def table(rows: list[dict]) -> str:
    """Per seed: each metric with ste, with rotation and their difference; then mean ± std
    (sample std over seeds) and how many seeds rotation won."""
    runs = {(r["seed"], r["estimator"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    head = " | ".join(f"{label} {part}" for _, label, _ in METRICS
                      for part in ("ste", "rotation", "diff"))
    lines = [f"| seed | {head} |", "|---:" * (1 + 3 * len(METRICS)) + "|"]
    diffs: dict[str, list[float]] = {key: [] for key, _, _ in METRICS}
    for seed in seeds:
        cells = []
        for key, _, fmt in METRICS:
            a, b = runs[seed, "ste"][key], runs[seed, "rotation"][key]
            diffs[key].append(b - a)
            cells += [fmt.format(a), fmt.format(b), ("{:+" + fmt[2:]).format(b - a)]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    cells = []
    for key, _, fmt in METRICS:
        cells += [_mean_std([runs[s, e][key] for s in seeds], fmt) for e in ESTIMATORS]
        cells.append(_mean_std(diffs[key], fmt, signed=True))
    lines.append("| mean ± std | " + " | ".join(cells) + " |")
    wins = [f"{label} {sum(d > 0 for d in diffs[key])}/{len(seeds)}"
            for key, label, _ in METRICS]
    lines.append(f"\nrotation better than ste (paired, per seed): {', '.join(wins)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                   help="training seeds; each trains both estimators (default: 0 1 2)")
    p.add_argument("--digits-steps", type=int, default=250,
                   help="training steps per digits run (default: 250)")
    p.add_argument("--fashion-steps", type=int, default=120,
                   help="training steps per Fashion-MNIST run, 0 = skip it (default: 120)")
    p.add_argument("--fashion-eval", type=int, default=1000,
                   help="held-out Fashion-MNIST images scored, the first N of t10k, 0 = all "
                        "10,000 (default: 1000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path,
                   help="keep the run folders here (default: a temporary folder, deleted)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    sets = [("digits", DataConfig(source="digits", size=16), args.digits_steps, 0)]
    if args.fashion_steps and Path(NAMED_IDX["fashion-mnist"][0]).is_dir():
        sets.append(("fashion-mnist", DataConfig(source="fashion-mnist", size=32),
                     args.fashion_steps, args.fashion_eval))
    elif args.fashion_steps:
        print(f"{NAMED_IDX['fashion-mnist'][0]} not found: digits only", file=sys.stderr)
    all_rows, tables = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        for name, data, steps, limit in sets:
            splits = held_out(load_splits(data), limit)
            rows = []
            for seed in args.seeds:
                for estimator in ESTIMATORS:
                    row = run(data, splits, estimator, seed, steps, args.batch_size,
                              root / f"{name}-{estimator}-{seed}")
                    rows.append({"data": name, **row})
                    print(f"  {name} seed {seed} {estimator}: PSNR {row['psnr']:.2f}, SSIM "
                          f"{row['ssim']:.4f}, usage {row['usage']:.1f}% "
                          f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
            all_rows += rows
            tables.append(f"## {name} {data.size}px, default preset, {steps} steps, batch "
                          f"{args.batch_size}, {rows[0]['images']} held-out images\n\n"
                          + table(rows))
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=2) + "\n")
    print(f"# rotation trick vs ste, seeds {args.seeds}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s)\n")
    print("\n\n".join(tables))


if __name__ == "__main__":
    main()
