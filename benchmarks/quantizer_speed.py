"""Quantizer speed and memory: every vqvae quantizer against the floor (one distance matmul +
argmin) and against vector-quantize-pytorch, in train mode (forward + backward) and inference.

Every time is a median over ``--repeats`` rounds; in each round every subject of a shape runs once,
so a busy machine slows the floor, vqvae and the anchor alike, and every figure is a ratio to the
floor measured in the same run. The input is a (B, D, 32, 32) latent grid, B = vectors / 1024, in
the memory format training uses (``TrainConfig.channels_last``), as the encoder would hand it over.

In train mode the quantized output is back-propagated with a fixed gradient (what the decoder
would send), plus the quantizer's own loss. The floor is the unavoidable work:
``argmin(addmm(|e|^2, x, e^T, alpha=-2))`` over the (N, D) vectors; in train mode also the
gather ``e[idx]``, ``mse(e[idx], x)`` and its backward into x and the codebook. It is timed two
ways, over the whole (N, K) matrix and in row chunks that stay in cache (the same chunking as
``vqvae.models.quantizers.vq``), and the faster of the two is the floor.

Peak memory (Linux): each (subject, shape) runs one train step in a fresh process, inputs and
modules already built; the figure is the resident high-water mark during the step (``VmHWM``,
reset just before it) minus the resident set before it. It counts every allocation torch makes
on the CPU, the step's first-touch allocations included (no warm-up step).

    PYTHONPATH=src python benchmarks/quantizer_speed.py                 # 1 thread, all shapes
    PYTHONPATH=src python benchmarks/quantizer_speed.py --threads 2 --repeats 9
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vqvae.config import TrainConfig, fsq_levels_for
from vqvae.models.quantizers.fsq import FiniteScalarQuantizer
from vqvae.models.quantizers.vq import EMAVectorQuantizer, VectorQuantizer, lookup_rows

from common import environment

SHAPES = [(16384, 64, 512), (65536, 64, 512), (16384, 128, 64), (16384, 64, 8192)]
SIDE = 32  # latent grids are (B, D, 32, 32)
BETA = 0.25

# vqvae quantizer -> (builder(dim, K), the vector-quantize-pytorch settings it is compared with).
# lucidrains' cosine codebook cannot be learned by gradient, so its cosine anchor is the EMA one.
OURS: dict[str, Callable[[int, int], nn.Module]] = {
    "vq": lambda d, k: VectorQuantizer(k, d, BETA),
    "ema": lambda d, k: EMAVectorQuantizer(k, d, BETA, decay=0.99),
    "vq cosine d8 +restart (default)": lambda d, k: VectorQuantizer(
        k, d, BETA, cosine=True, lookup_dim=8, restart_after=20),
    "fsq": lambda d, k: FiniteScalarQuantizer(fsq_levels_for(k), d),
}
ANCHOR_SETTINGS = {
    "vq": dict(learnable_codebook=True, ema_update=False),
    "ema": dict(decay=0.99),
    "vq cosine d8 +restart (default)": dict(codebook_dim=8, use_cosine_sim=True, decay=0.99),
}


# --- the floor ---------------------------------------------------------------------------------


def floor_indices(x: torch.Tensor, e: torch.Tensor, chunked: bool) -> torch.Tensor:
    """Nearest code of every row of x (N, D): one addmm + argmin, whole or in row chunks."""
    e_sq = e.pow(2).sum(1)
    if not chunked:
        return torch.addmm(e_sq, x, e.t(), alpha=-2.0).argmin(1)
    rows = lookup_rows(x.shape[0], e.shape[0], x.device.type)
    out = torch.empty(x.shape[0], dtype=torch.long)
    buf = x.new_empty(rows, e.shape[0])
    for s in range(0, x.shape[0], rows):
        chunk = x[s:s + rows]
        torch.argmin(torch.addmm(e_sq, chunk, e.t(), alpha=-2.0, out=buf[:chunk.shape[0]]), 1,
                     out=out[s:s + rows])
    return out


class Floor(nn.Module):
    """The unavoidable work as a module, so it is timed like the quantizers."""

    def __init__(self, dim: int, k: int, chunked: bool):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(k, dim) * 0.1)
        self.chunked = chunked

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = floor_indices(x.detach(), self.codebook.detach(), self.chunked)
        if not self.training:
            return idx, x.new_zeros(())
        return idx, F.mse_loss(F.embedding(idx, self.codebook), x)


# --- subjects: (module, input, train step, inference) -------------------------------------------


def latents(n: int, dim: int, channels_last: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n // (SIDE * SIDE), dim, SIDE, SIDE, generator=g)
    return z.contiguous(memory_format=torch.channels_last) if channels_last else z


def subject(name: str, n: int, dim: int, k: int, channels_last: bool):
    """(train_step, inference) closures for a subject: 'floor whole', 'floor chunked', a vqvae
    quantizer name, or 'vqp ' + a vqvae quantizer name for its vector-quantize-pytorch anchor."""
    torch.manual_seed(0)
    z = latents(n, dim, channels_last).requires_grad_()
    grad = latents(n, dim, channels_last, seed=1)  # what the decoder would send back
    if name.startswith("floor"):
        module = Floor(dim, k, chunked=name == "floor chunked")
        x = z.detach().permute(0, 2, 3, 1).reshape(-1, dim).requires_grad_()  # (N, D)

        def run() -> list[torch.Tensor]:
            return [module(x)[1]]
    elif name.startswith("vqp "):
        module = anchor(name[4:], dim, k)

        def run() -> list[torch.Tensor]:
            out = module(z)
            return [out[0]] + ([out[2].sum()] if len(out) > 2 else [])
    else:
        module = OURS[name](dim, k)

        def run() -> list[torch.Tensor]:
            out = module(z)
            return [out.quantized, out.loss]

    def train_step() -> None:
        module.train()
        pairs = [(t, grad if t.dim() == 4 else torch.ones_like(t)) for t in run()
                 if t.requires_grad]
        torch.autograd.backward(*zip(*pairs))

    @torch.inference_mode()
    def inference() -> None:
        module.eval()
        run()

    return train_step, inference


def anchor(name: str, dim: int, k: int) -> nn.Module:
    """vector-quantize-pytorch's module with the settings closest to vqvae's ``name``: the
    seed's straight-through estimator (no rotation trick), commitment weight 0.25, (B, D, H, W)
    input."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from vector_quantize_pytorch import FSQ, VectorQuantize
    if name == "fsq":
        return FSQ(list(fsq_levels_for(k)), dim, channel_first=True)
    return VectorQuantize(dim, k, commitment_weight=BETA, rotation_trick=False,
                          accept_image_fmap=True, **ANCHOR_SETTINGS[name])


def have_anchor() -> bool:
    try:
        import vector_quantize_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


# --- timing ------------------------------------------------------------------------------------


def time_shape(names: list[str], n: int, dim: int, k: int, repeats: int,
               channels_last: bool) -> dict[tuple[str, str], float]:
    """Median seconds per (subject, mode), the subjects interleaved in every round."""
    fns = {}
    for name in names:
        train_step, inference = subject(name, n, dim, k, channels_last)
        fns[name, "train"], fns[name, "inference"] = train_step, inference
    for fn in fns.values():  # warm-up: lazy init, allocator, one-off costs
        fn()
    times: dict[tuple[str, str], list[float]] = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def speed_tables(timings: dict, names: list[str], anchors: bool) -> str:
    out = []
    for mode in ("train", "inference"):
        title = ("train step (forward + backward)" if mode == "train"
                 else "inference (forward, no grad)")
        out += [f"\n**{title}**: ms, and ratios to the floor of the same run\n",
                "| vectors x dim x codes | floor ms (whole / chunked) | quantizer | vqvae ms | "
                "vqvae / floor |" + (" vqp ms | vqp / floor | vqp / vqvae |" if anchors else ""),
                "|---|---:|---|---:|---:|" + ("---:|---:|---:|" if anchors else "")]
        for (n, dim, k), t in timings.items():
            whole, chunked = t["floor whole", mode], t["floor chunked", mode]
            floor = min(whole, chunked)
            for name in names:
                ours = t[name, mode]
                row = (f"| {n} x {dim} x {k} | {floor * 1e3:.1f} ({whole * 1e3:.1f} / "
                       f"{chunked * 1e3:.1f}) | {name} | {ours * 1e3:.1f} | {ours / floor:.2f}x |")
                if anchors:
                    theirs = t[f"vqp {name}", mode]
                    row += (f" {theirs * 1e3:.1f} | {theirs / floor:.2f}x | "
                            f"{theirs / ours:.1f}x |")
                out.append(row)
    return "\n".join(out)


# --- peak memory -------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_child(name: str, n: int, dim: int, k: int, channels_last: bool) -> None:
    """In a fresh process: build, then one train step; print the step's extra peak RSS (MiB).

    The high-water mark is reset just before the step (``/proc/self/clear_refs``), so neither
    the start-up nor the parent's memory (``ru_maxrss`` keeps the forked parent's) counts."""
    torch.set_num_threads(1)
    train_step, _ = subject(name, n, dim, k, channels_last)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    train_step()
    print(json.dumps({"peak_mib": max(0, _status_kib("VmHWM") - before) / 1024}))


def peak_mib(name: str, n: int, dim: int, k: int, channels_last: bool) -> float:
    cmd = [sys.executable, __file__, "--peak-child", name, str(n), str(dim), str(k)]
    if channels_last:
        cmd.append("--channels-last")
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def memory_table(shapes: list[tuple[int, int, int]], names: list[str], anchors: bool,
                 channels_last: bool) -> str:
    cols = ["floor whole", "floor chunked"] + names + ([f"vqp {n}" for n in names]
                                                       if anchors else [])
    out = ["\n**peak memory of one train step** (MiB above the resident set before it; fresh "
           "process per cell)\n", "| vectors x dim x codes | " + " | ".join(cols) + " |",
           "|---|" + "---:|" * len(cols)]
    for n, dim, k in shapes:
        cells = [f"{peak_mib(c, n, dim, k, channels_last):,.0f}" for c in cols]
        out.append(f"| {n} x {dim} x {k} | " + " | ".join(cells) + " |")
        print(out[-1], file=sys.stderr, flush=True)
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: 1)")
    p.add_argument("--repeats", type=int, default=7, help="rounds; medians over them")
    p.add_argument("--shapes", nargs="+", default=[f"{n}x{d}x{k}" for n, d, k in SHAPES],
                   help="vectors x dim x codes, e.g. 16384x64x512")
    p.add_argument("--quantizers", nargs="+", choices=list(OURS), default=list(OURS),
                   metavar="NAME", help=f"default: all of {', '.join(OURS)}")
    p.add_argument("--no-anchor", action="store_true", help="skip vector-quantize-pytorch")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory table")
    p.add_argument("--no-speed", action="store_true", help="only the peak-memory table")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   default=TrainConfig().channels_last,
                   help="latents in channels-last memory (default: training's default)")
    p.add_argument("--peak-child", nargs=4, metavar=("SUBJECT", "N", "D", "K"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.peak_child:
        name, n, dim, k = args.peak_child
        return peak_child(name, int(n), int(dim), int(k), args.channels_last)
    torch.set_num_threads(args.threads)
    anchors = not args.no_anchor
    if anchors and not have_anchor():
        sys.exit("vector-quantize-pytorch is not installed: `pip install -e '.[bench]'` "
                 "(or pass --no-anchor)")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    names = list(args.quantizers)
    version = ""
    if anchors:
        from importlib.metadata import version as pkg_version
        version = f", vector-quantize-pytorch {pkg_version('vector-quantize-pytorch')}"
    print(f"{environment()}{version}, median of {args.repeats} interleaved rounds, latents "
          f"{'channels-last' if args.channels_last else 'contiguous (NCHW)'}", flush=True)
    subjects = ["floor whole", "floor chunked"] + names + (
        [f"vqp {n}" for n in names] if anchors else [])
    timings = {}
    for n, dim, k in ([] if args.no_speed else shapes):
        timings[n, dim, k] = time_shape(subjects, n, dim, k, args.repeats, args.channels_last)
        print(f"  timed {n} x {dim} x {k}", file=sys.stderr, flush=True)
    if timings:
        print(speed_tables(timings, names, anchors), flush=True)
    if not args.no_memory:
        print(memory_table(shapes, names, anchors, args.channels_last), flush=True)


if __name__ == "__main__":
    main()
