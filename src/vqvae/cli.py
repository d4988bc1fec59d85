"""The ``vqvae`` command line: parse, call one library function, print.

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
from pathlib import Path
from typing import Any, Sequence

from .errors import (CheckpointError, ConfigError, DataError, NonFiniteError, PeerError,
                     PerceptualWeightsError)
from . import __version__
from .store.checkpoint import write_json
from .generation.codes import Codes, encode_dataset, load_codes, load_trained, save_codes
from .config import (PRESETS, PRIOR_PRESETS, RESUMABLE, DataConfig, PriorConfig, PriorTrainConfig,
                     SampleConfig, TrainConfig, VQVAEConfig, resumed, run_config)
from .data.sources import ImageSet
from .data.files import FileSet
from .data.shards import pack
from .distributed import Runtime, launch, pick_device, torchrun_env
from .evaluation.metrics import score_autoencoder
from .options import add_options, given
from .evaluation.plots import plot_code_usage
from .generation.inpaint import inpaint_files
from .training.driver import RunResult
from .store.runs import find_run
from .generation.sample import (grid_pairs, interpolation_grid, pick, reconstruction_grid, sample_images,
                     save_png, save_samples)
from .training.stage1 import finetune_config, load_run_config, train_autoencoder
from .training.stage2 import (load_prior_run_config, prior_run_config, prior_summary,
                          train_prior)

STAGE1, STAGE2 = ("data", "model", "train"), ("prior", "ptrain")  # option groups (dest prefixes)


def _run_config(args: argparse.Namespace, load: Any, groups: Sequence[str],
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


def _beside(run: str, name: str) -> Path:
    """Default output folder of a command on RUN (a run or checkpoint folder): in its run."""
    return (find_run(run) or Path(run)) / name


# --- commands ----------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace) -> int:
    if args.resume:
        run_dir, cfg = Path(args.resume), _run_config(args, load_run_config, STAGE1)
    else:
        cfg = run_config(args.preset, DataConfig(**given(args, "data")), given(args, "model"),
                         given(args, "train"))
        run_dir = _out(args)
    with launch(pick_device(cfg.train.device)) as runtime:
        result = train_autoencoder(cfg, run_dir, resume=bool(args.resume), runtime=runtime)
    return _finish(result, runtime, "train")


def cmd_finetune_decoder(args: argparse.Namespace) -> int:
    cfg = finetune_config(args.run, given(args, "train"))
    with launch(pick_device(cfg.train.device)) as runtime:
        result = train_autoencoder(cfg, _out(args), runtime=runtime)
    return _finish(result, runtime, "train")


def _finish(result: RunResult, runtime: Runtime, command: str) -> int:
    """Print the summary; a run stopped by a signal exits 128 + its number (130, 143), so a
    scheduler can tell it from a finished one, and says how to continue it."""
    if runtime.is_main:
        print(result.summary())
        if result.signal:
            print(f"stopped at step {result.step} by {signal.Signals(result.signal).name}, "
                  f"resumable: vqvae {command} --resume {result.run_dir}")
    return 128 + result.signal if result.signal else 0


def _trained(args: argparse.Namespace) -> tuple[Any, ImageSet | FileSet]:
    model, splits = load_trained(args.run, args.data, pick_device(args.device))
    return model, getattr(splits, args.split)


def cmd_reconstruct(args: argparse.Namespace) -> None:
    model, split = _trained(args)
    images = pick(split, grid_pairs(args.n), args.seed)
    for name, quantize in (("sample_ae_1", False), ("sample_ae_2", True)):
        path = save_png(reconstruction_grid(model, images, args.n, quantize),
                        Path(args.out or _beside(args.run, "reconstruct")) / f"{name}.png")
        print(f"{name} ({'with' if quantize else 'without'} quantization): {path}")


def cmd_interpolate(args: argparse.Namespace) -> None:
    model, split = _trained(args)
    images = pick(split, 2 * args.n, args.seed)
    path = save_png(interpolation_grid(model, images[:args.n], images[args.n:], args.n),
                    Path(args.out or _beside(args.run, "interpolate")) / "sample_inter.png")
    print(f"sample_inter: {path}")


def cmd_eval(args: argparse.Namespace) -> None:
    model, split = _trained(args)
    scores, counts = score_autoencoder(model, split, device=pick_device(args.device))
    out = Path(args.out or _beside(args.run, f"eval_{args.split}.json"))
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder: name the JSON file to write")
    write_json(out, {"split": args.split, **scores})
    histogram = plot_code_usage(counts, out.with_name(f"code_usage_{args.split}.png"),
                                f"{args.split} code usage")
    for key, value in scores.items():
        print(f"{key:18s} {value:.4f}" if isinstance(value, float) else f"{key:18s} {value}")
    print(f"written to {out}\ncode usage histogram: {histogram}")


def cmd_encode(args: argparse.Namespace) -> None:
    codes = encode_dataset(args.run, args.data, args.batch_size, pick_device(args.device),
                           flip=args.flip)
    print(f"encoded {codes.summary()}: {save_codes(codes, args.out)}")


def _prior_codes(args: argparse.Namespace, runtime: Runtime) -> tuple[Codes, str]:
    """The codes to train on: a codes file, or a stage-1 run's data encoded now (by every rank:
    the same codes, no collective)."""
    if bool(args.codes) == bool(args.stage1):
        raise ConfigError("give either --codes CODES or --stage1 RUN_DIR (which encodes its data)")
    if args.codes and args.data:
        raise ConfigError("--data goes with --stage1; a codes file already names its data")
    if args.codes:
        return load_codes(args.codes), str(Path(args.codes).resolve())
    return encode_dataset(args.stage1, args.data, device=runtime.device,
                          progress=runtime.is_main), ""


def cmd_train_prior(args: argparse.Namespace) -> int:
    resuming = (_run_config(args, load_prior_run_config, STAGE2,
                            ("codes", "stage1", "data", "conditional")) if args.resume else None)
    device = given(args, "ptrain").get("device") or (resuming.train.device if resuming else "auto")
    with launch(pick_device(device)) as runtime:
        if resuming:
            result = train_prior(resuming, args.resume, resume=True, runtime=runtime)
        else:
            codes, codes_path = _prior_codes(args, runtime)
            cfg = prior_run_config(codes, codes_path, args.preset, args.conditional,
                                   given(args, "prior"), given(args, "ptrain"))
            if runtime.is_main:
                print(f"prior: {prior_summary(cfg)}", flush=True)
            result = train_prior(cfg, _out(args), codes=codes, runtime=runtime)
    return _finish(result, runtime, "train-prior")


def cmd_inpaint(args: argparse.Namespace) -> None:
    result, strip = inpaint_files(args.run, args.image, args.mask,
                                  SampleConfig(**given(args, "sample")), args.out, args.ring,
                                  pick_device(args.device))
    print(f"inpainted: {result}\noriginal | mask | result: {strip}")


def cmd_sample(args: argparse.Namespace) -> None:
    samples = sample_images(args.run, SampleConfig(**given(args, "sample")),
                            pick_device(args.device))
    png, codes = save_samples(samples, args.out or _beside(args.run, "sample"))
    print(f"{samples.images.shape[0]} samples: {png}\ntheir codes: {codes}")


def cmd_pack(args: argparse.Namespace) -> None:
    packed = pack(args.folder, args.out, args.shard_size, args.prefix)
    again = ("" if not packed.resumed_from else " (all packed before)"
             if packed.resumed_from == packed.images
             else f" (continued after {packed.resumed_from})")
    print(f"packed {packed.images} images{again} into {packed.shards} shard(s): {packed.out}\n"
          f"train on them: vqvae train --data '{packed.out}/{args.prefix}-"
          f"{{{0:06d}..{packed.shards - 1:06d}}}.tar'")


# --- parser ------------------------------------------------------------------------------------


class _PresetAction(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        namespace.preset, namespace.preset_given = values, True


def _command(sub: Any, name: str, func: Any, help: str, run: str = "", grid: int = 0,
             **kwargs: Any) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help, description=kwargs.pop("description", help), **kwargs)
    p.set_defaults(func=func, preset_given=False)
    if run:
        p.add_argument("run", metavar="RUN_DIR", help=f"a {run} run folder or checkpoint folder")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    if run == "stage-1":
        p.add_argument("--data", help="another data source (default: the run's own)")
    if grid:
        p.add_argument("--split", choices=("test", "train"), default="test", help="(default: test)")
        p.add_argument("--n", type=int, default=grid, help=f"grid size (default: {grid})")
        p.add_argument("--seed", type=int, default=0, help="which images are drawn (default: 0)")
    return p


def _training(p: argparse.ArgumentParser, presets: dict, help: str) -> None:
    p.add_argument("--out", metavar="RUN_DIR", help="new run folder to write")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(presets), default="default", action=_PresetAction,
                   help=help)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqvae", description=(
        "Train a VQ-VAE on a pile of images, then reconstruct, interpolate and evaluate it; "
        "encode images into codes, train a prior over them and sample new images."))
    parser.add_argument("--version", action="version", version=f"vqvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(sub, "train", cmd_train, "train stage 1 (the VQ-VAE)",
                 description="Train a VQ-VAE; options override the chosen preset.")
    _training(p, PRESETS, "seed: the blog post's model exactly; default: the improved one; "
              "vqgan: a VQGAN-class autoencoder (GroupNorm blocks, attention, f8 from 64 px)")
    add_options(p, DataConfig, "data", "data")
    add_options(p, VQVAEConfig, "model (defaults come from --preset)", "model", False)
    add_options(p, TrainConfig, "training", "train")

    p = _command(sub, "finetune-decoder", cmd_finetune_decoder, "train a stage-1 model's "
                 "decoder alone (e.g. with --gan-weight): its codes, and priors on them, stay valid",
                 description="Fine-tune the decoder of a trained stage-1 model in a new run, its "
                 "encoder and codebook frozen: codes and priors made with RUN_DIR decode with the "
                 "result (vqvae sample PRIOR --decoder NEW_RUN). Options override RUN_DIR's "
                 "training options; the learning rate defaults to a tenth of RUN_DIR's.")
    p.add_argument("run", metavar="RUN_DIR", help="a stage-1 run or checkpoint folder")
    p.add_argument("--out", metavar="NEW_RUN", required=True, help="new run folder to write")
    p.set_defaults(resume=None)
    add_options(p, TrainConfig, "training (defaults: RUN_DIR's; --lr: a tenth of it)", "train",
                False)

    p = _command(sub, "reconstruct", cmd_reconstruct,
                 "reconstruction grids with and without quantization", "stage-1", 8)
    p.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/reconstruct)")
    p = _command(sub, "interpolate", cmd_interpolate,
                 "interpolate latents of image pairs, one row per pair", "stage-1", 8)
    p.add_argument("--out", help="folder for the PNG (default: RUN_DIR/interpolate)")
    p = _command(sub, "eval", cmd_eval, "held-out metrics: MSE, PSNR, codebook usage, "
                 "perplexity", "stage-1", 0)
    p.add_argument("--split", choices=("test", "train"), default="test", help="(default: test)")
    p.add_argument("--out", help="JSON file to write (default: RUN_DIR/eval_SPLIT.json)")

    p = _command(sub, "encode", cmd_encode, "turn a data set into code grids with a stage-1 "
                 "model", "stage-1", description="Encode the train and test splits into one "
                 "codes file.")
    p.add_argument("--out", metavar="CODES", required=True, help="codes file to write "
                   "(.safetensors)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--flip", action="store_true", help="also encode every training image "
                   "mirrored left-right (twice the training grids for a prior; for photos and "
                   "clothes, not for digits or text); the test split is left as it is")

    p = _command(sub, "pack", cmd_pack, "write an image folder into WebDataset tar shards",
                 description="Write the images below FOLDER (labels from its first-level "
                 "sub-folders) into tar shards for streaming; an interrupted pack continues when "
                 "run again.")
    p.add_argument("folder", metavar="FOLDER", help="a folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="folder for the shards and shards.json")
    p.add_argument("--shard-size", type=int, default=2000, help="images per shard (default: "
                   "2000; aim for at least as many shards as ranks x workers)")
    p.add_argument("--prefix", default="train", help="shard names: PREFIX-000000.tar, ... "
                   "(default: train)")

    p = _command(sub, "train-prior", cmd_train_prior, "train stage 2 (a prior over code grids)",
                 description="Train a Transformer prior over code grids; options override the "
                 "chosen preset.")
    p.add_argument("--codes", metavar="CODES", help="a codes file written by `vqvae encode`")
    p.add_argument("--stage1", metavar="RUN_DIR", help="or: encode this stage-1 run's (or "
                   "checkpoint's) data now")
    p.add_argument("--data", help="with --stage1: another data source (default: the run's own)")
    _training(p, PRIOR_PRESETS, "seed: the blog post's prior and optimiser exactly; default: "
              "the seed's blocks at half the width on >= 1M training codes, GPT blocks with "
              "dropout below (docs/prior.md)")
    p.add_argument("--conditional", action="store_true",
                   help="condition on the codes' class labels (enables --class and --guidance)")
    add_options(p, PriorConfig, "prior model (defaults come from --preset)", "prior", False)
    add_options(p, PriorTrainConfig, "training (defaults come from --preset)", "ptrain", False)

    p = _command(sub, "sample", cmd_sample, "draw new images from a trained prior", "prior",
                 description="Draw code grids token by token (KV cache), decode them with the "
                 "stage-1 model, write a PNG grid and the codes.")
    p.add_argument("--out", help="folder for samples.png and samples.safetensors "
                   "(default: RUN_DIR/sample)")
    add_options(p, SampleConfig, "sampling", "sample")

    p = _command(sub, "inpaint", cmd_inpaint, "redraw the masked part of an image (maskgit "
                 "priors)", "prior", description="Keep an image's codes outside a mask, redraw "
                 "those under it and a ring around it with a maskgit prior, decode; a mask on the "
                 "border outpaints.")
    p.add_argument("--image", required=True, help="the image (resized to the model's size)")
    p.add_argument("--mask", required=True, help="an image, white where to redraw")
    p.add_argument("--ring", type=int, default=1, help="code cells around the mask also "
                   "redrawn, so seams blend (default: 1)")
    p.add_argument("--out", help="result PNG (default: IMAGE.inpainted.png beside the image)")
    add_options(p, SampleConfig, "sampling", "sample",
                skip=("n", "batch_size", "no_cache", "all_classes"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    if getattr(args, "n", 2) < 2:
        print("vqvae: error: --n must be at least 2", file=sys.stderr)
        return 2
    original = warnings.formatwarning  # restored after: main() may run inside a host program
    warnings.formatwarning = lambda msg, cat, *a, **k: f"vqvae: warning: {msg}\n"  # one line
    try:
        with warnings.catch_warnings():
            # Under torchrun rank 0 alone warns: every rank reads the same run and options
            # (some, such as a resumed config's, before the process group exists).
            warnings.simplefilter("default" if torchrun_env()[0] == 0 else "ignore")
            return args.func(args) or 0
    except (ConfigError, DataError, CheckpointError, FileExistsError, PeerError,
            PerceptualWeightsError) as e:
        print(f"vqvae: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"vqvae: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a full disk, a folder that cannot be written: one line, not a trace
        reason = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        print(f"vqvae: error: {reason}: {e.filename or ''}".rstrip(": "), file=sys.stderr)
        return 1
    finally:
        warnings.formatwarning = original


if __name__ == "__main__":
    sys.exit(main())
