"""Rotation trick vs straight-through estimator: the default preset at a fixed number of steps.

Fifty et al., "Restructuring Vector Quantization with the Rotation Trick" (2024),
arXiv:2410.06424. Every seed trains the ``default`` preset twice through
:func:`vqvae.training.stage1.train_autoencoder`, with ``estimator="ste"`` and
``estimator="rotation"``: the same initial weights and batches, so the per-seed difference is
paired. On the embedded digits (16 px) and, when /usr/share/datasets/fashion-mnist exists,
Fashion-MNIST at 32 px. Usage (one
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
from vqvae.data.sources import NAMED_IDX

from common import environment

ESTIMATORS = ("ste", "rotation")
METRICS = (("psnr", "PSNR dB", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
           ("usage", "usage %", "{:.1f}"))  # (key, column label, format)


def held_out(splits: Splits, limit: int) -> Splits:
    """The first ``limit`` held-out images (0: all): the same ones for every run."""
    return splits if not limit else Splits(splits.train, splits.test.subset(torch.arange(
        min(limit, len(splits.test)))))


# The stage-1 recipes a run can train with: the seed's pixel loss and rate (what
# docs/quantizers.md's first table was measured with), or the default preset's own (L1 + cosine).
RECIPES = {"mse": {"recon_loss": "mse", "schedule": "constant"}, "preset": {}}


def run(data: DataConfig, splits: Splits, estimator: str, seed: int, steps: int,
        batch_size: int, run_dir: Path, recipe: str = "mse") -> dict:
    """Train the default preset with ``estimator`` for ``steps`` steps under ``recipe`` (a key of
    :data:`RECIPES`); its held-out metrics."""
    cfg = run_config("default", data, model={"estimator": estimator},
                     train={"steps": steps, "every": steps, "eval_count": 64, "seed": seed,
                            "batch_size": batch_size, "device": "cpu", **RECIPES[recipe]})
    start = time.perf_counter()
    result = train_autoencoder(cfg, run_dir, progress=False, splits=splits)
    m = result.metrics
    return {"estimator": estimator, "seed": seed, "steps": result.step, "recipe": recipe,
            "batch_size": batch_size, "psnr": m["psnr"],
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
                   help="training steps per digits run, 0 = skip them (default: 250)")
    p.add_argument("--fashion-steps", type=int, default=120,
                   help="training steps per Fashion-MNIST run, 0 = skip it (default: 120)")
    p.add_argument("--fashion-eval", type=int, default=1000,
                   help="held-out Fashion-MNIST images scored, the first N of t10k, 0 = all "
                        "10,000 (default: 1000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", type=Path,
                   help="keep the run folders here (default: a temporary folder, deleted)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default="mse",
                   help="mse: MSE at a constant rate (the first table's recipe); preset: the "
                        "default preset's own, L1 + cosine (default: mse)")
    p.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="print the tables of rows written by --json (runs split over "
                        "processes, e.g. one per seed) and train nothing")
    args = p.parse_args(argv)
    if args.merge:
        print(merged(args.merge))
        return
    torch.set_num_threads(1)
    sets = [("digits", DataConfig(source="digits", size=SIZES["digits"]), args.digits_steps, 0)
            ] if args.digits_steps else []
    if args.fashion_steps and Path(NAMED_IDX["fashion-mnist"][0]).is_dir():
        fashion = DataConfig(source="fashion-mnist", size=SIZES["fashion-mnist"])
        sets.append(("fashion-mnist", fashion, args.fashion_steps, args.fashion_eval))
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
                              root / f"{name}-{estimator}-{seed}", args.recipe)
                    rows.append({"data": name, **row})
                    print(f"  {name} seed {seed} {estimator}: PSNR {row['psnr']:.2f}, SSIM "
                          f"{row['ssim']:.4f}, usage {row['usage']:.1f}% "
                          f"({row['seconds']:.0f} s)", file=sys.stderr, flush=True)
            all_rows += rows
            tables.append(section(name, data.size, rows))
    if args.json:
        args.json.write_text(json.dumps(all_rows, indent=2) + "\n")
    print(f"# rotation trick vs ste, seeds {args.seeds}, {environment()}\n")
    print("\n\n".join(tables))


SIZES = {"digits": 16, "fashion-mnist": 32}  # the image size each data set trains at here


def section(name: str, size: int, rows: list[dict]) -> str:
    """One data set's heading and table."""
    recipe = rows[0].get("recipe", "mse")
    how = "MSE, constant rate" if recipe == "mse" else "the preset's L1 + cosine"
    return (f"## {name} {size}px, default preset ({how}), {rows[0]['steps']} steps, batch "
            f"{rows[0].get('batch_size', 64)}, {rows[0]['images']} held-out images\n\n"
            + table(rows))


def merged(paths: list[Path]) -> str:
    """The tables of the rows in ``paths`` (written by ``--json``), one per data set; a seed
    needs both estimators' rows, and a data set's rows one step count and recipe."""
    rows = [r for path in paths for r in json.loads(path.read_text())]
    out = []
    for name in dict.fromkeys(r["data"] for r in rows):
        mine = [r for r in rows if r["data"] == name]
        if len({(r["steps"], r.get("recipe", "mse")) for r in mine}) > 1:
            raise SystemExit(f"{name}: rows of different step counts or recipes; merge like "
                             "with like")
        done = {r["seed"] for r in mine if r["estimator"] == "ste"} & {
            r["seed"] for r in mine if r["estimator"] == "rotation"}
        out.append(section(name, SIZES[name], [r for r in mine if r["seed"] in done]))
    seeds = sorted({r["seed"] for r in rows})
    return (f"# rotation trick vs ste, seeds {seeds}, merged from {len(paths)} file(s)\n\n"
            + "\n\n".join(out))


if __name__ == "__main__":
    main()
