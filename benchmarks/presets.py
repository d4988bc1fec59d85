"""The stage-1 presets side by side: each trained for the same wall-clock minutes on one data
set, judged on the same held-out images by PSNR, SSIM and the reconstruction Fréchet distance of
benchmarks/sample_quality.py's classifier features (as benchmarks/sharpness.py judges).

The presets train one after another through the CLI (`vqvae train --preset P --minutes M`), each
with its own recipe (learning rate, loss, schedule, batch) and nothing else changed, so a row says
what a user gets from the preset's name alone in that budget. Run it on an otherwise idle machine:
the budget is wall-clock time.

    PYTHONPATH=src python benchmarks/presets.py --data fashion-mnist --size 32 --minutes 10

With ``--variant NAME=OPTIONS`` the rows are named option sets instead (a preset with options,
e.g. ``'today=--preset default --sharpen 0'``), with ``--seeds`` several seeds each and a mean
row per variant with its change against the first variant; ``--steps`` bounds every run by steps
rather than minutes (a fair budget on a shared machine, where minutes are not).
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
from pathlib import Path

from vqvae import DataConfig
from vqvae.store import checkpoint as ckpt

from common import command_line, environment, judging, parse_spec, score, slug, train

NO_STEP_LIMIT = 10**7  # the minutes end the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per preset")
    parser.add_argument("--presets", nargs="+", default=["seed", "default", "vqgan"])
    parser.add_argument("--steps", type=int, default=None,
                        help="a step budget per run instead of --minutes")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                        help="rows of named `vqvae train` options instead of --presets")
    parser.add_argument("--seeds", type=int, nargs="+", default=None,
                        help="seeds of every row (default: --seed)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=2000, help="held-out images judged per run")
    parser.add_argument("--root", default="runs/presets")
    parser.add_argument("--options", default="", help="extra `vqvae train` options of every run")
    return parser.parse_args(argv)


def row(preset: str, run: Path, judged: dict[str, float]) -> str:
    model = ckpt.load_autoencoder(run)
    cfg = model.cfg
    side = cfg.image_size // 2 ** cfg.downsamples
    params = sum(p.numel() for p in model.parameters()) / 1e6
    state = json.loads((ckpt.resolve(run) / "state.json").read_text())  # the last checkpoint's
    return (f"| {preset} | {cfg.architecture} | {params:.2f}M | {side}x{side} x "
            f"{cfg.codebook_size} | {state['step']} | {state['seconds']:.0f} | "
            f"{judged['psnr']:.2f} | {judged['ssim']:.4f} | {judged['fd']:.2f} |")


def budget(args: argparse.Namespace) -> list[str]:
    if args.steps:
        return ["--steps", str(args.steps), "--every", str(args.steps)]
    return ["--minutes", f"{args.minutes:g}", "--steps", str(NO_STEP_LIMIT),
            "--every", str(NO_STEP_LIMIT)]


def variants(args: argparse.Namespace) -> None:
    """Named option sets, each over ``--seeds``: a row per run, then a mean row per variant."""
    judge_with = judging(DataConfig(source=args.data, size=args.size), args.n)
    seeds = args.seeds or [args.seed]
    rows, means = [], []
    for spec in args.variant:
        name, options = parse_spec(spec)
        scores = []
        for seed in seeds:
            run = Path(args.root) / slug(name) / f"seed{seed}"
            train(["train", *options, "--data", args.data, "--size", str(args.size),
                   *budget(args), "--seed", str(seed), *shlex.split(args.options)], run,
                  args.steps or 0)
            scores.append(score(run, judge_with))
            rows.append(row(f"{name} (seed {seed})", run, scores[-1]))
        means.append((name, {k: statistics.mean(s[k] for s in scores) for k in scores[0]},
                      [s["fd"] for s in scores], [s["psnr"] for s in scores]))
    print(command_line(__file__))
    what = f"{args.steps} steps" if args.steps else f"{args.minutes:g} wall minutes"
    print(f"\n{args.data} at {args.size}px, {what} per run, seeds {seeds}, {environment()}; "
          f"{len(judge_with.held)} held-out images\n")
    print("| run | architecture | parameters | codes | steps | training seconds | PSNR (dB) "
          "| SSIM | reconstruction Fréchet distance |\n"
          "|---|---|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    print("\n| variant | PSNR (dB) | SSIM | distance | against the first (seeds) |\n"
          "|---|---:|---:|---:|---|")
    _, base, base_fd, base_psnr = means[0]
    for name, mean, fds, psnrs in means:
        change = (f"{mean['fd'] / base['fd'] - 1:+.0%} distance, "
                  f"{mean['psnr'] - base['psnr']:+.2f} dB (seeds "
                  + ", ".join(f"{f / b - 1:+.0%} {p - q:+.2f} dB"
                              for f, b, p, q in zip(fds, base_fd, psnrs, base_psnr)) + ")")
        print(f"| {name} | {mean['psnr']:.2f} | {mean['ssim']:.4f} | {mean['fd']:.2f} | "
              f"{change} |")


def main() -> None:
    args = parse_args()
    if args.variant:
        return variants(args)
    judge_with = judging(DataConfig(source=args.data, size=args.size), args.n)
    rows = []
    for preset in args.presets:
        run = Path(args.root) / preset
        train(["train", "--preset", preset, "--data", args.data, "--size", str(args.size),
               *budget(args), "--seed", str(args.seed), *shlex.split(args.options)], run,
              args.steps or 0)
        rows.append(row(preset, run, score(run, judge_with)))
    print(command_line(__file__))
    what = f"{args.steps} steps" if args.steps else f"{args.minutes:g} wall minutes"
    print(f"\n{args.data} at {args.size}px, {what} per preset, seed "
          f"{args.seed}, {environment()}; {len(judge_with.held)} held-out images\n")
    print("| preset | architecture | parameters | codes | steps | training seconds | PSNR (dB) "
          "| SSIM | reconstruction Fréchet distance |\n"
          "|---|---|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
