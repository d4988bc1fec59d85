"""Sharper reconstructions on natural images: MSE alone against the adversarial loss on a folder of
tiles cut from the photos that ship inside scikit-image's and scikit-learn's packages.

Each photo is split in two: training tiles (random squares, stored at 96 px and cropped and
flipped again by ``--crop random --flip``) come from its left part, held-out tiles (a grid of
96-px squares resized to the training size) from its right ``--holdout`` strip, so no held-out
pixel was ever trained on. The arms train the same preset, seed and steps through the CLI;
the table scores them on the held-out tiles (PSNR, SSIM, and the gradient ratio: the mean
absolute difference between neighbouring pixels of the reconstructions over the originals';
blur lowers it, noise and artefacts raise it; and the grid peak, ``grid_peak``: 1 unless the
reconstructions carry a pattern periodic in the decoder's upsampling stride, the checkerboard of
transposed convs), and one PNG shows originals and each arm's reconstructions in rows. With
``--finetune-from N`` the GAN arm is a decoder-only fine-tune of the MSE run's step N, and
``--control OPTIONS`` adds the same fine-tune without the GAN (its lower learning rate alone can
change the figures). Nothing is downloaded: the photos are files
of the two wheels (``skimage.data`` images fetched through pooch are not used).

    PYTHONPATH=src python benchmarks/natural_images.py --root runs/nat3k --steps 3000 \
        --finetune-from 2000 --batch-size 16 --control '--lr 1e-4' \
        --gan 'gan=--gan-weight 0.3 --disc-channels 32 --lr 1e-4' \
        --gan 'w1=--gan-weight 1 --disc-channels 32 --lr 1e-4' --png runs/nat3k/sharp-all.png

(and again with ``--model-options '--upsample nearest'``: docs/tokenizer.md)
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vqvae.data.augment import resize
from vqvae.evaluation.metrics import evaluate_autoencoder
from vqvae.generation.grids import save_png, tile
from vqvae.store import checkpoint as ckpt

from common import MSE_RECIPE, command_line, parse_spec, reconstructions, seconds, slug, train

SKIMAGE = ("astronaut", "coffee", "chelsea", "rocket")  # PNG/JPEG files inside the wheel
STORED = 96  # side of the stored tiles, training and held-out alike
GAN = "--gan-weight 0.5 --disc-channels 32 --lecam 0.001 --diffaug"  # the default GAN arm


def photos() -> dict[str, np.ndarray]:
    """name -> uint8 (H, W, 3): scikit-learn's two sample photos, and scikit-image's bundled
    ones when it is installed (``pip install 'vqvae[bench]'``)."""
    from sklearn.datasets import load_sample_images

    found = dict(zip(("china", "flower"), load_sample_images().images))
    try:
        from skimage import data
    except ImportError:
        print("scikit-image is not installed: the two scikit-learn photos only", file=sys.stderr)
        return found
    found |= {name: getattr(data, name)() for name in SKIMAGE}
    found["motorcycle"] = data.stereo_motorcycle()[0]  # motorcycle_left.png
    return found


def _square(photo: torch.Tensor, top: int, left: int, side: int, size: int) -> torch.Tensor:
    return resize(photo[:, top:top + side, left:left + side], size)


def training_tiles(photo: torch.Tensor, right: int, count: int,
                   gen: torch.Generator) -> list[torch.Tensor]:
    """``count`` random squares of 64..192 px (at most the region's height) left of column
    ``right`` of a uint8 (3, H, W) photo, each stored at :data:`STORED` px."""
    h = photo.shape[1]
    biggest = min(192, h, right)
    tiles = []
    for _ in range(count):
        side = int(torch.randint(64, biggest + 1, (), generator=gen))
        top = int(torch.randint(0, h - side + 1, (), generator=gen))
        left = int(torch.randint(0, right - side + 1, (), generator=gen))
        tiles.append(_square(photo, top, left, side, STORED))
    return tiles


def held_out_tiles(photo: torch.Tensor, left: int, size: int) -> list[torch.Tensor]:
    """A grid of :data:`STORED`-px squares (stride 64) right of column ``left``, at ``size``."""
    _, h, w = photo.shape
    return [_square(photo, top, x, STORED, size) for top in range(0, h - STORED + 1, 64)
            for x in range(left, w - STORED + 1, 64)]


def write_tiles(folder: Path, per_photo: int, holdout: float, size: int) -> Path:
    """FOLDER/train/*.png (the training folder) and FOLDER/heldout/*.png; kept if present."""
    train_dir, held_dir = folder / "train", folder / "heldout"
    if held_dir.exists():
        return train_dir
    gen = torch.Generator().manual_seed(0)
    for name, array in photos().items():
        photo = torch.from_numpy(np.array(array)).permute(2, 0, 1)  # (3, H, W)
        cut = round(photo.shape[2] * (1 - holdout))
        for kind, tiles in (("train", training_tiles(photo, cut, per_photo, gen)),
                            ("heldout", held_out_tiles(photo, cut, size))):
            for i, t in enumerate(tiles):
                save_png(Image.fromarray(t.permute(1, 2, 0).numpy()),
                         folder / kind / f"{name}-{i:04d}.png")
    return train_dir


def load_folder(folder: Path) -> torch.Tensor:
    """The PNGs of ``folder`` in name order -> uint8 (N, 3, S, S)."""
    return torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"))).permute(2, 0, 1)
                        for p in sorted(folder.glob("*.png"))])


def gradient_ratio(reconstructed: torch.Tensor, original: torch.Tensor) -> float:
    """Mean |neighbour difference| of the reconstructions over the originals' (uint8 batches)."""
    def detail(x: torch.Tensor) -> float:
        x = x.float()
        return float((x[..., 1:, :] - x[..., :-1, :]).abs().mean()
                     + (x[..., :, 1:] - x[..., :, :-1]).abs().mean())
    return detail(reconstructed) / detail(original)


def delta_e(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean CIE76 delta-E between the 8x8-pixel block means of two uint8 (N, 3, S, S)."""
    from skimage.color import rgb2lab

    def lab(x: torch.Tensor) -> np.ndarray:
        means = torch.nn.functional.avg_pool2d(x.float() / 255, 8)  # (N, 3, S/8, S/8)
        return rgb2lab(means.permute(0, 2, 3, 1).numpy())

    return float(np.linalg.norm(lab(a) - lab(b), axis=-1).mean())


def grid_peak(reconstructed: torch.Tensor, original: torch.Tensor, period: int) -> float:
    """How much more the reconstructions' spectrum peaks at the harmonics of ``period`` pixels
    (the decoder's upsampling stride, 2^downsamples) than the originals' does: the power at those
    frequencies over the mean power of their four neighbouring frequencies, reconstructions'
    over originals'. 1: no excess periodic pattern; a transposed conv's checkerboard raises it.
    uint8 (N, C, S, S) batches, S a multiple of ``period``."""
    def peak(x: torch.Tensor) -> float:
        x = x.float() / 255
        power = torch.fft.fft2(x - x.mean((-2, -1), keepdim=True)).abs().square().mean((0, 1))
        at = torch.arange(0, power.shape[-1], power.shape[-1] // period)
        def pick(f: torch.Tensor) -> torch.Tensor:
            grid = f[at][:, at].clone()
            grid[0, 0] = 0  # the mean, removed above
            return grid.sum()
        near = sum(pick(power.roll(shift, dim)) for shift in (1, -1) for dim in (0, 1)) / 4
        return float(pick(power) / near)
    return peak(reconstructed) / peak(original)


def arms(args: argparse.Namespace, folder: Path) -> dict[str, tuple[list[str], int]]:
    """name -> (`vqvae` options, the steps of that invocation): MSE, and the GAN from scratch
    (discriminator from ``--gan-start``) or, with ``--finetune-from N``, ``vqvae
    finetune-decoder`` of the MSE run's checkpoint at N up to the same total steps."""
    n = args.finetune_from
    every = math.gcd(args.steps, n) if n else max(1, args.steps // 4)
    mse = ["train", "--preset", args.preset, "--data", str(folder), "--size", str(args.size),
           "--crop", "random", "--flip", "--steps", str(args.steps), "--every", str(every),
           "--keep-every", str(every), "--batch-size", str(args.batch_size), "--seed",
           str(args.seed), *MSE_RECIPE, *shlex.split(args.model_options)]
    gans = gan_arms(args.gan)
    if not n:
        return {"mse": (mse, args.steps), **{
            name: ([*mse, *gan, "--gan-start", str(args.gan_start)], args.steps)
            for name, gan in gans.items()}}
    start = Path(args.root) / "mse" / "checkpoints" / f"step-{n:07d}"
    tune = ["finetune-decoder", str(start), "--steps", str(args.steps - n), "--every", str(every)]
    control = {"mse-ft": ([*tune, *shlex.split(args.control)], args.steps - n)} if (
        args.control is not None) else {}
    return {"mse": (mse, args.steps), **control,
            **{name: ([*tune, *gan], args.steps - n) for name, gan in gans.items()}}


def gan_arms(specs: list[str] | None) -> dict[str, list[str]]:
    """``--gan`` values -> arm name -> options: 'NAME=OPTIONS', or bare OPTIONS (starting with
    '-') for the one arm called 'gan'; none given: :data:`GAN` as 'gan'."""
    found: dict[str, list[str]] = {}
    for spec in specs or [GAN]:
        name, options = ("gan", tuple(shlex.split(spec))) if spec.lstrip().startswith("-") \
            else parse_spec(spec)
        folder = slug(name)  # the arm's run folder under --root
        if folder in {"mse", "mse-ft", "tiles"} or folder in found:
            raise SystemExit(f"--gan: the arm name {name!r} is taken")
        found[folder] = list(options)
    return found


def arm_seconds(args: argparse.Namespace, name: str) -> float:
    """Training-loop seconds of an arm (a fine-tune's include its MSE start's)."""
    root = Path(args.root)
    if name != "mse" and args.finetune_from:
        return (seconds(root / "mse", args.finetune_from)
                + seconds(root / name, args.steps - args.finetune_from))
    return seconds(root / name, args.steps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/sharpness-natural")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--per-photo", type=int, default=300, help="training tiles per photo")
    parser.add_argument("--holdout", type=float, default=0.3, help="held-out right strip")
    parser.add_argument("--preset", default="default")
    parser.add_argument("--model-options", default="", help="extra `vqvae train` options of "
                        "the MSE run (every fine-tune inherits its model), e.g. "
                        "'--upsample nearest'")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--gan-start", type=int, default=600)
    parser.add_argument("--gan", action="append", default=None, help="a GAN arm: its extra "
                        "`vqvae train` (or finetune-decoder) options, bare for one arm called "
                        "'gan' or as NAME=OPTIONS; repeat for several (default: '%s')" % GAN)
    parser.add_argument("--finetune-from", type=int, default=0, help="N: the GAN arm is a "
                        "decoder-only fine-tune of the MSE run's step N (0: from scratch)")
    parser.add_argument("--control", default=None, help="with --finetune-from: also a "
                        "decoder-only fine-tune without the GAN, with these options (e.g. the "
                        "GAN arm's --lr), so that the GAN's effect is told from the fine-tune's")
    parser.add_argument("--png", default=None, help="where to write the side-by-side PNG")
    parser.add_argument("--show", type=int, default=8, help="held-out tiles in the PNG")
    parser.add_argument("--score", nargs="+", default=None, metavar="RUN", help="instead of "
                        "training the arms: score these stage-1 runs or checkpoints (trained on "
                        "--root's tiles) in the table and the PNG")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    root = Path(args.root)
    folder = write_tiles(root / "tiles", args.per_photo, args.holdout, args.size)
    held = load_folder(root / "tiles" / "heldout")
    if args.score:  # runs trained elsewhere (same tiles), scored alone: no seconds
        scored = {run: Path(run) for run in args.score}
    else:
        runs = arms(args, folder)
        for name, (options, steps) in runs.items():
            train(options, root / name, steps)
        scored = {name: root / name for name in runs}
    rows, pictures, names = [], [held], list(scored)
    for name, run in scored.items():
        model = ckpt.load_autoencoder(run)
        metrics = evaluate_autoencoder(model, held)
        rec = reconstructions(model, held, str(run))
        pictures.append(rec)
        rows.append(f"| {name} | {metrics['psnr']:.2f} | {metrics['ssim']:.4f} | "
                    f"{gradient_ratio(rec, held):.3f} | {delta_e(rec, held):.2f} | "
                    f"{grid_peak(rec, held, 2 ** model.cfg.downsamples):.2f} | "
                    + ("|" if args.score else f"{arm_seconds(args, name):.0f} |"))
    how = (f"decoder-only fine-tune from the MSE run's step {args.finetune_from}"
           if args.finetune_from else f"from step {args.gan_start}")
    print(command_line(__file__))
    tiles = f"{len(list(folder.glob('*.png')))} training tiles, {len(held)} held-out tiles"
    if args.score:
        print(f"\n{tiles} at {args.size}px; the runs given, scored (trained elsewhere)\n")
    else:
        print(f"\n{tiles} at {args.size}px; "
              f"{' '.join([args.preset, 'preset', args.model_options]).strip()}, "
              f"{args.steps} steps of {args.batch_size}, seed "
              f"{args.seed}; GAN arms {how}; seconds: training loop, "
              f"shared 2-core CPU, rough")
        print("".join(f"\n- {name}: {shlex.join(options)}" for name, (options, _) in runs.items()
                      if name != "mse") + "\n")
    print("| arm | PSNR (dB) | SSIM | gradient ratio | delta-E | grid peak | seconds |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    if args.png:
        pick = torch.linspace(0, len(held) - 1, args.show).round().long()  # spread over photos
        grid = torch.cat([p[pick] for p in pictures])  # rows: originals, then each arm
        path = save_png(tile(grid, args.show, min_tile=2 * args.size), args.png)  # 2x, nearest
        print(f"\nrows: originals | {' | '.join(names)}: {path}")


if __name__ == "__main__":
    main()
