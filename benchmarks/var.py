"""Next-scale (VAR) sampling against the raster prior: transformer passes per image and images per
second, the same width and depth, random weights (speed does not depend on training).

Both priors draw a ``--grid`` x ``--grid`` code grid (the var prior: its multiscale token maps,
:func:`vqvae.config.default_scales`) at each ``--batches`` size, timed in the same process,
interleaved round by round so that a busy machine slows them alike. The raster prior is timed as
the default preset builds it on a large code set (the seed's post-norm blocks) and on GPT blocks
(the var prior's blocks).

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/var.py                # 32x32, batch 1, 64
    PYTHONPATH=src python benchmarks/var.py --grid 16 --batches 1 --rounds 3
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from vqvae.config import PriorConfig, default_prior, default_scales
from vqvae.models.prior import build_prior

from common import command_line, environment, interleaved_seconds


def priors(grid: int, codebook_size: int) -> dict[str, torch.nn.Module]:
    """The raster prior (seed blocks, as the default preset picks on a large set; GPT blocks)
    and the var prior, all at the default preset's width and depth, in eval mode."""
    base = replace(default_prior(codebook_size, grid, grid), dropout=0.0)
    cfgs: dict[str, PriorConfig] = {
        "raster (default: seed blocks)": replace(base, variant="seed"),
        "raster (GPT blocks)": base,
        "var (GPT blocks, block-causal)": replace(base, variant="var",
                                                 scales=default_scales(grid)),
    }
    torch.manual_seed(0)
    return {name: build_prior(cfg).eval() for name, cfg in cfgs.items()}


def passes(prior: torch.nn.Module) -> int:
    """Transformer passes (calls of the block stack) to draw one image."""
    calls = []
    hook = prior.stack.register_forward_hook(lambda *args: calls.append(1))
    prior.generate(n=1, batch_size=1)
    hook.remove()
    return len(calls)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", type=int, default=32, help="code grid side (default: 32)")
    parser.add_argument("--codebook-size", type=int, default=512, help="codes K (default: 512)")
    parser.add_argument("--batches", default="1,64", help="batch sizes (default: 1,64)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (default: 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    models = priors(args.grid, args.codebook_size)
    print(command_line(__file__, argv))
    print(environment("cpu", args.threads))
    scales = models["var (GPT blocks, block-causal)"].cfg.scales
    print(f"{args.grid}x{args.grid} grid of K = {args.codebook_size}; var scales "
          f"{','.join(map(str, scales))} ({sum(s * s for s in scales)} tokens); d_model "
          f"{next(iter(models.values())).cfg.d_model}, "
          f"{next(iter(models.values())).cfg.layers} layers\n")
    print("| prior | passes / image | batch | s / batch | images / s |")
    print("|---|---|---|---|---|")
    count = {name: passes(m) for name, m in models.items()}
    for batch in (int(b) for b in args.batches.split(",")):
        fns = {name: (lambda m=m: m.generate(n=batch, batch_size=batch, temperature=1.0))
               for name, m in models.items()}
        for fn in fns.values():
            fn()  # warm-up
        seconds = interleaved_seconds(fns, args.rounds)
        for name, s in seconds.items():
            print(f"| {name} | {count[name]} | {batch} | {s:.3f} | {batch / s:.1f} |", flush=True)


if __name__ == "__main__":
    main()
