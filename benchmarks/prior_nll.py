"""Held-out bits/code and sample distance of the seed and the default prior after the same budget.

For each budget in ``--minutes`` the priors train at the same time, each in its own
``vqvae train-prior`` process pinned to one intra-op thread, for the same wall-clock minutes;
running them side by side means a busy machine slows both alike. The CPU seconds each process
actually used are read from the OS (``os.wait4``) and printed, so an unequal share is visible.
Test bits/code is the final evaluation on every test grid (``RUN/eval.json``); the codes' unigram
entropy is the baseline a prior has to beat. With ``--draws`` > 0 each prior's samples are also
judged as ``sample_quality.py`` does (a classifier-feature Fréchet distance to the training
images, mean ± sd over draws of ``--n`` samples), after both arms of a budget have finished, and
the share of sampled grids that are copies of a training grid (a memorising prior's distance
looks good: read the two together).

    vqvae encode /path/to/stage1-run --out codes.safetensors
    PYTHONPATH=src python benchmarks/prior_nll.py --codes codes.safetensors --minutes 2 5 10

``--arm NAME=PRESET [OPTIONS]`` adds an arm with ``vqvae train-prior`` options, e.g.
``--arm "small=default --d-model 128 --heads 4"``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from vqvae.evaluation.quality import copied_share
from vqvae.generation.codes import load_codes, stage1_data
from vqvae.store import checkpoint as ckpt

from common import command_line, judged, judging, prior_samples


@dataclass(frozen=True)
class Arm:
    name: str
    options: tuple[str, ...]  # train-prior options: --preset and any overrides


@dataclass(frozen=True)
class Trained:
    arm: Arm
    run: Path
    cpu_s: float
    wall_s: float
    returncode: int


def unigram_bits(codes: torch.Tensor, k: int) -> float:
    """Entropy in bits of the test codes' own frequencies: a prior with no context."""
    p = torch.bincount(codes.flatten().long(), minlength=k).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum() / math.log(2))


def parse_arm(text: str) -> Arm:
    """``NAME=PRESET [OPTIONS]`` or a bare preset name -> an :class:`Arm`."""
    name, _, rest = text.partition("=")
    words = shlex.split(rest) if rest else [name]
    return Arm(name, ("--preset", words[0], *words[1:]))


def train_side_by_side(arms: list[Arm], codes: str, minutes: float, out: Path,
                       args: argparse.Namespace) -> list[Trained]:
    """Start one train-prior process per arm at once, each for ``minutes`` on one thread; wait
    for all and return the CPU seconds the OS charged each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out.mkdir(parents=True, exist_ok=True)
    procs = {}
    for arm in arms:
        run = out / arm.name
        cmd = [sys.executable, "-m", "vqvae", "train-prior", "--codes", codes, *arm.options,
               "--minutes", str(minutes), "--steps", "1000000000", "--every", str(args.every),
               "--eval-count", str(args.eval_codes), "--seed", str(args.seed), "--device", "cpu",
               "--out", str(run)]
        with open(out / f"{arm.name}.log", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=log)
        procs[proc.pid] = (arm, run, time.monotonic())
    done = []
    while len(done) < len(procs):
        pid, status, rusage = os.wait4(-1, 0)
        if pid in procs:
            arm, run, started = procs[pid]
            done.append(Trained(arm, run, rusage.ru_utime + rusage.ru_stime,
                                time.monotonic() - started, os.waitstatus_to_exitcode(status)))
    order = [arm.name for arm in arms]
    return sorted(done, key=lambda t: order.index(t.arm.name))


class Judge:
    """The sample distance of ``sample_quality.py`` for priors over one stage-1 model's data:
    its cached classifier and the training images' features, built once."""

    def __init__(self, stage1: str, args: argparse.Namespace, train_codes: torch.Tensor):
        self.data = stage1_data(stage1, ckpt.load_autoencoder(stage1))
        self.judging = judging(self.data, args.n)
        self.n, self.args, self.train_codes = len(self.judging.held), args, train_codes
        self.floor = judged(self.judging.classifier, [self.judging.held], self.judging.reference)

    def prior(self, run: Path) -> dict:
        """judged() over ``--draws`` sets of n samples (seeds 0, 1, ...), with ``copied``: the
        mean share of sampled grids that are copies of a training grid."""
        held = self.judging.held
        draws = prior_samples(str(run), self.n, held.shape[1:], self.args.draws)
        result = judged(self.judging.classifier, [d.images for d in draws],
                        self.judging.reference)
        copied = [copied_share(d.codes.split("samples").codes, self.train_codes) for d in draws]
        return {**result, "copied": sum(copied) / len(copied)}


def distance(result: dict | None) -> str:
    if result is None:
        return "n/a"
    sd = f" ± {result['frechet_sd']:.1f}" if result["frechet_sd"] is not None else ""
    return f"{result['frechet']:.1f}{sd}"


def table_row(minutes: float, trained: Trained, judge: Judge | None, out: Path) -> str:
    if trained.returncode != 0:
        return (f"| {minutes:g} | {trained.arm.name} | failed (exit {trained.returncode}), see "
                f"{out / (trained.arm.name + '.log')} | | | | | | |")
    result = json.loads((trained.run / "eval.json").read_text())
    quality = judge.prior(trained.run) if judge else None
    confident = f"{100 * quality['confident']:.1f}%" if quality else "n/a"
    copied = f"{100 * quality['copied']:.1f}%" if quality else "n/a"
    return (f"| {minutes:g} | {trained.arm.name} | {_params(trained.run) / 1e6:.2f}M | "
            f"{result['step']} | {trained.cpu_s / 60:.1f} | {result['bits_per_code']:.4f} | "
            f"{distance(quality)} | {confident} | {copied} |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codes", required=True, help="codes file from `vqvae encode`")
    parser.add_argument("--minutes", type=float, nargs="+", default=[4.0],
                        help="wall minutes per prior; one row per budget and arm")
    parser.add_argument("--presets", nargs="+", default=["seed", "default"],
                        help="arms that are plain presets")
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=PRESET [OPTIONS]",
                        help="an arm with train-prior options (instead of --presets)")
    parser.add_argument("--out", default="runs/prior-nll", help="folder for the runs")
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--eval-codes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--draws", type=int, default=3,
                        help="sets of --n samples judged per prior (0: no sample distance)")
    parser.add_argument("--n", type=int, default=1000, help="samples per draw (at most the "
                        "held-out size)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    arms = [parse_arm(a) for a in args.arm] or [parse_arm(p) for p in args.presets]
    codes = load_codes(args.codes)
    test = codes.split("test").codes
    print(command_line(__file__, argv))
    print(f"\ncodes: {args.codes} ({codes.grid[0]}x{codes.grid[1]} grids, K={codes.codebook_size},"
          f" {len(codes.split('train'))} train / {len(test)} test); unigram entropy of the test "
          f"codes {unigram_bits(test, codes.codebook_size):.3f} bits/code", flush=True)
    judge = Judge(codes.stage1, args, codes.split("train").codes) if args.draws else None
    if judge:
        print(f"sample distance: {judge.data.source} at {judge.data.size}px, {args.draws} draws "
              f"of {judge.n} samples per prior (mean ± sd); held-out images (the floor): "
              f"{distance(judge.floor)}", flush=True)
    print("\n| minutes (wall) | prior | params | steps | CPU minutes (whole process) | "
          "test bits/code | sample distance | confident (>= 0.8) | copies of training grids |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    for minutes in args.minutes:
        out = Path(args.out) / f"{minutes:g}min"
        for trained in train_side_by_side(arms, args.codes, minutes, out, args):
            print(table_row(minutes, trained, judge, out), flush=True)


def _params(run: Path) -> int:
    return sum(p.numel() for p in ckpt.load_prior(run).parameters())


if __name__ == "__main__":
    main()
