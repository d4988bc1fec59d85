"""Real bits: our codec (a VQ-VAE's codes entropy-coded with its prior) against PNG, JPEG, WebP
and AVIF from Pillow, on Fashion-MNIST at 32 px and on 64-px natural-image tiles.

For each set the script trains what it needs through the CLI (a stage-1 model per ``--stage1``
spec, a prior on its codes), then on ``--n`` held-out images measures bytes per image and bits
per pixel of

* our files: one file per image (the one-image header plus that image's stream, coded alone) and
  one stream per set (all images in one file), their PSNR and SSIM (the stage-1 model's decoding);
* each classic codec at every ``--qualities`` step: one file per image, and one stream per set (all
  images tiled into one picture, so container headers do not decide);

and reports each classic codec's bytes at our PSNR and at our SSIM (interpolated in log bytes
between the qualities around it) over ours, the file's size against the prior's cross-entropy of
the same grids (the coder's ideal) and the prior run's held-out bits per code, and compress /
decompress images per second on this CPU. A rate-distortion PNG plots PSNR against bits per pixel.

    apt-get install -y dataset-fashion-mnist   # /usr/share/datasets/fashion-mnist
    PYTHONPATH=src python benchmarks/codec.py --root runs/codec --steps 3000 \\
        --prior-steps 3000 --stage1 'k512=--codebook-size 512' \\
        --stage1 'k64=--codebook-size 64' --png docs/img/codec.png

The smallest run (minutes on a CPU; figures of barely trained models):
``--steps 40 --prior-steps 40 --n 100 --sets fashion``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import torch
from PIL import Image, features

from vqvae import DataConfig, compress, decompress, load_splits, psnr, ssim, to_float
from vqvae.codec.coder import encode_grids
from vqvae.codec.compress import coding_steps, encode_images
from vqvae.codec.container import unpack
from vqvae.generation.pipeline import Pipeline

from common import command_line, environment, parse_spec, slug, train
from natural_images import load_folder, write_tiles

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LOSSLESS_DB = 80.0  # a PSNR above this is a lossless file (PSNR of identical images is clamped)
SETS = {"fashion": ("fashion-mnist", 32), "natural": ("tiles", 64)}  # source, size
QUALITIES = {"JPEG": (5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95),
             "WebP": (0, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100),
             "AVIF": (0, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100)}


# --- measuring ----------------------------------------------------------------------------------


def quality(decoded: torch.Tensor, original: torch.Tensor) -> tuple[float, float]:
    """Mean per-image PSNR (dB) and SSIM of uint8 batches (N, C, H, W)."""
    x, y = to_float(decoded), to_float(original)
    mse = (x - y).pow(2).flatten(1).mean(1)
    return float(psnr(mse).mean()), float(ssim(x, y).mean())


def pil(image: torch.Tensor) -> Image.Image:
    array = image.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if image.shape[0] == 1 else array)


def classic_bytes(image: torch.Tensor, codec: str, q: int | None) -> tuple[int, torch.Tensor]:
    """One uint8 (C, H, W) image through a Pillow codec -> (bytes, the decoded image)."""
    buffer = io.BytesIO()
    options = {"optimize": True} if codec == "PNG" else {"quality": q}
    if codec == "WebP":
        options["method"] = 6
    pil(image).save(buffer, format=codec.upper(), **options)
    with Image.open(io.BytesIO(buffer.getvalue())) as back:
        back = back.convert("L" if image.shape[0] == 1 else "RGB")
        decoded = torch.from_numpy(np.asarray(back).copy())
    decoded = decoded[None] if decoded.dim() == 2 else decoded.permute(2, 0, 1)
    return buffer.tell(), decoded


def mosaic(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(N, C, S, S) -> one (C, rows*S, cols*S) picture, near square, and its columns (the last
    row padded with its last image)."""
    n, c, s, _ = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    padded = torch.cat([images, images[-1:].expand(rows * cols - n, -1, -1, -1)])
    grid = padded.view(rows, cols, c, s, s).permute(2, 0, 3, 1, 4).reshape(c, rows * s, cols * s)
    return grid, cols


def unmosaic(grid: torch.Tensor, n: int, s: int, cols: int) -> torch.Tensor:
    c, h, w = grid.shape
    rows = h // s
    return grid.view(c, rows, s, cols, s).permute(1, 3, 0, 2, 4).reshape(-1, c, s, s)[:n]


def classic_points(images: torch.Tensor, codec: str) -> list[dict]:
    """Every quality of ``codec``: bytes per image as one file each and as one mosaic, with
    PSNR and SSIM of each."""
    points = []
    for q in (None,) if codec == "PNG" else QUALITIES[codec]:
        sizes, decoded = zip(*(classic_bytes(x, codec, q) for x in images))
        grid, cols = mosaic(images)
        set_bytes, set_decoded = classic_bytes(grid, codec, q)
        set_decoded = unmosaic(set_decoded, len(images), images.shape[-1], cols)
        points.append({"quality": q, "image_bytes": sum(sizes) / len(images),
                       "set_bytes": set_bytes / len(images),
                       **dict(zip(("psnr", "ssim"), quality(torch.stack(decoded), images))),
                       **dict(zip(("set_psnr", "set_ssim"), quality(set_decoded, images)))})
    return points


def ours(run: Path, images: torch.Tensor, batch_size: int) -> dict:
    """Our codec on ``images`` with the prior of ``run``: sizes per image file and per set
    stream, quality, the prior's cross-entropy of the same grids, speed (busy-machine figures)."""
    pipe = Pipeline.from_run(run, "cpu")
    n = len(images)
    start = time.perf_counter()
    data = compress(pipe, images, batch_size=batch_size)
    compress_s = time.perf_counter() - start
    start = time.perf_counter()
    decoded = decompress(pipe, data).images
    decompress_s = time.perf_counter() - start
    one = unpack(compress(pipe, images[:1], batch_size=1))
    one_header = len(compress(pipe, images[:1], batch_size=1)) - one.payload_bytes()
    singles = unpack(compress(pipe, images, batch_size=1))  # each image's stream, coded alone
    grids = encode_images(pipe, images)
    ideal = float(encode_grids(pipe.prior, grids, None, batch_size,
                               coding_steps(pipe)).bits.sum()) / 8
    evaluated = json.loads((run / "eval.json").read_text()) if (run / "eval.json").exists() else {}
    box = unpack(data)
    psnr_, ssim_ = quality(decoded, images)
    return {"image_bytes": one_header + singles.payload_bytes() / n, "set_bytes": len(data) / n,
            "set_header_bytes": (len(data) - box.payload_bytes()) / n,
            "one_image_header": one_header, "cross_entropy_bytes": ideal / n,
            "heldout_bits_per_code": evaluated.get("bits_per_code"),
            "codes_per_image": grids[0].numel(), "psnr": psnr_, "ssim": ssim_,
            "compress_img_s": n / compress_s, "decompress_img_s": n / decompress_s}


def at_ours(points: list[dict], target: float, key: str, size: str) -> float | None:
    """A classic codec's bytes at our ``key`` value (PSNR or SSIM): log-linear between the two
    qualities around it; None when no quality reaches it or none is that low."""
    pairs = sorted((p[key if size == "image_bytes" else f"set_{key}"], p[size]) for p in points)
    for (k0, b0), (k1, b1) in zip(pairs, pairs[1:]):
        if k0 <= target <= k1:
            t = 0.0 if k1 == k0 else (target - k0) / (k1 - k0)
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return None


def ratio_cell(points: list[dict], ours_: dict, key: str, size: str) -> str:
    """Their bytes over ours at our quality; outside their range, what their nearest quality
    gives (``at its lowest, 23.4 dB: 1.14x``: better quality and still this many bytes)."""
    theirs = at_ours(points, ours_[key], key, size)
    if theirs is not None:
        return f"{theirs / ours_[size]:.2f}x"
    measured = key if size == "image_bytes" else f"set_{key}"
    low, high = min(points, key=lambda p: p[measured]), max(points, key=lambda p: p[measured])
    edge, where = (low, "lowest") if ours_[key] < low[measured] else (high, "highest")
    unit = " dB" if key == "psnr" else ""
    return f"at its {where}, {edge[measured]:.3g}{unit}: {edge[size] / ours_[size]:.2f}x"


# --- training -----------------------------------------------------------------------------------


def held_out(name: str, args: argparse.Namespace, root: Path) -> tuple[str, torch.Tensor]:
    """The set's training source and its first ``--n`` held-out images."""
    source, size = SETS[name]
    if name == "natural":
        train_dir = write_tiles(root / "tiles", args.per_photo, 0.3, size)
        return str(train_dir), load_folder(train_dir.parent / "heldout")[:args.n]
    test = load_splits(DataConfig(source=source, size=size, channels=1)).test
    return source, test.images[:args.n]


def trained(name: str, spec: tuple[str, tuple[str, ...]], source: str, args: argparse.Namespace,
            root: Path) -> Path:
    """Stage 1 by ``spec`` on ``source`` and a prior on its codes; the prior run."""
    size = SETS[name][1]
    run = root / name / slug(spec[0])
    channels = ["--channels", "1"] if name == "fashion" else []
    train(["train", "--data", source, "--size", str(size), *channels, "--steps",
           str(args.steps), "--device", args.device, *spec[1]], run, args.steps)
    train(["train-prior", "--stage1", str(run), "--steps", str(args.prior_steps), "--device",
           args.device, *args.prior_options.split()], run / "prior", args.prior_steps)
    return run / "prior"


# --- reporting ----------------------------------------------------------------------------------


def report(name: str, pixels: int, rows: dict, classics: dict) -> None:
    print(f"\n### {name}: bytes per image (bits per pixel)\n")
    print("| codec | PSNR | SSIM | file per image | one stream per set |")
    print("|---|---|---|---|---|")
    for model, r in rows.items():
        print(f"| ours: {model} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['image_bytes']:.1f} "
              f"({8 * r['image_bytes'] / pixels:.3f}) | {r['set_bytes']:.1f} "
              f"({8 * r['set_bytes'] / pixels:.3f}) |")
    for codec, points in classics.items():
        for p in points:
            q = "" if p["quality"] is None else f" q{p['quality']}"
            print(f"| {codec}{q} | {p['psnr']:.2f} | {p['ssim']:.3f} | {p['image_bytes']:.1f} "
                  f"({8 * p['image_bytes'] / pixels:.3f}) | {p['set_bytes']:.1f} "
                  f"({8 * p['set_bytes'] / pixels:.3f}) |")
    print(f"\n{name}: a classic codec's bytes at our quality over ours (> 1: ours is smaller; "
          f"where none of its qualities comes that low or high, its nearest one)\n")
    print("| model | codec | at our PSNR, per image | per set | at our SSIM, per image | "
          "per set |")
    print("|---|---|---|---|---|---|")
    for model, r in rows.items():
        for codec, points in classics.items():
            if codec == "PNG":
                continue
            cells = [ratio_cell(points, r, key, size) for key in ("psnr", "ssim")
                     for size in ("image_bytes", "set_bytes")]
            print(f"| {model} | {codec} | " + " | ".join(cells) + " |")
    print(f"\n{name}: our file against the prior's cross-entropy of the same grids\n")
    print("| model | codes/image | cross-entropy B/image | stream B/image | set header "
          "B/image | one-image header B | held-out bits/code (prior run) | compress img/s | "
          "decompress img/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model, r in rows.items():
        stream = r["set_bytes"] - r["set_header_bytes"]
        bpc = r["heldout_bits_per_code"]
        print(f"| {model} | {r['codes_per_image']} | {r['cross_entropy_bytes']:.2f} | "
              f"{stream:.2f} | {r['set_header_bytes']:.2f} | {r['one_image_header']} | "
              f"{'-' if bpc is None else f'{bpc:.3f}'} | {r['compress_img_s']:.0f} | "
              f"{r['decompress_img_s']:.0f} |")


def plot(results: dict, path: Path) -> Path:
    """PSNR against bits per pixel: a curve per classic codec (solid: a file per image; dashed:
    one stream per set), a point per model of ours, one panel per set."""
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, result) in zip(axes[0], results.items()):
        pixels = result["pixels"]
        for i, (codec, points) in enumerate(result["classic"].items()):
            color = f"C{i}"
            for size, style, how in (("image_bytes", "-", "per image"),
                                     ("set_bytes", "--", "per set")):
                key = "psnr" if size == "image_bytes" else "set_psnr"
                lossy = [p for p in points if p[key] < LOSSLESS_DB]  # PNG, AVIF q100: off-scale
                if not lossy:
                    ax.axvline(8 * points[0][size] / pixels, linestyle=style, color=color,
                               label=f"{codec}, lossless ({how})")
                    continue
                ax.plot([8 * p[size] / pixels for p in lossy], [p[key] for p in lossy], style,
                        marker=".", color=color, label=f"{codec} ({how})")
        for j, (model, r) in enumerate(result["ours"].items()):
            for size, marker in (("image_bytes", "o"), ("set_bytes", "*")):
                ax.scatter([8 * r[size] / pixels], [r["psnr"]], marker=marker, s=90,
                           color=f"C{5 + j}", zorder=5,
                           label=f"ours {model} ({'per image' if marker == 'o' else 'per set'})")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel("PSNR (dB)")
        ax.set_title(f"{name} ({result['n']} held-out images)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="runs/codec")
    parser.add_argument("--sets", nargs="+", choices=sorted(SETS), default=["fashion", "natural"])
    parser.add_argument("--stage1", action="append", default=None, metavar="NAME=OPTIONS",
                        help="a stage-1 model: `vqvae train` options (default: 'default=', the "
                        "default preset); repeat for several code-set sizes and grids")
    parser.add_argument("--prior-options", default="", help="extra `vqvae train-prior` options")
    parser.add_argument("--steps", type=int, default=3000, help="stage-1 training steps")
    parser.add_argument("--prior-steps", type=int, default=3000, help="prior training steps")
    parser.add_argument("--n", type=int, default=1000, help="held-out images measured")
    parser.add_argument("--per-photo", type=int, default=300, help="natural: training tiles "
                        "per photo")
    parser.add_argument("--batch-size", type=int, default=64, help="grids coded together")
    parser.add_argument("--device", default="cpu", help="where the models train")
    parser.add_argument("--png", default=None, help="the rate-distortion picture (default: "
                        "ROOT/codec.png)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    root = Path(args.root)
    specs = [parse_spec(s) for s in (args.stage1 or ["default="])]
    codecs = ["PNG", "JPEG", "WebP"] + (["AVIF"] if features.check("avif") else [])
    print(command_line(__file__))
    print(environment("cpu", 1) + " (the codec's); speed figures are one timing on a machine "
          "shared with other jobs")
    results = {}
    for name in args.sets:
        source, images = held_out(name, args, root)
        pixels = images.shape[-1] * images.shape[-2]
        rows = {model: ours(trained(name, (model, opts), source, args, root), images,
                            args.batch_size) for model, opts in specs}
        classics = {codec: classic_points(images, codec) for codec in codecs}
        results[name] = {"n": len(images), "pixels": pixels, "ours": rows, "classic": classics}
        report(name, pixels, rows, classics)
    (root / "codec.json").write_text(json.dumps(results, indent=1))
    print(f"\nrate-distortion: {plot(results, Path(args.png or root / 'codec.png'))}",
          file=sys.stderr)


if __name__ == "__main__":
    main()
