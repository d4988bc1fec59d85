"""Graceful on unseen photos: stage-1 tokenizers trained on tiles of some photos, judged on whole
photos they never saw (not strips of training photos, as benchmarks/natural_images.py holds out).

Each arm trains through the CLI on the same tiles (random 64-192 px squares of the training
photos stored at 96 px, trained at ``--size`` with ``--crop random --flip``), then reconstructs
every ``--size`` tile of each unseen photo (resized to a ``--side``-pixel short side) with and
without quantization. Per arm it prints PSNR of both paths, the codes the unseen tiles use, and a
colour difference that sees false colours: the mean CIELAB delta-E (CIE76) between the original's
and the reconstruction's 8x8-pixel block means (blur barely moves a block's mean colour; a
patch drawn in another colour moves it by its whole difference), for the quantized path and
the un-quantized one (the encoder and decoder alone: what the codes cost). One PNG per arm shows
each unseen photo in a column: original, quantized, un-quantized.

    PYTHONPATH=src python benchmarks/unseen_photos.py --root runs/unseen --steps 1500 \\
        --seeds 0 1 2 3 --arm 'no jitter=--color-jitter 0' --arm 'jitter 0.25=--color-jitter 0.25'

(the default preset on RGB data jitters colours at 0.25: an arm without options is that arm)

Needs scikit-image's bundled photos (``pip install 'vqvae[bench]'``); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae.data.images import to_float, to_uint8
from vqvae.generation.grids import save_png
from vqvae.store import checkpoint as ckpt

from common import command_line, environment, parse_spec, slug, train
from natural_images import delta_e, training_tiles

TRAIN = ("astronaut", "chelsea", "coffee", "rocket", "china")
# a flower, a pale low-contrast tissue stain, a motorcycle in a workshop: colours and textures
# the training photos do not have
UNSEEN = ("flower", "ihc", "motorcycle")


def photo(name: str) -> np.ndarray:
    """uint8 (H, W, 3): scikit-learn's china/flower, else a photo bundled with scikit-image."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_images

        return dict(zip(("china", "flower"), load_sample_images().images))[name]
    from skimage import data

    loaders = {"motorcycle": lambda: data.stereo_motorcycle()[0],
               "ihc": data.immunohistochemistry}
    return np.array(loaders.get(name, getattr(data, name, None))())  # a writable copy


def write_training_tiles(folder: Path, per_photo: int) -> Path:
    """FOLDER/train/*.png: ``per_photo`` random squares of each training photo (kept if there)."""
    out = folder / "train"
    if out.exists():
        return out
    gen = torch.Generator().manual_seed(0)
    for name in TRAIN:
        image = torch.from_numpy(photo(name)).permute(2, 0, 1)
        for i, t in enumerate(training_tiles(image, image.shape[2], per_photo, gen)):
            save_png(Image.fromarray(t.permute(1, 2, 0).numpy()), out / f"{name}-{i:04d}.png")
    return out


def unseen_tiles(name: str, side: int, size: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """The photo resized to a ``side``-px short side, cropped to whole ``size`` tiles: uint8
    tiles (rows * cols, 3, size, size) in row-major order, and (rows, cols)."""
    image = torch.from_numpy(photo(name)).permute(2, 0, 1)  # (3, H, W)
    h, w = image.shape[1:]
    scale = side / min(h, w)
    image = torch.nn.functional.interpolate(image[None].float(), size=(round(h * scale),
                                            round(w * scale)), mode="area")[0]
    image = image.round().clamp(0, 255).to(torch.uint8)
    rows, cols = image.shape[1] // size, image.shape[2] // size
    tiles = image[:, :rows * size, :cols * size].unfold(1, size, size).unfold(2, size, size)
    return tiles.permute(1, 2, 0, 3, 4).reshape(rows * cols, 3, size, size), (rows, cols)


def stitch(tiles: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    rows, cols = grid
    c, s = tiles.shape[1], tiles.shape[2]
    return tiles.reshape(rows, cols, c, s, s).permute(2, 0, 3, 1, 4).reshape(c, rows * s, cols * s)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = ((a.float() - b.float()) / 255).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


@torch.inference_mode()
def judge(run: Path, side: int, size: int, png: Path) -> dict[str, float]:
    """The arm's figures over every tile of the unseen photos, and its picture."""
    model = ckpt.load_autoencoder(run).eval()
    originals, quantized, plain, used, columns = [], [], [], set(), []
    for name in UNSEEN:
        tiles, grid = unseen_tiles(name, side, size)
        x = to_float(tiles)
        q = to_uint8(model.reconstruct(x))
        n = to_uint8(model.reconstruct(x, quantize=False))
        used |= set(model.encode(x).indices.flatten().tolist())
        originals.append(tiles)
        quantized.append(q)
        plain.append(n)
        columns.append(torch.cat([stitch(t, grid) for t in (tiles, q, n)], dim=1))
    height = max(c.shape[1] for c in columns)
    picture = torch.cat([torch.nn.functional.pad(c, (0, 8, 0, height - c.shape[1]), value=255)
                         for c in columns], dim=2)
    save_png(Image.fromarray(picture.permute(1, 2, 0).numpy()), png)
    o, q, n = (torch.cat(t) for t in (originals, quantized, plain))
    return {"psnr": psnr(q, o), "psnr_noq": psnr(n, o), "de": delta_e(q, o),
            "de_noq": delta_e(n, o), "codes": len(used), "size": model.cfg.codebook_size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/unseen")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--side", type=int, default=256, help="short side of the unseen photos")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-photo", type=int, default=300)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arm", action="append", default=[], metavar="NAME=OPTIONS",
                        help="`vqvae train` options of one arm (default: the default preset)")
    args = parser.parse_args()
    root = Path(args.root)
    tiles = write_training_tiles(root / "tiles", args.per_photo)
    rows = []
    for spec in args.arm or ["default="]:
        name, options = parse_spec(spec)
        scores = []
        for seed in args.seeds:
            run = root / slug(name) / f"seed{seed}"
            train(["train", "--data", str(tiles), "--size", str(args.size), "--crop", "random",
                   "--flip", "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                   "--every", str(args.steps), "--seed", str(seed), *options], run, args.steps)
            scores.append(judge(run, args.side, args.size, run / "unseen.png"))
        mean = {k: statistics.mean(s[k] for s in scores) for k in scores[0]}
        rows.append(f"| {name} | {mean['psnr']:.2f} | {mean['psnr_noq']:.2f} | "
                    f"{mean['de']:.2f} | {mean['de_noq']:.2f} | {mean['de'] / mean['de_noq']:.2f} "
                    f"| {mean['codes']:.0f} / {mean['size']:.0f} | "
                    f"{shlex.join(options) or '(none)'} |")
    print(command_line(__file__))
    print(f"\ntrained on tiles of {', '.join(TRAIN)} ({args.steps} steps, {args.size} px, seeds "
          f"{args.seeds}); judged on every {args.size}-px tile of {', '.join(UNSEEN)} at a "
          f"{args.side}-px short side; {environment()}; pictures: {root}/ARM/seedS/unseen.png\n")
    print("| arm | PSNR quantized (dB) | un-quantized (dB) | delta-E quantized | un-quantized | "
          "ratio | codes used | options |\n|---|---:|---:|---:|---:|---:|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
