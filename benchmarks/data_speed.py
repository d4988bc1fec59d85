"""Streaming data at scale: memory, start-up time, data wait and decode speed of
``vqvae train --cache stream`` on a folder of JPEGs and on the tar shards ``vqvae pack`` makes.

The script writes its own data (once; reused from ``--root`` on later runs): ``--images`` JPEGs
of 128-256 px (smooth random colour fields, 10 class folders) and a hard-linked subset of
``--small`` of them. Then, in one run:

1. decode speed in one process: a plain PIL open + convert + resize loop against the streaming
   decoder (centre and random crops), and a DataLoader with ``--workers`` workers;
2. ``vqvae train --preset seed --size 128 --cache stream`` on the small folder, the large folder
   and the large folder's shards: peak memory of the whole process tree (PSS: shared pages
   counted once), seconds from the command to step 1 logged (a separate 1-step run: Python and
   torch imports, indexing the files, the first batch, step 1 and its save), the share of step
   time spent waiting for data
   (``data_wait`` in train.jsonl, first window left out), images/s.

    PYTHONPATH=src python benchmarks/data_speed.py                       # ~100k images
    PYTHONPATH=src python benchmarks/data_speed.py --images 20000 --small 2000 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path

import numpy as np
import torch

from vqvae import DataConfig, load_splits
from vqvae.data.loader import train_batches

from common import environment

CLASSES = 10


def write_jpeg(root: Path, i: int) -> None:
    """Image i: a 6x6 random colour field upsampled to 128-256 px a side, plus a little noise."""
    from PIL import Image

    rng = np.random.default_rng(i)
    w, h = (int(v) for v in rng.integers(128, 257, 2))
    field = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(
        (w, h), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.int16) + rng.integers(-4, 5, (h, w, 3))
    path = root / f"c{i % CLASSES}" / f"{i:07d}.jpg"
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=85)


def make_folders(root: Path, n: int, small: int) -> tuple[Path, Path]:
    big, little = root / f"jpeg-{n}", root / f"jpeg-{small}"
    if not (big / ".complete").exists():
        for c in range(CLASSES):
            (big / f"c{c}").mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(lambda i: write_jpeg(big, i), range(n), chunksize=256))
        (big / ".complete").write_text(str(n))
        print(f"wrote {n} JPEGs in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    if not (little / ".complete").exists():
        for c in range(CLASSES):
            (little / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(small):
            target = little / f"c{i % CLASSES}" / f"{i:07d}.jpg"
            if not target.exists():
                os.link(big / f"c{i % CLASSES}" / f"{i:07d}.jpg", target)
        (little / ".complete").write_text(str(small))
    return big, little


def decode_speed(folder: Path, size: int, count: int, workers: int) -> list[tuple[str, float]]:
    """images/s of the ways to turn ``count`` files into size x size pixels."""
    from PIL import Image

    cfg = DataConfig(source=str(folder), size=size, cache="stream", workers=workers)
    train = load_splits(cfg).train
    paths = [train.files.name(i) for i in range(count)]
    rows = []
    start = time.perf_counter()
    for p in paths:
        with Image.open(p) as img:
            np.asarray(img.convert("RGB").resize((size, size), Image.BILINEAR))
    rows.append(("plain PIL open + convert + resize, 1 process",
                 count / (time.perf_counter() - start)))
    for crop in ("center", "random"):
        gen = torch.Generator().manual_seed(0)
        start = time.perf_counter()
        for i in range(count):
            train.decode(i, gen, crop)
        rows.append((f"vqvae decode ({crop} crop), 1 process",
                     count / (time.perf_counter() - start)))
    batches = train_batches(train, cfg, 64, seed=0, start=0)
    next(batches)  # workers started
    start = time.perf_counter()
    n = sum(b.images.shape[0] for b in islice(batches, max(1, count // 64)))
    rate = n / (time.perf_counter() - start)
    rows.append((f"training loader, {workers} workers (per worker: {rate / max(1, workers):.0f})",
                 rate))
    return rows


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in f.read().split():
                    out += _tree(int(child))
    except OSError:
        pass
    return out


def _pss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration):
            pass
    return total / 1024


def train_run(source: str, out: Path, steps: int, every: int, batch: int, workers: int,
              holdout: float) -> dict:
    """``vqvae train`` in a subprocess, its process tree's memory sampled every 0.1 s."""
    cmd = [sys.executable, "-m", "vqvae", "train", "--preset", "seed", "--data", source,
           "--size", "128", "--cache", "stream", "--workers", str(workers), "--steps", str(steps),
           "--every", str(every), "--eval-count", "64", "--holdout", str(holdout), "--batch-size",
           str(batch), "--out", str(out)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak, workers, first_log, log = 0.0, 0.0, None, out / "train.jsonl"
    while proc.poll() is None:
        tree = _tree(proc.pid)
        peak = max(peak, _pss_mib(tree))
        workers = max(workers, _pss_mib(tree[1:]))
        if first_log is None and log.exists() and log.stat().st_size:
            first_log = time.perf_counter() - start
        time.sleep(0.1)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
    records = [json.loads(line) for line in log.read_text().splitlines()]
    later = records[1:] or records
    return {"peak_mib": peak, "workers_mib": workers, "first_log_s": first_log or float("nan"),
            "data_wait": statistics.mean(r["data_wait"] for r in later),
            "images_per_s": statistics.mean(r["steps_per_s"] for r in later) * batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="/tmp/vqvae-data-speed", help="where the data is kept")
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--decode-count", type=int, default=1000)
    parser.add_argument("--test", type=int, default=200, help="held-out images of every run")
    parser.add_argument("--skip-decode", action="store_true", help="only the training runs")
    args = parser.parse_args()
    root = Path(args.root)
    big, little = make_folders(root, args.images, args.small)
    shards = root / f"shards-{args.images}"
    if not (shards / "shards.json").exists() or json.loads(
            (shards / "shards.json").read_text()).get("images") != args.images:
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "vqvae", "pack", str(big), "--out", str(shards)],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"packed in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    print(f"# data_speed: {environment()}, {args.workers} workers\n")
    if not args.skip_decode:
        print(f"## Decoding {args.decode_count} JPEGs of 128-256 px to 128 px\n")
        print("| path | images/s | vs plain PIL |\n|---|---:|---:|")
        rows = decode_speed(big, 128, args.decode_count, args.workers)
        for name, rate in rows:
            print(f"| {name} | {rate:.0f} | {rate / rows[0][1]:.2f}x |")

    print(f"\n## `vqvae train --preset seed --size 128 --cache stream`, batch {args.batch_size}, "
          f"{args.steps} steps\n")
    print("| data | peak memory (PSS, MiB) | of which workers | first step logged (s) | "
          "data wait | images/s |\n|---|---:|---:|---:|---:|---:|")
    results = {}
    runs = {f"folder, {args.small} images": str(little), f"folder, {args.images} images": str(big),
            f"shards of {args.images} images": str(shards)}
    for i, (name, source) in enumerate(runs.items()):
        out = root / f"run-{i}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        subprocess.run(["rm", "-rf", str(out) + "-startup"], check=True)
        holdout = args.test / (args.small if "folder, " + str(args.small) in name
                               else args.images)  # the same held-out set size everywhere
        startup = train_run(source, Path(str(out) + "-startup"), 1, 1, args.batch_size,
                            args.workers, holdout)
        r = results[name] = train_run(source, out, args.steps, args.every, args.batch_size,
                                      args.workers, holdout)
        r["first_log_s"] = startup["first_log_s"]
        print(f"| {name} | {r['peak_mib']:.0f} | {r['workers_mib']:.0f} | "
              f"{r['first_log_s']:.1f} | "
              f"{100 * r['data_wait']:.1f}% | {r['images_per_s']:.1f} |", flush=True)
    small, large, packed = results.values()
    print(f"\nmemory, {args.images} vs {args.small} images: "
          f"{large['peak_mib'] / small['peak_mib']:.2f}x; images/s, shards vs folder: "
          f"{packed['images_per_s'] / large['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
