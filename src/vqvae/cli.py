"""The ``vqvae`` command line: a table from command to one public library function, plus parsing
and printing. Nothing here builds a model, writes a file or picks a device.

Options of ``train``, ``train-prior`` and ``sample`` are generated from the config dataclasses'
fields and their help text, so the CLI and the configs cannot drift apart; unknown options are an
error (litgpt's ``__main__``, minGPT's ``merge_from_args``).
"""

from __future__ import annotations

import argparse
import errno
import signal
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .config import (PRESETS, PRIOR_PRESETS, RESUMABLE, DataConfig, PriorConfig, PriorTrainConfig,
                     SampleConfig, TrainConfig, VQVAEConfig, resumed, run_config)
from .codec.compress import compress_files, decompress_file
from .codec.surprise import write_surprise
from .data.shards import pack
from .distributed import torchrun_env
from .errors import USER_ERRORS, ConfigError, NonFiniteError, Terminated
from .evaluation.evaluate import evaluate_run
from .export import FORMATS, export_run
from .generation.code_folders import encode_codes
from .generation.grids import write_interpolation, write_reconstructions
from .generation.pipeline import inpaint_files, write_samples
from .generation.tuning import describe, sample_config
from .options import add_options, command, given, training_options
from .report.page import write_report
from .training.driver import RunResult
from .training.stage1 import finetune_decoder, load_run_config, train_autoencoder
from .training.stage2 import load_prior_run_config, prior_setup, prior_summary, train_prior

STAGE1, STAGE2 = ("data", "model", "train"), ("prior", "ptrain")  # option groups (dest prefixes)


def _resumed(args: argparse.Namespace, load: Callable[[str], Any], groups: Sequence[str],
             flags: Sequence[str] = ()) -> Any:
    """With ``--resume RUN_DIR``: the saved run config with only resumable options applied (any
    other option would silently not apply)."""
    if args.preset_given or any(getattr(args, f) for f in ("out", *flags)):
        raise ConfigError(f"with --resume only {', '.join(sorted(RESUMABLE))} may be given; "
                          f"the rest comes from {args.resume}/config.json")
    return resumed(load(args.resume), **given(args, *groups))


def _out(args: argparse.Namespace) -> Path:
    if not args.out:
        raise ConfigError("--out RUN_DIR is required (or --resume RUN_DIR)")
    return Path(args.out)


def _finish(result: RunResult, command: str) -> int:
    """Print the summary (rank 0); a run stopped by a signal exits 128 + its number (130, 143),
    so a scheduler can tell it from a finished one, and says how to continue it."""
    if torchrun_env()[0] == 0:
        print(result.summary())
        if result.signal:
            print(f"stopped at step {result.step} by {signal.Signals(result.signal).name}, "
                  f"resumable: vqvae {command} --resume {result.run_dir}")
    return 128 + result.signal if result.signal else 0


# --- commands: one library call each -----------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        return _finish(train_autoencoder(_resumed(args, load_run_config, STAGE1), args.resume,
                                         resume=True), "train")
    cfg = run_config(args.preset, DataConfig(**given(args, "data")), given(args, "model"),
                     given(args, "train"))
    return _finish(train_autoencoder(cfg, _out(args)), "train")


def cmd_finetune_decoder(args: argparse.Namespace) -> int:
    return _finish(finetune_decoder(args.run, _out(args), given(args, "train"), data=args.data),
                   "train")


def cmd_train_prior(args: argparse.Namespace) -> int:
    if args.resume:
        cfg = _resumed(args, load_prior_run_config, STAGE2, ("codes", "stage1", "data",
                                                             "conditional"))
        return _finish(train_prior(cfg, args.resume, resume=True), "train-prior")
    cfg, codes = prior_setup(codes=args.codes, stage1=args.stage1, data=args.data,
                             preset=args.preset, conditional=args.conditional,
                             model=given(args, "prior"), train=given(args, "ptrain"),
                             device=given(args, "ptrain").get("device", "auto"),
                             progress=torchrun_env()[0] == 0)
    if torchrun_env()[0] == 0:
        print(f"prior: {prior_summary(cfg)}", flush=True)
    return _finish(train_prior(cfg, _out(args), codes=codes), "train-prior")


def cmd_reconstruct(args: argparse.Namespace) -> None:
    for name, path in write_reconstructions(args.run, args.out, n=args.n, split=args.split,
                                            data=args.data, seed=args.seed,
                                            device=args.device).items():
        print(f"{name} ({'with' if name.endswith('2') else 'without'} quantization): {path}")


def cmd_interpolate(args: argparse.Namespace) -> None:
    print("sample_inter:", write_interpolation(args.run, args.out, n=args.n, split=args.split,
                                               data=args.data, seed=args.seed,
                                               device=args.device))


def cmd_eval(args: argparse.Namespace) -> None:
    print(evaluate_run(args.run, split=args.split, data=args.data, out=args.out,
                       device=args.device).summary())


def cmd_encode(args: argparse.Namespace) -> None:
    summary, path = encode_codes(args.run, args.out, format=args.format, source=args.data,
                                 batch_size=args.batch_size, device=args.device, flip=args.flip)
    print(f"encoded {summary}: {path}")


def cmd_sample(args: argparse.Namespace) -> None:
    cfg = sample_config(args.run, **given(args, "sample"))
    samples, png, codes = write_samples(args.run, cfg, args.out, args.device)
    print(f"{samples.images.shape[0]} samples ({describe(asdict(cfg))}): {png}\n"
          f"their codes: {codes}")


def cmd_inpaint(args: argparse.Namespace) -> None:
    result, strip = inpaint_files(args.run, args.image, args.mask,
                                  sample_config(args.run, **given(args, "sample")), args.out,
                                  args.ring, args.device)
    print(f"inpainted: {result}\noriginal | mask | result: {strip}")


def cmd_report(args: argparse.Namespace) -> None:
    print(f"report: {write_report(args.run, args.out, device=args.device)}")


def cmd_export(args: argparse.Namespace) -> None:
    out = export_run(args.run, args.format, args.out, device=args.device, report=print)
    print(f"exported {args.run} as {args.format}: {out}")


def cmd_compress(args: argparse.Namespace) -> None:
    print(compress_files(args.run, args.images, args.out, args.labels, args.batch_size,
                         args.steps, args.device, threads=args.threads).summary())


def cmd_decompress(args: argparse.Namespace) -> None:
    written = decompress_file(args.file, args.out, args.prior, args.device)
    print(f"{len(written)} images: {args.out}")


def cmd_surprise(args: argparse.Namespace) -> None:
    print(write_surprise(args.run, args.images, args.out, args.data, args.top, args.batch_size,
                         args.steps, args.device, threads=args.threads).summary())


def _labels(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected class ids such as 3 or 3,1,4, got {text!r}")


def cmd_pack(args: argparse.Namespace) -> None:
    print(pack(args.folder, args.out, args.shard_size, args.prefix).summary())


# --- parser ------------------------------------------------------------------------------------


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqvae", description=(
        "Train a VQ-VAE on a pile of images, then reconstruct, interpolate and evaluate it; "
        "encode images into codes, train a prior over them and sample new images."))
    parser.add_argument("--version", action="version", version=f"vqvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = command(sub, "train", cmd_train, "train stage 1 (the VQ-VAE)",
                description="Train a VQ-VAE; options override the chosen preset.")
    training_options(p, PRESETS, "seed: the blog post's model exactly; default: the improved "
                     "one; vqgan: a VQGAN-class autoencoder (GroupNorm blocks, attention, f8 "
                     "from 64 px)")
    add_options(p, DataConfig, "data", "data")
    add_options(p, VQVAEConfig, "model (defaults come from --preset)", "model", False)
    add_options(p, TrainConfig, "training", "train")

    p = command(sub, "finetune-decoder", cmd_finetune_decoder, "train a stage-1 model's "
                "decoder alone (e.g. with --gan-weight): its codes, and priors on them, stay valid",
                description="Fine-tune the decoder of a trained stage-1 model in a new run, its "
                "encoder and codebook frozen: codes and priors made with RUN_DIR decode with the "
                "result (vqvae sample PRIOR --decoder NEW_RUN). Options override RUN_DIR's "
                "training options; the learning rate defaults to a tenth of RUN_DIR's.")
    p.add_argument("run", metavar="RUN_DIR", help="a stage-1 run or checkpoint folder")
    p.add_argument("--out", metavar="NEW_RUN", required=True, help="new run folder to write")
    p.add_argument("--data", help="another data source (default: the run's own; needed for a "
                   "checkpoint outside a run folder, e.g. a diffusers VQModel folder)")
    p.set_defaults(resume=None)
    add_options(p, TrainConfig, "training (defaults: RUN_DIR's; --lr: a tenth of it)", "train",
                False)

    p = command(sub, "reconstruct", cmd_reconstruct,
                "reconstruction grids with and without quantization", "stage-1", 8)
    p.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/reconstruct)")
    p = command(sub, "interpolate", cmd_interpolate,
                "interpolate latents of image pairs, one row per pair", "stage-1", 8)
    p.add_argument("--out", help="folder for the PNG (default: RUN_DIR/interpolate)")
    p = command(sub, "eval", cmd_eval, "held-out metrics: MSE, PSNR, codebook usage, "
                "perplexity", "stage-1", 0)
    p.add_argument("--split", choices=("test", "train"), default="test", help="(default: test)")
    p.add_argument("--out", help="JSON file to write (default: RUN_DIR/eval_SPLIT.json)")

    p = command(sub, "encode", cmd_encode, "turn a data set into code grids with a stage-1 "
                "model", "stage-1", description="Encode the train and test splits into one "
                "codes file.")
    p.add_argument("--out", metavar="CODES", required=True, help="codes file to write "
                   "(.safetensors), or with --format npy a folder")
    p.add_argument("--format", choices=("safetensors", "npy"), default="safetensors",
                   help="safetensors: one codes file for train-prior (default) | npy: one .npy "
                   "of code ids per image in a tree mirroring the data's, and codes.json with "
                   "each file's key and label (for other trainers)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--flip", action="store_true", help="also encode every training image "
                   "mirrored left-right (twice the training grids for a prior; for photos and "
                   "clothes, not for digits or text); the test split is left as it is")

    p = command(sub, "export", cmd_export, "write a stage-1 model in a format other runtimes "
                "read (ONNX)", description="Export a stage-1 model: --format onnx writes "
                "encoder.onnx (uint8 images -> code ids), decoder.onnx (code ids -> images) and "
                "preprocessing.json into DIR, after checking them against PyTorch on held-out "
                "images with onnxruntime (docs/export.md).")
    p.add_argument("run", metavar="RUN_DIR", help="a stage-1 run folder or checkpoint folder")
    p.add_argument("--format", required=True, help=f"what to write: {' | '.join(FORMATS)}")
    p.add_argument("--out", metavar="DIR", required=True, help="folder to write (created; its "
                   "files of the same names are replaced)")
    p.add_argument("--device", default="cpu", help="where PyTorch runs in the parity check "
                   "(default: cpu, as onnxruntime)")

    p = command(sub, "pack", cmd_pack, "write an image folder into WebDataset tar shards",
                description="Write the images below FOLDER (labels from its first-level "
                "sub-folders) into tar shards for streaming; an interrupted pack continues when "
                "run again.")
    p.add_argument("folder", metavar="FOLDER", help="a folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the shards and shards.json")
    p.add_argument("--shard-size", type=int, default=2000, help="images per shard (default: "
                   "2000; aim for at least as many shards as ranks x workers)")
    p.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ... "
                   "(default: train)")

    p = command(sub, "train-prior", cmd_train_prior, "train stage 2 (a prior over code grids)",
                description="Train a Transformer prior over code grids; options override the "
                "chosen preset.")
    p.add_argument("--codes", metavar="CODES", help="a codes file written by `vqvae encode`")
    p.add_argument("--stage1", metavar="RUN_DIR", help="or: encode this stage-1 run's (or "
                   "checkpoint's) data now")
    p.add_argument("--data", help="with --stage1: another data source (default: the run's own)")
    training_options(p, PRIOR_PRESETS, "seed: the blog post's prior and optimiser exactly; "
                     "default: the seed's blocks at half the width on >= 1M training codes, GPT "
                     "blocks with dropout below (docs/prior.md)")
    p.add_argument("--conditional", action="store_true",
                   help="condition on the codes' class labels (enables --class and --guidance)")
    add_options(p, PriorConfig, "prior model (defaults come from --preset)", "prior", False)
    add_options(p, PriorTrainConfig, "training (defaults come from --preset)", "ptrain", False)

    p = command(sub, "sample", cmd_sample, "draw new images from a trained prior", "prior",
                description="Draw code grids token by token (KV cache), decode them with the "
                "stage-1 model, write a PNG grid and the codes.")
    p.add_argument("--out", help="folder for samples.png and samples.safetensors "
                   "(default: RUN_DIR/sample)")
    add_options(p, SampleConfig, "sampling", "sample")

    p = command(sub, "inpaint", cmd_inpaint, "redraw the masked part of an image (maskgit "
                "priors)", "prior", description="Keep an image's codes outside a mask, redraw "
                "those under it and a ring around it with a maskgit prior, decode; a mask on the "
                "border outpaints.")
    p.add_argument("--image", required=True, help="the image (resized to the model's size)")
    p.add_argument("--mask", required=True, help="an image of IMAGE's size, white (> 127) where "
                   "to redraw")
    p.add_argument("--ring", type=int, default=1, help="code cells around the mask also "
                   "redrawn, so seams blend (default: 1)")
    p.add_argument("--out", help="result PNG (default: IMAGE.inpainted.png beside the image)")
    add_options(p, SampleConfig, "sampling", "sample",
                skip=("n", "batch_size", "no_cache", "all_classes"))

    p = command(sub, "report", cmd_report, "one self-contained HTML page about a run",
                description="Write one HTML file (images embedded, no network) about a run "
                "folder: its facts, curves, the codebook atlas, usage maps, each kept "
                "checkpoint's reconstructions and, for priors inside it or given, bits/code and "
                "samples. What is missing is said on the page; the run folder is not changed.")
    p.add_argument("run", metavar="RUN_DIR", help="a stage-1 run folder (with any prior runs "
                   "inside it) or a prior run folder")
    p.add_argument("--out", metavar="FILE", help="HTML file to write (default: "
                   "RUN_DIR/report.html)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")

    p = command(sub, "compress", cmd_compress, "compress images with a prior (its codes "
                "entropy-coded)", "prior", description="Encode images (resized to the model's "
                "size) into code grids and code them with the prior's probabilities into one "
                "file (docs/codec.md).")
    p.add_argument("images", nargs="+", metavar="IMAGES", help="image files or folders of them")
    p.add_argument("--out", required=True, help="the compressed file to write")
    p.add_argument("--labels", type=_labels, help="class ids for a class-conditional prior: one "
                   "for all images or one per image, comma-separated (coded at log2 C bits "
                   "each); default: none (the null class)")
    _coding_options(p)

    p = command(sub, "decompress", cmd_decompress, "decompress a file written by `vqvae "
                "compress`", description="Decode a compressed file into one PNG per image, "
                "named as the compressed images were; nothing is written unless every image's "
                "codes pass their checksum.")
    p.add_argument("file", metavar="FILE", help="a file written by `vqvae compress`")
    p.add_argument("--out", required=True, help="folder for the PNGs")
    p.add_argument("--prior", metavar="PRIOR_RUN", help="the prior run the file was compressed "
                   "with (default: the path the file records)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")

    p = command(sub, "surprise", cmd_surprise, "paint where the prior is surprised (bits per "
                "code) and rank outliers", "prior", description="Paint each image's per-code "
                "-log2 p over it and list bits per image; with --data, rank a data set's "
                "held-out images, most surprising first (outliers.png, ranking.csv).")
    p.add_argument("images", nargs="*", metavar="IMAGES", help="image files or folders of them")
    p.add_argument("--data", help="or: a data source whose held-out images to rank")
    p.add_argument("--out", required=True, help="folder for the pictures and the CSV")
    p.add_argument("--top", type=int, default=16, help="with --data: outliers pictured "
                   "(default: 16)")
    _coding_options(p)
    return parser


def _coding_options(p: argparse.ArgumentParser) -> None:
    """How grids are coded (a decoder repeats it from the file's header)."""
    p.add_argument("--batch-size", type=int, default=64, help="grids coded together: one "
                   "stream and one forward pass each (default: 64)")
    p.add_argument("--steps", type=int, help="a maskgit prior's parallel iterations (default: "
                   "the sampler's)")
    p.add_argument("--threads", type=int, default=1, help="intra-op CPU threads computing the "
                   "probabilities, recorded in the file (default: 1, the fastest for small "
                   "priors)")


def _one_line(e: BaseException) -> str:
    """An error's message; one re-raised by a DataLoader worker ("Caught DataError in DataLoader
    worker process 0. Original Traceback ...") is cut down to the worker's own message."""
    text = str(e)
    if "\nOriginal Traceback" in text:
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]  # "vqvae.errors.DataError: ..."
    return text


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated


def _stop_on_sigterm() -> Any:
    """SIGTERM raises :class:`Terminated` (unless a host program handles it): a command stops as
    on Ctrl-C, its atomic writes cleaned up. Returns the handler to restore."""
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            return signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: no signal handling
        pass
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if getattr(args, "n", 2) < 2:
        print("vqvae: error: --n must be at least 2", file=sys.stderr)
        return 2
    original = warnings.formatwarning  # restored after: main() may run inside a host program
    warnings.formatwarning = lambda msg, cat, *a, **k: f"vqvae: warning: {msg}\n"  # one line
    sigterm = _stop_on_sigterm()
    try:
        with warnings.catch_warnings():
            # Under torchrun rank 0 alone warns: every rank reads the same run and options
            # (some, such as a resumed config's, before the process group exists).
            warnings.simplefilter("default" if torchrun_env()[0] == 0 else "ignore")
            return args.func(args) or 0
    except USER_ERRORS as e:
        print(f"vqvae: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"vqvae: error: {_one_line(e)}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a folder that cannot be written: one line, not a trace
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or _one_line(e))
        print(f"vqvae: error: {reason}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C outside a training loop (it checkpoints first)
        sig = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        print(f"vqvae: {args.command}: interrupted by {sig.name}", file=sys.stderr)
        return 128 + sig
    finally:
        warnings.formatwarning = original
        if sigterm is not None:
            signal.signal(signal.SIGTERM, sigterm)


if __name__ == "__main__":
    sys.exit(main())
