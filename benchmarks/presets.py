"""The stage-1 presets side by side: each trained for the same wall-clock minutes on one data
set, judged on the same held-out images by PSNR, SSIM and the reconstruction Fréchet distance of
benchmarks/sample_quality.py's classifier features (as benchmarks/sharpness.py judges).

The presets train one after another through the CLI (`vqvae train --preset P --minutes M`), each
with its own recipe (learning rate, loss, schedule, batch) and nothing else changed, so a row says
what a user gets from the preset's name alone in that budget. Run it on an otherwise idle machine:
the budget is wall-clock time.

    PYTHONPATH=src python benchmarks/presets.py --data fashion-mnist --size 32 --minutes 10
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from vqvae import DataConfig
from vqvae.store import checkpoint as ckpt

from common import command_line, environment, judging, score, train

NO_STEP_LIMIT = 10**7  # the minutes end the run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-clock budget per preset")
    parser.add_argument("--presets", nargs="+", default=["seed", "default", "vqgan"])
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


def main() -> None:
    args = parse_args()
    judge_with = judging(DataConfig(source=args.data, size=args.size), args.n)
    rows = []
    for preset in args.presets:
        run = Path(args.root) / preset
        train(["train", "--preset", preset, "--data", args.data, "--size", str(args.size),
               "--minutes", f"{args.minutes:g}", "--steps", str(NO_STEP_LIMIT),
               "--every", str(NO_STEP_LIMIT), "--seed", str(args.seed),
               *shlex.split(args.options)], run, 0)
        rows.append(row(preset, run, score(run, judge_with)))
    print(command_line(__file__))
    print(f"\n{args.data} at {args.size}px, {args.minutes:g} wall minutes per preset, seed "
          f"{args.seed}, {environment()}; {len(judge_with.held)} held-out images\n")
    print("| preset | architecture | parameters | codes | steps | training seconds | PSNR (dB) "
          "| SSIM | reconstruction Fréchet distance |\n"
          "|---|---|---:|---|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
