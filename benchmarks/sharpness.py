"""Sharper reconstructions: MSE alone against the adversarial (PatchGAN) loss at the same step
budget, judged by held-out PSNR, SSIM and the Fréchet distance of reconstructions
(benchmarks/sample_quality.py's classifier features).

Every variant trains the same preset with the same seed and steps through ``vqvae train``; the
GAN variants switch their discriminator on at ``--gan-start`` (before it they are the MSE run up
to the discriminator's initialisation). Rows are means over ``--seeds``; the distance judges the
same ``--n`` held-out images for every run.

    PYTHONPATH=src python benchmarks/sharpness.py --data fashion-mnist --size 32 --steps 1500
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from sample_quality import classifier_for, default_cache, judged, reconstructions  # noqa: E402

from vqvae import DataConfig, load_splits  # noqa: E402
from vqvae.cli import main as vqvae  # noqa: E402
from vqvae.quality import ClassifierConfig, features  # noqa: E402

VARIANTS = {  # name -> extra `vqvae train` options
    "mse": [],
    "gan (hinge, adaptive weight 0.1)": ["--gan-weight", "0.1"],
    "gan + LeCAM + DiffAugment": ["--gan-weight", "0.1", "--lecam", "0.001", "--diffaug"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--gan-start", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n", type=int, default=2000, help="held-out images judged per run")
    parser.add_argument("--root", default="runs/sharpness")
    parser.add_argument("--only", nargs="*", default=None, help="variant names to run")
    args = parser.parse_args()
    root = Path(args.root)
    data = DataConfig(source=args.data, size=args.size)
    splits = load_splits(data)
    cfg = ClassifierConfig()
    classifier, _ = classifier_for(splits.train, data, cfg, default_cache(data))
    reference = features(classifier, splits.train.images)
    n = min(args.n, len(splits.test))
    held = splits.test.images[torch.randperm(len(splits.test),
                                             generator=torch.Generator().manual_seed(0))[:n]]
    rows = {}
    for name, extra in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        results = []
        for seed in args.seeds:
            run = root / f"{''.join(c if c.isalnum() else '-' for c in name)}-seed{seed}"
            if not (run / "eval.json").exists():
                options = ["train", "--preset", args.preset, "--data", args.data, "--size",
                           str(args.size), "--steps", str(args.steps), "--every",
                           str(max(1, args.steps // 3)), "--batch-size", str(args.batch_size),
                           "--seed", str(seed), "--out", str(run)]
                if extra:
                    options += [*extra, "--gan-start", str(args.gan_start)]
                print("$ vqvae " + shlex.join(options), file=sys.stderr, flush=True)
                if vqvae(options) != 0:
                    raise SystemExit(f"{name} failed")
            metrics = json.loads((run / "eval.json").read_text())
            fd = judged(classifier, [reconstructions(str(run), held)], reference)["frechet"]
            results.append((metrics["psnr"], metrics["ssim"], fd))
        rows[name] = [statistics.mean(column) for column in zip(*results)]
    print("$ PYTHONPATH=src python " + shlex.join(["benchmarks/sharpness.py", *sys.argv[1:]]))
    print(f"\n{args.preset} preset, {args.data} at {args.size}px, {args.steps} steps of "
          f"{args.batch_size}, discriminator from step {args.gan_start}, seeds {args.seeds}; "
          f"Fréchet distance of {n} held-out reconstructions (classifier features, "
          f"benchmarks/sample_quality.py)\n")
    print("| variant | PSNR (dB) | SSIM | reconstruction Fréchet distance | vs mse |\n"
          "|---|---:|---:|---:|---:|")
    base = rows.get("mse")
    for name, (psnr, ssim, fd) in rows.items():
        change = (f"{100 * (fd / base[2] - 1):+.0f}% distance, {psnr - base[0]:+.2f} dB"
                  if base and name != "mse" else "")
        print(f"| {name} | {psnr:.2f} | {ssim:.4f} | {fd:.2f} | {change} |")


if __name__ == "__main__":
    main()
