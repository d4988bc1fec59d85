"""Held-out NLL (bits/code) of the seed and the default prior after the same CPU budget.

Both priors train at the same time, each in its own ``vqvae train-prior`` process pinned to one
intra-op thread, for the same wall-clock minutes (``--minutes``); running them side by side means
a busy machine slows both alike. The CPU seconds each process actually used are read from the OS
(``os.wait4``) and printed, so an unequal share is visible. Test bits/code is the final
evaluation on every test grid (``RUN/eval.json``); the codes' unigram entropy is the baseline a
prior has to beat.

    vqvae encode /path/to/stage1-run --out codes.safetensors
    PYTHONPATH=src python benchmarks/prior_nll.py --codes codes.safetensors --minutes 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from vqvae.codes import load_codes


def unigram_bits(codes: torch.Tensor, k: int) -> float:
    """Entropy in bits of the test codes' own frequencies: a prior with no context."""
    p = torch.bincount(codes.flatten().long(), minlength=k).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log()).sum() / math.log(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--codes", required=True, help="codes file from `vqvae encode`")
    parser.add_argument("--minutes", type=float, default=4.0, help="wall minutes per prior")
    parser.add_argument("--presets", nargs="+", default=["seed", "default"])
    parser.add_argument("--out", default="runs/prior-nll", help="folder for the two runs")
    parser.add_argument("--every", type=int, default=400)
    parser.add_argument("--eval-codes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    codes = load_codes(args.codes)
    out = Path(args.out)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    procs = {}
    for preset in args.presets:
        run = out / preset
        cmd = [sys.executable, "-m", "vqvae", "train-prior", "--codes", args.codes, "--preset",
               preset, "--minutes", str(args.minutes), "--steps", "1000000000", "--every",
               str(args.every), "--eval-count", str(args.eval_codes), "--seed", str(args.seed),
               "--device", "cpu", "--out", str(run)]
        out.mkdir(parents=True, exist_ok=True)
        log = open(out / f"{preset}.log", "w")
        procs[os.fspath(run)] = (preset, subprocess.Popen(cmd, env=env, stdout=log, stderr=log),
                                 time.monotonic())
    usage = {}
    while len(usage) < len(procs):
        pid, status, rusage = os.wait4(-1, 0)
        for run, (preset, proc, started) in procs.items():
            if proc.pid == pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                usage[run] = (rusage.ru_utime + rusage.ru_stime, time.monotonic() - started,
                              proc.returncode)
    test = codes.split("test").codes
    print(f"codes: {args.codes} ({codes.grid[0]}x{codes.grid[1]} grids, K={codes.codebook_size},"
          f" {len(codes.split('train'))} train / {len(test)} test); unigram entropy of the test "
          f"codes {unigram_bits(test, codes.codebook_size):.3f} bits/code\n")
    print("| prior | params | steps | train minutes (wall) | CPU minutes (whole process, "
          "incl. final eval) | test bits/code |")
    print("|---|---|---|---|---|---|")
    for run, (preset, _, _) in procs.items():
        cpu, wall, rc = usage[run]
        if rc != 0:
            print(f"| {preset} | failed (exit {rc}), see {out / (preset + '.log')} | | | | |")
            continue
        result = json.loads((Path(run) / "eval.json").read_text())
        params = _params(Path(run))
        print(f"| {preset} | {params / 1e6:.2f}M | {result['step']} | {args.minutes:g} | "
              f"{cpu / 60:.1f} | {result['bits_per_code']:.4f} |")


def _params(run: Path) -> int:
    from vqvae.checkpoint import load_prior

    return sum(p.numel() for p in load_prior(run).parameters())


if __name__ == "__main__":
    main()
