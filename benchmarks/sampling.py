"""Sampling speed: the KV-cached sampler against full recomputation of the prefix (the seed's way).

Prints a markdown table of tokens/s for both, measured in the same run with the same model. Full
recomputation of a 32x32 grid takes tens of minutes at batch 64 on a CPU, so by default it is
*estimated*: the cost of one step (forward over a prefix of t tokens + drawing a code) is timed at
``--points`` prefix lengths spread over the sequence and integrated over every t = 1..h*w by linear
interpolation. The table says which rows are estimated; ``--exact-max`` sets the largest grid
timed exactly (and there the estimate is printed too, as a check on the estimator).

    PYTHONPATH=src python benchmarks/sampling.py                  # default preset, 1 thread
    PYTHONPATH=src python benchmarks/sampling.py --preset seed --threads 2
    PYTHONPATH=src python benchmarks/sampling.py --maskgit-only --grids 32 --batches 64

A second table compares parallel decoding (the same preset's sizes as a ``maskgit`` prior,
``--maskgit-steps`` iterations) with the cached autoregressive sampler, at the same batch.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import numpy as np
import torch

from vqvae.config import PRIOR_PRESETS
from vqvae.models.prior import Prior, build_prior
from vqvae.models.transformer import sample_next

from common import environment, median_seconds


def cached_seconds(prior: Prior, batch: int, repeats: int) -> float:
    """Wall time of drawing ``batch`` whole grids with the KV cache."""
    return median_seconds(lambda: prior.generate(n=batch, batch_size=batch,
                                               generator=torch.Generator().manual_seed(0)),
                        repeats)


def full_exact_seconds(prior: Prior, batch: int, repeats: int) -> float:
    """Wall time of drawing ``batch`` whole grids recomputing the prefix at every step."""
    return median_seconds(lambda: prior.generate(n=batch, batch_size=batch, no_cache=True,
                                               generator=torch.Generator().manual_seed(0)),
                        repeats)


@torch.inference_mode()
def full_estimated_seconds(prior: Prior, batch: int, points: int, repeats: int) -> float:
    """Sum over t = 1..T of the time of one full-recomputation step, interpolated from
    ``points`` timed prefix lengths."""
    n = prior.cfg.seq_len
    tokens = torch.randint(0, prior.cfg.codebook_size, (batch, n))
    tokens[:, 0] = prior.start_token
    gen = torch.Generator().manual_seed(0)
    lengths = np.unique(np.linspace(1, n, points).round().astype(int))

    def step(t: int) -> None:
        sample_next(prior(tokens[:, :t])[:, -1].float(), generator=gen)

    step(int(lengths[-1]))  # warm-up
    timed = [median_seconds(lambda t=int(t): step(t), repeats) for t in lengths]
    return float(np.interp(np.arange(1, n + 1), lengths, timed).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", choices=sorted(PRIOR_PRESETS), default="default")
    parser.add_argument("--grids", type=int, nargs="+", default=[8, 32], help="grid sides")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--codebook-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="median over this many runs")
    parser.add_argument("--points", type=int, default=9, help="prefix lengths timed (estimate)")
    parser.add_argument("--exact-max", type=int, default=8,
                        help="largest grid side whose full recomputation is timed exactly")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--maskgit-steps", type=int, default=12)
    parser.add_argument("--maskgit-only", action="store_true",
                        help="only the parallel-decoding table (skips full recomputation)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"{environment()}, preset {args.preset}, K={args.codebook_size}, median of "
          f"{args.repeats}\n")
    if not args.maskgit_only:
        recompute_table(args)
    print(f"\n| grid | batch | cached AR tokens/s | maskgit tokens/s ({args.maskgit_steps} steps) "
          f"| maskgit / cached AR |")
    print("|---|---|---|---|---|")
    for side in args.grids:
        cfg = PRIOR_PRESETS[args.preset].model(args.codebook_size, side, side)
        prior, parallel = Prior(cfg).eval(), build_prior(replace(cfg, variant="maskgit")).eval()
        for batch in args.batches:
            tokens = batch * side * side
            cached = cached_seconds(prior, batch, args.repeats)
            fast = median_seconds(lambda: parallel.generate(
                n=batch, batch_size=batch, steps=args.maskgit_steps,
                generator=torch.Generator().manual_seed(0)), args.repeats)
            print(f"| {side}x{side} | {batch} | {tokens / cached:,.0f} | {tokens / fast:,.0f} | "
                  f"{cached / fast:,.1f}x |", flush=True)


def recompute_table(args: argparse.Namespace) -> None:
    print("| grid | batch | cached tokens/s | full tokens/s | speed-up | full measured as |")
    print("|---|---|---|---|---|---|")
    for side in args.grids:
        prior = Prior(PRIOR_PRESETS[args.preset].model(args.codebook_size, side, side)).eval()
        for batch in args.batches:
            tokens = batch * side * side
            cached = cached_seconds(prior, batch, args.repeats)
            if side <= args.exact_max:
                full = full_exact_seconds(prior, batch, args.repeats)
                estimate = full_estimated_seconds(prior, batch, args.points, args.repeats)
                how = f"whole sequence (estimator gives {tokens / estimate:,.1f})"
            else:
                full = full_estimated_seconds(prior, batch, args.points, args.repeats)
                how = f"estimated from {args.points} prefix lengths"
            print(f"| {side}x{side} | {batch} | {tokens / cached:,.0f} | {tokens / full:,.1f} | "
                  f"{full / cached:,.1f}x | {how} |", flush=True)


if __name__ == "__main__":
    main()
