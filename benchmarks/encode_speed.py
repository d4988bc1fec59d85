"""Encoding speed: ``encode_dataset`` (checkpoint + data loading + batches + code ids) in
images/s against the bare ``model.encode`` forward over pre-loaded float tensors.

The stage-1 model is the seed preset at 32 x 32 with its initial weights (speed does not depend
on them), saved as an ordinary run folder; the data set is the first ``--images`` Fashion-MNIST
training images written to an .npz file, so ``encode_dataset`` loads it through the real source
path (90/10 held-out split, both splits encoded). After one warm-up run of each, runs of the two
alternate (order flipped every round) ``--rounds`` times; figures are medians.

    PYTHONPATH=src python benchmarks/encode_speed.py
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vqvae import VQVAE, DataConfig, load_splits, to_float
from vqvae.config import RunConfig, TrainConfig, seed_model, to_dict
from vqvae.generation.codes import encode_dataset
from vqvae.store import checkpoint as ckpt
from vqvae.store.runs import prepare_run

from common import environment


def make_run(root: Path, n: int) -> tuple[Path, Path]:
    """An .npz of ``n`` Fashion-MNIST images and a seed-preset run folder trained on it."""
    images = load_splits(DataConfig(source="fashion-mnist", size=28)).train.images[:n, 0]
    data = root / "fmnist.npz"
    np.savez(data, images=images.numpy())
    cfg = RunConfig(DataConfig(source=str(data), size=32, channels=1), seed_model(32, 1),
                    TrainConfig(), preset="seed")
    run = root / "run"
    prepare_run(run, ckpt.VQVAE_KIND, cfg, resume=False, start=0)
    torch.manual_seed(0)
    ckpt.write_checkpoint(run, 0, VQVAE(cfg.model), ckpt.VQVAE_KIND, to_dict(cfg.model))
    return run, data


def bare_seconds(run: Path, data: Path, batch: int) -> tuple[float, int]:
    """The encoder + quantizer forward alone over float batches made before timing."""
    model = ckpt.load_autoencoder(run)
    splits = load_splits(DataConfig(source=str(data), size=32, channels=1))
    batches = [to_float(split.images[s:s + batch]) for split in (splits.train, splits.test)
               for s in range(0, len(split), batch)]  # the same batches as encode_dataset
    start = time.perf_counter()
    with torch.inference_mode():
        for x in batches:
            model.encode(x).indices
    return time.perf_counter() - start, sum(len(x) for x in batches)


def pipeline_seconds(run: Path, batch: int) -> tuple[float, int]:
    start = time.perf_counter()
    codes = encode_dataset(run, batch_size=batch, progress=False)
    return time.perf_counter() - start, sum(len(s) for s in codes.splits.values())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=256, help="encode_dataset's default")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"encode_dataset": [], "bare encode": []}
    with tempfile.TemporaryDirectory() as tmp:
        run, data = make_run(Path(tmp), args.images)
        runs = {"encode_dataset": lambda: pipeline_seconds(run, args.batch_size),
                "bare encode": lambda: bare_seconds(run, data, args.batch_size)}
        for fn in runs.values():  # warm-up
            fn()
        for r in range(args.rounds):
            for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t, n = runs[name]()
                times[name].append(n / t)
    ips = {k: statistics.median(v) for k, v in times.items()}
    print(f"{environment()}, seed preset 32 x 32 x 1, {args.images} images, batch "
          f"{args.batch_size}, median of {args.rounds} alternating runs\n")
    print("| path | images/s | vs bare |\n|---|---:|---:|")
    for name, v in ips.items():
        print(f"| {name} | {v:,.0f} | {100 * v / ips['bare encode']:.1f}% |")


if __name__ == "__main__":
    main()
