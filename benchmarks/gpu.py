"""GPU speed of both stages: the quantizer's train step against the floor and
vector-quantize-pytorch, stage-1 steps per precision (and CUDA graphs), prior training per
precision, sampling with a CUDA-graph step against the eager cached sampler, and maskgit's
parallel decoding against the cached sampler (the stage-2 issue's >= 20x target at 32x32).

Every figure is a median over ``--repeats`` timings (CUDA synchronised) and every ratio is to a
baseline measured in the same run: the quantizer's to the floor (one distance matmul + argmin,
the gather and the loss's backward: the faster of the whole (N, K) matrix and vqvae's chunks);
stage 1's and the prior's to ``tf32`` eager (what ``--precision auto`` ran before this script);
sampling's to the eager fp32 cached sampler. Stage-1 and prior rows time the library's training
step, the loop's own (``train_step`` of ``vqvae.training.stage1`` / ``stage2``: forward under
autocast, loss, backward through the loss scaler, fused Adam / AdamW) on random uint8 images /
codes already on the GPU; "CLI" rows run ``vqvae train`` on the embedded digits and
report the loop's own steps/s (data, logging and all). Achieved TFLOP/s counts the step's
matmul and convolution FLOPs (``torch.utils.flop_counter``, forward + backward).

    python3 benchmarks/gpu.py                    # one CUDA GPU, about 6 minutes on an H200
    python3 benchmarks/gpu.py --device cpu --quick   # the same code at toy sizes: a check only

vector-quantize-pytorch is optional (``pip install 'vqvae[bench]'``); where the GPU machine has no
registry, carry its wheels (vector-quantize-pytorch, einx, torch-einops-utils, frozendict,
loguru) and install them with ``pip install --no-index --no-deps``. Without CUDA (and without
``--device cpu``) the script says so in one line and exits.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vqvae.config import (DEFAULT_PRIOR_TRAIN, LARGE_CODE_SET, PRESETS, PRIOR_PRESETS,
                          PriorTrainConfig, TrainConfig, prior_for_data)
from vqvae.data.sources import to_float
from vqvae.models.autoencoder import VQVAE
from vqvae.models.prior import build_prior
from vqvae.models.quantizers.vq import nearest_code
from vqvae.precision import loss_scaler, numerics
from vqvae.training.stage2 import PriorLoss, optimizer, train_step

from common import command_line, environment, median_seconds, stage1_trainer, sync
from quantizer_speed import OURS, anchor, have_anchor

QUANTIZER_SHAPES = [(16384, 64, 512), (65536, 64, 512), (65536, 64, 8192), (262144, 32, 16384)]
QUICK_SHAPES = [(1024, 16, 64), (4096, 8, 256)]
QUANTIZERS = {"vq": "vq", "ema": "ema", "default": "vq cosine d8 +restart (default)"}
SIDE = 32  # latent grids (B, D, 32, 32)
WARMUP = 2  # untimed calls before the timed ones (CUDA graphs and compiling take more)


# --- timing ------------------------------------------------------------------------------------


def peak_mib(fn: Callable[[], object], device: torch.device) -> float | None:
    """Memory one call of ``fn`` allocates at its peak beyond what is already held (CUDA)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def step_flops(fn: Callable[[], object]) -> int:
    """Matmul/convolution FLOPs of one call (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# --- 1. the quantizer ---------------------------------------------------------------------------


class Floor(nn.Module):
    """The unavoidable train-step work: nearest codes, their gather and mse's backward."""

    def __init__(self, dim: int, k: int, chunked: bool):
        super().__init__()
        self.codebook = nn.Parameter(torch.randn(k, dim) * 0.1)
        self.chunked = chunked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.codebook.detach()
        if self.chunked:
            idx = nearest_code(x.detach(), e)
        else:
            idx = torch.addmm(e.pow(2).sum(1), x.detach(), e.t(), alpha=-2.0).argmin(1)
        return F.mse_loss(F.embedding(idx, self.codebook), x)


def quantizer_step(name: str, n: int, dim: int, k: int, device: torch.device
                   ) -> Callable[[], None]:
    """One train step (forward + backward of a fixed decoder gradient and the quantizer's loss)
    of ``name``: ``floor whole``, ``floor chunked``, a key of QUANTIZERS, or ``vqp `` + one."""
    torch.manual_seed(0)
    z = torch.randn(n // SIDE**2, dim, SIDE, SIDE, device=device)
    z = z.contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn_like(z)
    if name.startswith("floor"):
        module = Floor(dim, k, name == "floor chunked").to(device)
        x = z.detach().permute(0, 2, 3, 1).reshape(-1, dim).requires_grad_()
        return lambda: module(x).backward()
    if name.startswith("vqp "):
        module = anchor(QUANTIZERS[name[4:]], dim, k).to(device).train()

        def run() -> None:
            out = module(z)
            outputs = [out[0]] + ([out[2].sum()] if len(out) > 2 else [])
            torch.autograd.backward(outputs, [grad] + [torch.ones_like(t) for t in outputs[1:]])
        return run
    module = OURS[QUANTIZERS[name]](dim, k).to(device).train()

    def ours() -> None:
        out = module(z)
        torch.autograd.backward([out.quantized, out.loss], [grad, torch.ones_like(out.loss)])
    return ours


def quantizer_table(shapes: list, device: torch.device, repeats: int) -> list[str]:
    anchors = have_anchor()
    lines = ["### Quantizer train step (forward + backward), ms; ratios to the floor\n",
             "| vectors x dim x codes | floor ms | quantizer | vqvae ms | vqvae / floor | "
             "vqvae MiB | vqp ms | vqp / vqvae | vqp MiB | vqvae / vqp memory |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for n, dim, k in shapes:
        floor = min(median_seconds(quantizer_step(f, n, dim, k, device), repeats,
                                   warmup=WARMUP, device=device)
                    for f in ("floor whole", "floor chunked"))
        for name in QUANTIZERS:
            step = quantizer_step(name, n, dim, k, device)
            ours = median_seconds(step, repeats, warmup=WARMUP, device=device)
            ours_mib = peak_mib(step, device)
            row = (f"| {n} x {dim} x {k} | {floor * 1e3:.2f} | {name} | {ours * 1e3:.2f} | "
                   f"{ours / floor:.2f}x | {_mib(ours_mib)} |")
            if anchors:
                theirs_step = quantizer_step(f"vqp {name}", n, dim, k, device)
                theirs = median_seconds(theirs_step, repeats, warmup=WARMUP, device=device)
                theirs_mib = peak_mib(theirs_step, device)
                share = (f"{100 * ours_mib / theirs_mib:.1f}%" if ours_mib and theirs_mib
                         else "-")
                row += (f" {theirs * 1e3:.2f} | {theirs / ours:.2f}x | {_mib(theirs_mib)} | "
                        f"{share} |")
            else:
                row += " not installed | | | |"
            lines.append(row)
            del step
        _free(device)
    return lines


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --- 2. stage 1 ---------------------------------------------------------------------------------


def stage1_step(preset: str, size: int, channels: int, batch: int, precision: str,
                compile_mode: str | None, device: torch.device) -> Callable[[], None]:
    """The loop's stage-1 step (:func:`vqvae.training.stage1.train_step`, the seed's MSE loss)
    on random uint8 images already on the device, without data loading and logging."""
    torch.manual_seed(0)
    model = VQVAE(PRESETS[preset].model(size, channels)).to(device).train()
    tc = TrainConfig(precision=precision, batch_size=batch, lr=1e-4, recon_loss="mse",
                     compile=compile_mode is not None, compile_mode=compile_mode or "default")
    step = stage1_trainer(model, tc, device)
    images = torch.randint(0, 256, (batch, channels, size, size), dtype=torch.uint8,
                           device=device)
    return lambda: step(to_float(images).contiguous(memory_format=torch.channels_last))


def stage1_table(cases: list, precisions: list[str], compiled: list, device: torch.device,
                 repeats: int, per_call: int) -> list[str]:
    lines = ["### Stage 1 train step (images already on the device); ratios to tf32 eager\n",
             "| preset, size | batch | precision | steps/s | images/s | vs tf32 eager | "
             "TFLOP/s |", "|---|---:|---|---:|---:|---:|---:|"]
    for preset, size, channels, batches in cases:
        for batch in batches:
            flops = step_flops(stage1_step(preset, size, channels, batch, "fp32", None, device))
            runs = [(p, None) for p in precisions] + [
                ("bf16", mode) for mode in compiled if (preset, size, batch) in compiled[mode]]
            base = None
            for precision, mode in runs:
                with numerics(precision, device):
                    step = stage1_step(preset, size, channels, batch, precision, mode, device)
                    seconds = median_seconds(step, repeats, per_call=per_call, device=device,
                                             warmup=3 if mode is None else 10)
                base = seconds if precision == "tf32" and mode is None else base
                label = precision + (f" + compile {mode}" if mode else "")
                ratio = f"{base / seconds:.2f}x" if base else "-"
                lines.append(f"| {preset}, {size} px x{channels} | {batch} | {label} | "
                             f"{1 / seconds:.1f} | {batch / seconds:,.0f} | {ratio} | "
                             f"{flops / seconds / 1e12:.1f} |")
                del step
            _free(device)
    return lines


def cli_rows(device: torch.device, steps: int, variants: list[list[str]]) -> list[str]:
    """``vqvae train`` of the default preset at 32 px, batch 64, on the embedded digits: the
    loop's own steps/s (median of its log lines after the first 100 steps)."""
    lines = ["### Stage 1 through `vqvae train` (default preset, digits at 32 px, batch 64)\n",
             "| options | steps/s (loop's log) | vs first row |", "|---|---:|---:|"]
    base = None
    for extra in variants:
        with tempfile.TemporaryDirectory() as tmp:
            run = Path(tmp) / "run"
            command = [sys.executable, "-m", "vqvae", "train", "--data", "digits", "--size",
                       "32", "--batch-size", "64", "--steps", str(steps), "--every", str(steps),
                       "--eval-count", "64", "--device", device.type, "--out", str(run), *extra]
            subprocess.run(command, check=True, capture_output=True, text=True)
            logged = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
            rates = [r["steps_per_s"] for r in logged if r["step"] > min(100, steps // 2)]
            rate = statistics.median(rates[:-1] or rates)  # the last window holds the save
        base = base or rate
        lines.append(f"| {' '.join(extra) or '(defaults)'} | {rate:.1f} | {rate / base:.2f}x |")
    return lines


def vqgan_rows(device: torch.device, size: int, steps: int) -> list[str]:
    """``vqvae train --preset vqgan`` at ``size`` px in bf16 with the discriminator from half-way
    (the sharper-tokenizer issue's GPU target), on the digits resized to RGB: the loop's steps/s
    before and after the discriminator starts, and the held-out PSNR it ends with."""
    lines = [f"### The vqgan preset through `vqvae train` ({size} px, bf16, batch 8, "
             f"discriminator from step {steps // 2})\n",
             "| phase | steps/s (loop's log) | final held-out PSNR (dB) |", "|---|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        command = [sys.executable, "-m", "vqvae", "train", "--preset", "vqgan", "--data",
                   "digits", "--size", str(size), "--channels", "3", "--batch-size", "8",
                   "--steps", str(steps), "--every", str(steps), "--eval-count", "16",
                   "--precision", "bf16", "--gan-weight", "0.3", "--gan-start", str(steps // 2),
                   "--device", device.type, "--out", str(run)]
        subprocess.run(command, check=True, capture_output=True, text=True)
        logged = [json.loads(line) for line in (run / "train.jsonl").read_text().splitlines()]
        psnr = json.loads((run / "eval.json").read_text())["psnr"]
    for phase, keep in (("MSE", lambda r: 1 < r["step"] <= steps // 2),
                        ("MSE + GAN", lambda r: r["step"] > steps // 2 + 1)):
        rates = [r["steps_per_s"] for r in logged if keep(r)]
        rate = f"{statistics.median(rates):.1f}" if rates else "-"
        lines.append(f"| {phase} | {rate} | {psnr:.2f} |")
    return lines


# --- 3. the prior -------------------------------------------------------------------------------


def prior_config(grid: int, codes: int, layers: int | None = None):
    cfg = PRIOR_PRESETS["default"].model(codes, grid, grid, 0)
    return cfg if layers is None else replace(cfg, layers=layers, d_model=64, heads=4)


def prior_step(cfg, batch: int, precision: str, device: torch.device) -> Callable[[], None]:
    """The loop's stage-2 step (:func:`vqvae.training.stage2.train_step`: AdamW, weight decay
    0.01, gradients clipped to 1) on random codes already on the device."""
    torch.manual_seed(0)
    prior = build_prior(cfg).to(device).train()
    tc = PriorTrainConfig(precision=precision, batch_size=batch, lr=1e-3, weight_decay=0.01,
                          grad_clip=1.0)
    loss_fn, opt = PriorLoss(prior, tc.token_dropout), optimizer(prior, tc.lr, tc.weight_decay)
    scaler = loss_scaler(tc.precision, device)
    codes = torch.randint(0, cfg.codebook_size, (batch, cfg.height, cfg.width), device=device)
    return lambda: train_step(loss_fn, prior, opt, scaler, codes, None, tc)


def prior_table(cfg, batch: int, precisions: list[str], device: torch.device, repeats: int,
                per_call: int) -> list[str]:
    tokens = batch * cfg.seq_len
    flops = step_flops(prior_step(cfg, batch, "fp32", device))
    lines = [f"### Prior training (GPT, {cfg.height}x{cfg.width} codes of {cfg.codebook_size}, "
             f"batch {batch}); ratios to tf32\n",
             "| precision | ms/step | tokens/s | vs tf32 | TFLOP/s |", "|---|---:|---:|---:|---:|"]
    base = None
    for precision in precisions:
        with numerics(precision, device):
            seconds = median_seconds(prior_step(cfg, batch, precision, device), repeats,
                                     warmup=WARMUP, per_call=per_call, device=device)
        base = seconds if precision == "tf32" else base
        ratio = f"{base / seconds:.2f}x" if base else "-"
        lines.append(f"| {precision} | {seconds * 1e3:.1f} | {tokens / seconds:,.0f} | {ratio} | "
                     f"{flops / seconds / 1e12:.1f} |")
    _free(device)
    return lines


# --- 4. sampling ------------------------------------------------------------------------------


def sampling_table(cfg, batches: list[int], device: torch.device) -> list[str]:
    torch.manual_seed(0)
    prior = build_prior(cfg).to(device).eval()
    lines = [f"### Sampling {cfg.height}x{cfg.width} grids (KV cache); ratios to eager fp32\n",
             "| batch | sampler | seconds | tokens/s | vs eager fp32 |",
             "|---:|---|---:|---:|---:|"]
    for batch in batches:
        base = None
        for graph, precision in ((False, "fp32"), (False, "bf16"), (True, "fp32"),
                                 (True, "bf16")):
            def draw() -> torch.Tensor:
                return prior.generate(n=batch, batch_size=batch, graph=graph, precision=precision,
                                      generator=torch.Generator().manual_seed(0))
            seconds = median_seconds(draw, 1, warmup=1, device=device)
            base = base or seconds
            name = ("CUDA graph" if graph and device.type == "cuda" else
                    "static cache" if graph else "eager") + f", {precision}"
            lines.append(f"| {batch} | {name} | {seconds:.2f} | "
                         f"{batch * cfg.seq_len / seconds:,.0f} | {base / seconds:.2f}x |")
        _free(device)
    return lines


def parallel_table(grid: int, codes: int, batches: list[int], steps: int,
                   device: torch.device) -> list[str]:
    """The stage-2 issue's speed target: maskgit's ``steps`` parallel iterations against the
    cached autoregressive sampler, both as the default preset builds them for a large code set
    (the seed's blocks at the same width; ``prior_for_data``), fresh weights (speed does not
    depend on them); ratios to the fastest autoregressive row of the same batch."""
    base = prior_for_data(prior_config(grid, codes), DEFAULT_PRIOR_TRAIN, LARGE_CODE_SET)[0]
    priors = {v: build_prior(replace(base, variant=v)).to(device).eval()
              for v in (base.variant, "maskgit")}
    lines = [f"### Parallel decoding: maskgit ({steps} iterations) against the cached "
             f"autoregressive sampler, {grid}x{grid} grids of {codes}; ratios to the fastest "
             f"autoregressive row of each batch\n",
             "| batch | sampler | seconds | tokens/s | vs fastest autoregressive |",
             "|---:|---|---:|---:|---:|"]
    for batch in batches:
        rows = []
        for variant, graph, precision in ((base.variant, False, "fp32"),
                                          (base.variant, False, "bf16"),
                                          (base.variant, True, "bf16"),
                                          ("maskgit", False, "fp32"), ("maskgit", False, "bf16")):
            def draw() -> torch.Tensor:
                torch.manual_seed(0)
                return priors[variant].generate(
                    n=batch, batch_size=batch, graph=graph, precision=precision, steps=steps,
                    generator=torch.Generator().manual_seed(0))
            seconds = median_seconds(draw, 1, warmup=1, device=device)
            kind = ("CUDA graph" if graph and device.type == "cuda" else "static cache" if graph
                    else "eager")
            name = (f"maskgit, {precision}" if variant == "maskgit" else
                    f"autoregressive {kind}, {precision}")
            rows.append((variant, name, seconds))
        fastest = min(sec for variant, _, sec in rows if variant != "maskgit")
        lines += [f"| {batch} | {name} | {sec:.3f} | {batch * base.seq_len / sec:,.0f} | "
                  f"{fastest / sec:.2f}x |" for _, name, sec in rows]
        _free(device)
    return lines


# --- main ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the code runs")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=None,
                        help="sections: quantizer stage1 cli prior sampling maskgit vqgan")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device here (torch.cuda.is_available() is false); "
              "it measures GPUs only (--device cpu --quick checks the code)")
        return 0
    device = torch.device(args.device)
    quick = args.quick
    sections = set(args.only or ["quantizer", "stage1", "cli", "prior", "sampling", "maskgit",
                                 "vqgan"])
    print(f"{command_line(__file__, argv, python='python3')}\n{environment(device)}\n")
    precisions = ["fp32", "tf32", "bf16", "fp16"]
    out: list[str] = []

    clock = [time.perf_counter()]

    def emit(lines: list[str]) -> None:
        now = time.perf_counter()
        print("\n".join(lines) + f"\n\n({now - clock[0]:.0f} s)\n", flush=True)
        clock[0] = now
        out.extend(lines)

    started = time.perf_counter()
    if "quantizer" in sections:
        emit(quantizer_table(QUICK_SHAPES if quick else QUANTIZER_SHAPES, device, args.repeats))
    if "stage1" in sections:
        cases = ([("default", 16, 1, [8]), ("seed", 16, 3, [4]), ("vqgan", 16, 3, [2])]
                 if quick else [("default", 32, 1, [64, 256, 1024]), ("seed", 128, 3, [64, 256]),
                                ("vqgan", 256, 3, [8])])
        # one compiled row (compiling costs ~a minute): the launch-bound case
        compiled = {} if quick else {"reduce-overhead": {("default", 32, 64)}}
        emit(stage1_table(cases, precisions, compiled, device, args.repeats,
                          per_call=2 if quick else 10))
    if "cli" in sections:
        emit(cli_rows(device, 20 if quick else 1000,
                      [[], ["--precision", "bf16"]] if quick else
                      [[], ["--precision", "bf16"],
                       ["--precision", "bf16", "--compile", "--compile-mode", "reduce-overhead"]]))
    if "prior" in sections:
        cfg = prior_config(4, 16, layers=1) if quick else prior_config(32, 512)
        emit(prior_table(cfg, 4 if quick else 64, precisions, device, args.repeats,
                         per_call=2 if quick else 10))
    if "sampling" in sections:
        cfg = prior_config(4, 16, layers=1) if quick else prior_config(32, 512)
        emit(sampling_table(cfg, [2, 4] if quick else [64, 512], device))
    if "maskgit" in sections:
        emit(parallel_table(4, 16, [2], 4, device) if quick else
             parallel_table(32, 512, [1, 64], 12, device))
    if "vqgan" in sections:  # last: a timeout cuts it, not the GPU issue's tables
        emit(vqgan_rows(device, 16 if quick else 256, 8 if quick else 200))
    print(f"({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
