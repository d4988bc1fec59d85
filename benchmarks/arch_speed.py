"""Stage-1 architectures side by side: parameters and train-step time of the presets' models
(default: resnet; vqgan: GroupNorm blocks and attention, Esser et al. 2021) per image size.

Per (size, preset): the preset's model for RGB images of that size, the loop's own step
(``vqvae.training.stage1.train_step`` through ``training_forward`` with TrainConfig's defaults,
so channels-last; the seed's MSE loss; Adam) on random images in [-1, 1] (the time does not
depend on the content). One warm-up step each (it also runs the k-means initialisation), then
blocks of ``--steps`` steps, presets interleaved, ``--rounds`` times; medians. Ratios are to
the first preset at the same size.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/arch_speed.py          # 32 and 128 px
    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/arch_speed.py --sizes 32 --rounds 5
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from vqvae import PRESETS, VQVAE
from vqvae.config import TrainConfig

from common import environment, interleaved_seconds, stage1_trainer, timing_options


class Subject:
    """One preset's model (fixed seed) and its train step."""

    def __init__(self, preset: str, size: int, batch: int, device: torch.device):
        torch.manual_seed(0)
        self.model = VQVAE(PRESETS[preset].model(size, 3)).to(device).train()
        tc = TrainConfig(batch_size=batch, lr=1e-4, recon_loss="mse")
        self.train_step = stage1_trainer(self.model, tc, device)
        self.x = (torch.rand(batch, 3, size, size, device=device) * 2 - 1).contiguous(
            memory_format=torch.channels_last)

    def params(self, part: str) -> float:
        module = self.model if part == "model" else getattr(self.model, part)
        return sum(p.numel() for p in module.parameters()) / 1e6

    def step(self) -> None:
        for value in self.train_step(self.x).values():  # the loop reads every loss term back
            value.item()


def measure(size: int, args: argparse.Namespace, device: torch.device) -> list[str]:
    subjects = {p: Subject(p, size, args.batch, device) for p in args.presets}
    for name, sub in subjects.items():
        t = time.perf_counter()
        sub.step()
        print(f"  {size}px {name}: warm-up {time.perf_counter() - t:.1f} s", file=sys.stderr,
              flush=True)
    blocks = {name: lambda sub=sub: [sub.step() for _ in range(args.steps)]
              for name, sub in subjects.items()}
    step = {name: sec / args.steps
            for name, sec in interleaved_seconds(blocks, args.rounds, device).items()}
    base = step[args.presets[0]]
    rows = []
    for name, sub in subjects.items():
        cfg = sub.model.cfg
        rows.append(f"| {size} x {size} x 3 | {name} | {cfg.latent_size} x {cfg.latent_size} | "
                    f"{sub.params('encoder'):.2f} + {sub.params('decoder'):.2f} "
                    f"({sub.params('model'):.2f}) | "
                    f"{1e3 * step[name]:,.0f} | {args.batch / step[name]:,.1f} | "
                    f"{step[name] / base:.1f}x |")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128])
    p.add_argument("--presets", nargs="+", default=["default", "vqgan"], choices=sorted(PRESETS))
    p.add_argument("--batch", type=int, default=8)
    timing_options(p, steps=2, rounds=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"{environment(device)}, batch {args.batch}, median of {args.rounds} rounds of "
          f"{args.steps} steps\n")
    print("| images | preset | code grid | params (M): encoder + decoder (all) | ms / step | "
          f"img/s | time vs {args.presets[0]} |", "|---|---|---|---:|---:|---:|---:|", sep="\n",
          flush=True)
    for size in args.sizes:
        print("\n".join(measure(size, args, device)), flush=True)


if __name__ == "__main__":
    main()
