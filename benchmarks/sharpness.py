"""Sharper reconstructions: MSE alone against the adversarial (PatchGAN) loss, judged by held-out
PSNR, SSIM and the Fréchet distance of reconstructions (benchmarks/sample_quality.py's features).

Three kinds of rows, every run training the same preset with the same seed through the CLI:

- ``mse @ S``: one MSE run per seed, trained to the largest step any row needs and kept at each
  of them (the learning rate is constant, so its checkpoint at S is the S-step MSE run);
- ``--variant NAME=OPTIONS``: a run from scratch with extra ``vqvae train`` options, its
  discriminator from ``--gan-start`` (before it, it is the MSE run);
- ``--finetune NAME=OPTIONS``: ``vqvae finetune-decoder`` of the MSE checkpoint at
  ``--finetune-from`` with OPTIONS, up to ``--steps`` in all; its control is ``mse @ steps``.

Every run is judged on the same ``--n`` held-out images. Seconds are the training loop's own
(train.jsonl, periodic saves included; a fine-tune adds its MSE start's): rough on a shared CPU,
but what an equal-CPU-time comparison needs, hence ``--mse-steps`` for longer MSE rows.

    PYTHONPATH=src python benchmarks/sharpness.py --steps 1200 --finetune-from 800 \\
        --finetune 'ft mse lr1e-4=--lr 1e-4' \\
        --finetune 'ft w0.5 lr1e-4=--gan-weight 0.5 --disc-channels 32 --lr 1e-4' \\
        --mse-steps 2000 --seeds 0 1
"""

from __future__ import annotations

import argparse
import math
import shlex
import statistics
from pathlib import Path
from typing import NamedTuple

from vqvae import DataConfig

from common import (MSE_RECIPE, command_line, judging, parse_spec, score, seconds, slug,
                    train)

GAN = "--gan-weight 0.1"
VARIANTS = {  # the rows without --variant / --finetune: name -> extra `vqvae train` options
    "gan (hinge, adaptive weight 0.1)": GAN,
    "gan + LeCAM + DiffAugment": f"{GAN} --lecam 0.001 --diffaug",
}


class Arm(NamedTuple):
    """One row: a name, its extra options and how it trains (``mse``, ``scratch``, ``finetune``);
    ``steps`` is the total step count it reaches."""

    name: str
    kind: str
    steps: int
    options: tuple[str, ...] = ()


def arms(args: argparse.Namespace) -> list[Arm]:
    """The rows to run: MSE first (the others are judged against ``mse @ steps``), then the
    fine-tunes (the cheaper GAN rows)."""
    rows = [Arm(f"mse @ {s}", "mse", s) for s in sorted({args.steps, *args.mse_steps})]
    scratch = args.variant if args.variant or args.finetune else [
        f"{name}={options}" for name, options in VARIANTS.items()]
    rows += [Arm(**_named(spec), kind="finetune", steps=args.steps) for spec in args.finetune]
    rows += [Arm(**_named(spec), kind="scratch", steps=args.steps) for spec in scratch]
    return rows


def _named(spec: str) -> dict:
    name, options = parse_spec(spec)
    return {"name": name, "options": options}


def mse_stops(args: argparse.Namespace) -> list[int]:
    """Steps at which the MSE run must keep a checkpoint (rows and the fine-tunes' start)."""
    stops = {args.steps, *args.mse_steps}
    return sorted(stops | ({args.finetune_from} if args.finetune else set()))


def recipe(args: argparse.Namespace, seed: int, steps: int, every: int) -> list[str]:
    """The `vqvae train` options every run from scratch shares: data, budget, seed, MSE."""
    return ["--data", args.data, "--size", str(args.size), "--steps", str(steps), "--every",
            str(every), "--batch-size", str(args.batch_size), "--seed", str(seed),
            *MSE_RECIPE, *shlex.split(args.model_options)]


def run_arm(arm: Arm, args: argparse.Namespace, seed: int) -> tuple[Path, float]:
    """Train ``arm`` for ``seed`` (if not done) -> (the checkpoint to judge, training seconds)."""
    root = Path(args.root)
    base = root / f"mse-seed{seed}"
    if arm.kind == "mse":
        stops = mse_stops(args)
        every = math.gcd(*stops)
        train(["train", "--preset", args.preset, *recipe(args, seed, stops[-1], every),
               "--keep-every", str(every)], base, stops[-1])
        return base / "checkpoints" / f"step-{arm.steps:07d}", seconds(base, arm.steps)
    run = root / f"{slug(arm.name)}-seed{seed}"
    if arm.kind == "scratch":
        train(["train", "--preset", args.preset, *recipe(args, seed, arm.steps, args.every),
               *arm.options, "--gan-start", str(args.gan_start)], run, arm.steps)
        return run, seconds(run, arm.steps)
    start, more = args.finetune_from, arm.steps - args.finetune_from
    train(["finetune-decoder", str(base / "checkpoints" / f"step-{start:07d}"), "--steps",
           str(more), "--every", str(args.every), *arm.options], run, more)
    return run, seconds(base, start) + seconds(run, more)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model-options", default="", help="extra `vqvae train` options of "
                        "every run trained from scratch (the MSE runs and --variant rows; "
                        "fine-tunes inherit the model), e.g. '--upsample nearest'")
    parser.add_argument("--steps", type=int, default=1500, help="steps of every non-MSE row")
    parser.add_argument("--gan-start", type=int, default=500)
    parser.add_argument("--every", type=int, default=400, help="--every of the GAN runs")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n", type=int, default=2000, help="held-out images judged per run")
    parser.add_argument("--root", default="runs/sharpness")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                        help="a run from scratch with these extra `vqvae train` options")
    parser.add_argument("--finetune", action="append", default=[], metavar="NAME=OPTIONS",
                        help="`vqvae finetune-decoder` of the MSE run at --finetune-from")
    parser.add_argument("--finetune-from", type=int, default=1000)
    parser.add_argument("--mse-steps", type=int, nargs="*", default=[],
                        help="more MSE rows (e.g. the GAN rows' training seconds in MSE steps)")
    parser.add_argument("--only", nargs="*", default=None, help="row names to run")
    args = parser.parse_args(argv)
    if args.finetune and not 0 < args.finetune_from < args.steps:
        parser.error("--finetune-from must lie between 0 and --steps")
    return args


def main() -> None:
    args = parse_args()
    judge_with = judging(DataConfig(source=args.data, size=args.size), args.n)
    n = len(judge_with.held)
    results: dict[str, list[dict[str, float]]] = {}
    for arm in arms(args):
        if args.only and arm.name not in args.only and arm.kind != "mse":
            continue
        for seed in args.seeds:
            path, secs = run_arm(arm, args, seed)
            results.setdefault(arm.name, []).append(
                {**score(path, judge_with), "seconds": secs, "seed": seed})
    print(command_line(__file__))
    print(header(args, n))
    print(table(results, f"mse @ {args.steps}"))
    if len(args.seeds) > 1:
        print("\nper seed:\n")
        print(per_seed(results))


def header(args: argparse.Namespace, n: int) -> str:
    """What the table's rows are, in one paragraph (only the kinds of rows it has)."""
    kinds = {arm.kind for arm in arms(args)}
    how = []
    if "scratch" in kinds:
        how.append(f"from scratch: discriminator from step {args.gan_start}")
    if "finetune" in kinds:
        how.append(f"fine-tunes: decoder alone from the MSE run's step {args.finetune_from}")
    return (f"\n{args.preset} preset, {args.data} at {args.size}px, batch {args.batch_size}, "
            f"seeds {args.seeds}; other rows {args.steps} steps ({'; '.join(how)}); Fréchet "
            f"distance of {n} held-out reconstructions (classifier features, "
            f"benchmarks/sample_quality.py); seconds: training loop, shared 2-core CPU, rough\n")


def table(results: dict[str, list[dict[str, float]]], control: str) -> str:
    """Means over seeds; the distance's change against ``control`` per seed, as mean (min..max)."""
    lines = ["| row | PSNR (dB) | SSIM | reconstruction Fréchet distance | vs " + control
             + " | seconds |", "|---|---:|---:|---:|---:|---:|"]
    base = results.get(control)
    for name, runs in results.items():
        mean = {k: statistics.mean(r[k] for r in runs) for k in ("psnr", "ssim", "fd", "seconds")}
        change = ""
        if base and name != control:
            pct = [100 * (r["fd"] / b["fd"] - 1) for r, b in zip(runs, base)]
            db = [r["psnr"] - b["psnr"] for r, b in zip(runs, base)]
            change = f"{statistics.mean(pct):+.0f}% distance, {statistics.mean(db):+.2f} dB"
            if len(runs) > 1:
                change += f" (seeds {min(pct):+.0f}..{max(pct):+.0f}%, " \
                          f"{min(db):+.2f}..{max(db):+.2f} dB)"
        lines.append(f"| {name} | {mean['psnr']:.2f} | {mean['ssim']:.4f} | {mean['fd']:.2f} | "
                     f"{change} | {mean['seconds']:.0f} |")
    return "\n".join(lines)


def per_seed(results: dict[str, list[dict[str, float]]]) -> str:
    """Every seed's own figures, for the spread behind the means."""
    lines = ["| row | seed | PSNR (dB) | SSIM | distance | seconds |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, runs in results.items():
        lines += [f"| {name} | {r['seed']} | {r['psnr']:.2f} | {r['ssim']:.4f} | {r['fd']:.2f} | "
                  f"{r['seconds']:.0f} |" for r in runs]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
