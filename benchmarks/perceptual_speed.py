"""Perceptual-loss speed: one forward + backward of ``LPIPS`` (the loss a training step would
add) on a batch of RGB reconstructions against their targets, per image size.

The weights are a fresh module's (speed does not depend on them). Gradients flow to the
reconstructions only, as in training; the targets need none. After ``--warmup`` calls, ``--reps``
timed calls per size; figures are medians. The forward alone (no graph) is timed beside it.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/perceptual_speed.py
    PYTHONPATH=src python benchmarks/perceptual_speed.py --sizes 32 64 128 --threads 2
"""

from __future__ import annotations

import argparse

import torch

from vqvae import LPIPS

from common import environment, median_seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--channels", type=int, default=3, choices=(1, 3))
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lpips = LPIPS()
    print(f"{environment()}, batch "
          f"{args.batch_size} x {args.channels} channels, median of {args.reps}\n")
    print("| size | forward + backward | per image | forward only |\n|---|---:|---:|---:|")
    for size in args.sizes:
        shape = (args.batch_size, args.channels, size, size)
        x = (torch.rand(shape) * 2 - 1).requires_grad_(True)
        y = torch.rand(shape) * 2 - 1

        def step():
            x.grad = None
            lpips(x, y).mean().backward()

        def forward():
            with torch.no_grad():
                lpips(x, y)

        both = median_seconds(step, args.reps, warmup=args.warmup)
        fwd = median_seconds(forward, args.reps, warmup=args.warmup)
        print(f"| {size} px | {1e3 * both:,.0f} ms | {1e3 * both / args.batch_size:,.1f} ms | "
              f"{1e3 * fwd:,.0f} ms |")


if __name__ == "__main__":
    main()
