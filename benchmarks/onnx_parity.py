"""ONNX export parity on trained models: each preset (and the default's other quantizers) trained
briefly through the CLI, exported with ``vqvae export --format onnx``, its graphs run under
onnxruntime (CPU) against PyTorch (CPU) on the run's first 64 held-out images.

Prints one markdown row per model: code ids identical, decoded images' max abs difference (from
the same ids) and the files' sizes. Runs are kept in --root and reused.

    PYTHONPATH=src python benchmarks/onnx_parity.py --data digits --size 16 --steps 100
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vqvae import export_run

from common import command_line, environment, slug, train

# name -> options of `vqvae train` beyond the data and the budget
MODELS = {
    "seed (vq)": ["--preset", "seed"],
    "default (vq, cosine, lookup 8)": ["--preset", "default"],
    "default, ema": ["--preset", "default", "--quantizer", "ema"],
    "default, fsq": ["--preset", "default", "--quantizer", "fsq"],
    "vqgan (attention)": ["--preset", "vqgan"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--root", type=Path, default=Path("runs/onnx_parity"))
    args = parser.parse_args()
    print(command_line(__file__))
    print(environment())
    print("\n| model | code ids identical | others: ties | decoded max abs diff | "
          "encoder, decoder MB |")
    print("|---|---|---|---|---|")
    for name, options in MODELS.items():
        run = args.root / slug(name)
        train(["train", *options, "--data", args.data, "--size", str(args.size), "--steps",
               str(args.steps), "--every", str(args.steps), "--eval-count", "256",
               "--batch-size", "32", "--device", "cpu"], run, args.steps)
        out = export_run(run, "onnx", run / "onnx")
        parity = json.loads((out / "preprocessing.json").read_text())["parity"]
        sizes = ", ".join(f"{(out / f).stat().st_size / 2**20:.1f}"
                          for f in ("encoder.onnx", "decoder.onnx"))
        print(f"| {name} | {parity['same_codes']}/{parity['codes']} | "
              f"{parity['codes'] - parity['same_codes']}: {parity['ties']} | "
              f"{parity['max_pixel_diff']:.1e} | {sizes} |", flush=True)


if __name__ == "__main__":
    main()
