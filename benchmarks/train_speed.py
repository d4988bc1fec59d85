"""Stage-1 training speed: images/s of the seed preset through the real data path against
pre-loaded float tensors, and with torch.compile and channels-last memory on and off.

32 x 32: Fashion-MNIST (``/usr/share/datasets/fashion-mnist``). 128 x 128: a synthetic folder of
JPEGs written to a temporary directory (Fashion-MNIST images upsampled to 160 px and tinted to
RGB), loaded by the ordinary folder source, which decodes, resizes and caches them as uint8 once.

Per (size, variant) the train step is the loop's own (``vqvae.training.stage1.train_step``
through ``training_forward``, Adam, the seed's MSE loss); the batch comes either from the loop's
``next_batch`` (uint8 cache -> float, per step) or from a list of float tensors made before
timing. "pipeline cost, measured" is preloaded / pipeline
images/s - 1 (noisy: two timings); "next_batch / step" times the batch preparation alone (64
batches) against a preloaded step, the cost the pipeline adds by construction. Blocks of
``--steps`` steps of every (variant, data) pair run interleaved, ``--rounds`` times; figures are
medians over rounds, ratios are to the eager NCHW variant of the same run.

    PYTHONPATH=src python benchmarks/train_speed.py                      # 1 thread
    PYTHONPATH=src python benchmarks/train_speed.py --sizes 32 --rounds 7
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vqvae import VQVAE, DataConfig, load_splits
from vqvae.config import TrainConfig, seed_model
from vqvae.data.sources import BatchStream
from vqvae.training.stage1 import to_device

from common import environment, interleaved_seconds, stage1_trainer, timing_options

VARIANTS = {  # name -> (channels_last, compile)
    "eager, NCHW": (False, False),
    "eager, channels-last": (True, False),
    "compiled, NCHW": (False, True),
    "compiled, channels-last": (True, True),
}
DEVICE = torch.device("cpu")


def next_batch(images: torch.Tensor, stream: BatchStream, step: int, device: torch.device,
               channels_last: bool = False) -> torch.Tensor:
    """The in-memory path of the training loop: the step's rows of the uint8 cache, to float."""
    return to_device(images[stream.indices(step)], device, channels_last)


def jpeg_folder(root: Path, n: int, side: int = 160) -> Path:
    """``n`` RGB JPEGs of ``side`` px: Fashion-MNIST upsampled and tinted (not real photos; the
    pipeline's cost does not depend on the content)."""
    from PIL import Image

    fm = load_splits(DataConfig(source="fashion-mnist", size=28)).train.images[:n, 0].numpy()
    rng = np.random.default_rng(0)
    for i, img in enumerate(fm):
        tint = rng.uniform(0.3, 1.0, size=3)
        rgb = (img[:, :, None] * tint).astype(np.uint8)
        Image.fromarray(rgb).resize((side, side), Image.BILINEAR).save(root / f"{i:05d}.jpg",
                                                                        quality=90)
    return root


class Subject:
    """One model (seed preset, fixed seed) in one variant, and the loop's train step."""

    def __init__(self, size: int, channels: int, batch: int, channels_last: bool, compile: bool):
        torch.manual_seed(0)
        self.model = VQVAE(seed_model(size, channels)).train()
        tc = TrainConfig(batch_size=batch, lr=1e-3, recon_loss="mse",
                         channels_last=channels_last, compile=compile)
        self.channels_last = channels_last
        self.train_step = stage1_trainer(self.model, tc, DEVICE)

    def step(self, x: torch.Tensor) -> None:
        for value in self.train_step(x).values():  # the loop reads every loss term back
            value.item()


def measure(size: int, source: str, batch: int, args: argparse.Namespace) -> list[str]:
    start = time.perf_counter()
    splits = load_splits(DataConfig(source=source, size=size))
    load_s = time.perf_counter() - start
    images = splits.train.images
    channels = images.shape[1]
    stream = BatchStream(len(images), batch, seed=0)
    names = [n for n in VARIANTS if args.compile or not VARIANTS[n][1]]
    subjects = {n: Subject(size, channels, batch, *VARIANTS[n]) for n in names}
    preloaded = {n: [next_batch(images, stream, s, DEVICE, subjects[n].channels_last)
                     for s in range(args.steps)] for n in names}
    start = time.perf_counter()
    for s in range(64):
        next_batch(images, stream, s, DEVICE)
    batch_ms = (time.perf_counter() - start) / 64 * 1e3
    for n in names:  # warm-up (and compilation)
        t = time.perf_counter()
        subjects[n].step(preloaded[n][0])
        subjects[n].step(next_batch(images, stream, 0, DEVICE, subjects[n].channels_last))
        print(f"  {size}px {n}: warm-up {time.perf_counter() - t:.1f} s", file=sys.stderr,
              flush=True)
    def block(n: str, data: str) -> None:
        sub = subjects[n]
        for s in range(args.steps):
            sub.step(preloaded[n][s] if data == "preloaded"
                     else next_batch(images, stream, s, DEVICE, sub.channels_last))

    blocks = {(n, data): lambda n=n, data=data: block(n, data) for n in names
              for data in ("preloaded", "pipeline")}
    ips = {key: args.steps * batch / sec
           for key, sec in interleaved_seconds(blocks, args.rounds).items()}
    base = ips["eager, NCHW", "preloaded"]
    rows = []
    for n in names:
        pipe, pre = ips[n, "pipeline"], ips[n, "preloaded"]
        share = batch_ms / (1e3 * batch / pre)  # next_batch's time over a preloaded step's
        rows.append(f"| {size} x {size} x {channels} | {batch} | {n} | {pre:.1f} | {pipe:.1f} | "
                    f"{100 * (pre / pipe - 1):+.1f}% | {100 * share:.2f}% | {pre / base:.2f}x |")
    rows.append(f"| | | *data loading, once: {load_s:.1f} s for {len(images)} images; "
                f"next_batch alone: {batch_ms:.2f} ms per batch* | | | | | |")
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 128], choices=[32, 128])
    p.add_argument("--batch-32", type=int, default=64, help="batch at 32 px (the seed's 64)")
    p.add_argument("--batch-128", type=int, default=16,
                   help="batch at 128 px (default 16: a CPU step at 64 takes seconds)")
    p.add_argument("--images-128", type=int, default=2048, help="JPEGs in the 128 px folder")
    timing_options(p, steps=3, rounds=5)
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="skip the torch.compile variants")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{environment()}, seed preset, median of {args.rounds} rounds of {args.steps} "
          f"steps\n")
    print("| images | batch | variant | preloaded img/s | pipeline img/s | pipeline cost, "
          "measured | next_batch / step | vs eager NCHW |",
          "|---|---:|---|---:|---:|---:|---:|---:|", sep="\n", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            if size == 32:
                rows = measure(32, "fashion-mnist", args.batch_32, args)
            else:
                rows = measure(128, str(jpeg_folder(Path(tmp), args.images_128)),
                               args.batch_128, args)
            print("\n".join(rows), flush=True)


if __name__ == "__main__":
    main()
