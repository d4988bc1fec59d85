"""The ``vqvae`` command line: a thin, typed layer over the library's functions.

Options of ``train`` are generated from the config dataclasses' fields and their help text, so the
CLI and the configs cannot drift apart; unknown options are an error.
"""

from __future__ import annotations

import argparse
import math
import sys
import types
import warnings
from contextlib import contextmanager
from dataclasses import MISSING, fields, replace
from pathlib import Path
from typing import (Any, Iterator, Literal, Sequence, Union, get_args, get_origin,
                    get_type_hints)

import torch

from . import __version__
from .checkpoint import CheckpointError, load_autoencoder, load_prior, write_json
from .codes import CodeSplit, Codes, encode_dataset, load_codes, save_codes
from .config import (PRESETS, PRIOR_PRESETS, ConfigError, DataConfig, PriorConfig,
                     PriorRunConfig, PriorTrainConfig, RunConfig, TrainConfig, VQVAEConfig)
from .data import DataError, ImageSet, load_splits
from .distributed import PeerError, Runtime, launch
from .metrics import score_autoencoder
from .plots import plot_code_usage
from .sample import decode_codes, interpolation_grid, reconstruction_grid, samples_grid, save_png
from .train import load_run_config, pick_device, train_autoencoder
from .train_prior import (PriorTrainResult, load_prior_run_config, load_stage1,
                          train_prior)

# Train fields a resumed run may change; batch_size so that a resume with another number of
# processes can keep the global batch (N x batch_size).
RESUMABLE = {"steps", "minutes", "device", "batch_size"}
QUANTIZER_OPTIONS = ("kmeans_init", "restart_after", "cosine", "lookup_dim", "ema_decay",
                     "ema_epsilon", "fsq_levels")


# --- options from config fields ----------------------------------------------------------------


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace(" ", "").split(",") if part)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parser_type(annotation: Any) -> tuple[Any, Sequence[str] | None]:
    """(argparse type, choices) for a field annotation such as ``int``, ``float | None``,
    ``bool`` (true/false) or ``tuple[int, ...]`` (comma-separated)."""
    origin = get_origin(annotation)
    if origin is Literal:
        return str, get_args(annotation)
    if annotation is bool:
        return _bool, None
    if origin is tuple:
        return _int_tuple, None
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(annotation) if a is not type(None)]
        return _parser_type(inner[0])
    return annotation, None


def _add_options(parser: argparse.ArgumentParser, cls: type, title: str, prefix: str,
                 show_default: bool = True) -> None:
    group = parser.add_argument_group(title)
    hints = get_type_hints(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        kind, choices = _parser_type(hints[f.name])
        default = "" if not show_default or f.default is MISSING else f" (default: {f.default})"
        flag = "--" + f.metadata.get("flag", f.name).replace("_", "-")
        group.add_argument(flag, dest=f"{prefix}.{f.name}", type=kind, choices=choices,
                           default=None, metavar=None if choices else f.name.upper(),
                           help=f.metadata.get("help", "") + default)


def _given(args: argparse.Namespace, prefix: str) -> dict[str, Any]:
    return {k.split(".", 1)[1]: v for k, v in vars(args).items()
            if k.startswith(prefix + ".") and v is not None}


def build_run_config(args: argparse.Namespace) -> RunConfig:
    """The RunConfig for ``vqvae train`` from a preset and the options actually given."""
    data = DataConfig(**_given(args, "data"))
    model = PRESETS[args.preset](data.size, data.channels or 3)
    given = _given(args, "model")
    if given.get("quantizer", model.quantizer) != model.quantizer:
        # The preset's quantizer options belong to its quantizer: another one starts clean.
        model = replace(model, **{name: VQVAEConfig.__dataclass_fields__[name].default
                                  for name in QUANTIZER_OPTIONS})
    if given.get("quantizer", model.quantizer) == "fsq" and "fsq_levels" in given:
        given.setdefault("codebook_size", math.prod(given["fsq_levels"]))
    model = replace(model, **given)
    return RunConfig(data=data, model=model, train=TrainConfig(**_given(args, "train")),
                     preset=args.preset)


# --- commands ----------------------------------------------------------------------------------


def _resumed(args: argparse.Namespace, cfg: Any, prefixes: Sequence[str], train_prefix: str,
             other_flags: Sequence[str]) -> Any:
    """The saved run config of ``--resume RUN_DIR`` with only the resumable options applied;
    anything else given on the command line is an error (it would silently be ignored)."""
    changed = set().union(*(_given(args, prefix) for prefix in prefixes))
    if changed - RESUMABLE or args.preset_given or any(getattr(args, f) for f in other_flags):
        raise ConfigError(f"with --resume only {', '.join(sorted(RESUMABLE))} may be given; "
                          f"the rest comes from {args.resume}/config.json")
    return replace(cfg, train=replace(cfg.train, **_given(args, train_prefix)))


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume:
        run_dir = Path(args.resume)
        cfg = _resumed(args, load_run_config(run_dir), ("data", "model", "train"), "train",
                       ("out",))
    else:
        if not args.out:
            raise ConfigError("--out RUN_DIR is required (or --resume RUN_DIR)")
        run_dir, cfg = Path(args.out), build_run_config(args)
    with _launch(cfg.train.device) as runtime:
        result = train_autoencoder(cfg, run_dir, resume=bool(args.resume), runtime=runtime)
    if not runtime.is_main:
        return
    m = result.metrics
    print(f"trained to step {result.step}; run folder: {result.run_dir}")
    print(f"held-out ({int(m['images'])} images): PSNR {m['psnr']:.2f} dB with quantization, "
          f"{m['psnr_noq']:.2f} dB without; codebook usage {m['usage']:.1f}% "
          f"({m['used_codes']}/{m['used_codes'] + m['dead_codes']}), "
          f"perplexity {m['perplexity']:.1f}")
    for name, path in result.pictures.items():
        print(f"  {name}: {path}")
    print(f"  curves: {result.run_dir / 'curves.png'}")
    print(f"  metrics: {result.run_dir / 'eval.json'}")


def _model_and_split(args: argparse.Namespace) -> tuple[Any, ImageSet, torch.device]:
    """The trained model of RUN_DIR and the requested split of its (or another) data source."""
    device = pick_device(args.device)
    model = load_autoencoder(args.run, device)
    data = load_run_config(Path(args.run)).data
    if args.data:
        data = DataConfig(source=args.data, size=model.cfg.image_size,
                          channels=model.cfg.in_channels, holdout=data.holdout,
                          split_seed=data.split_seed)
    splits = load_splits(data)
    return model, getattr(splits, args.split), device


def _pick(images: ImageSet, count: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(images), generator=gen)[:count]
    if index.numel() < count:  # tiny sets: repeat
        index = index.repeat(-(-count // max(1, index.numel())))[:count]
    return images.images[index]


def cmd_reconstruct(args: argparse.Namespace) -> None:
    model, split, _ = _model_and_split(args)
    images = _pick(split, -(-args.n // 2) * args.n, args.seed)
    out = Path(args.out or Path(args.run) / "reconstruct")
    for name, quantize in (("sample_ae_1", False), ("sample_ae_2", True)):
        path = save_png(reconstruction_grid(model, images, args.n, quantize), out / f"{name}.png")
        print(f"{name} ({'with' if quantize else 'without'} quantization): {path}")


def cmd_interpolate(args: argparse.Namespace) -> None:
    model, split, _ = _model_and_split(args)
    images = _pick(split, 2 * args.n, args.seed)
    grid = interpolation_grid(model, images[:args.n], images[args.n:], args.n)
    path = save_png(grid, Path(args.out or Path(args.run) / "interpolate") / "sample_inter.png")
    print(f"sample_inter: {path}")


def cmd_eval(args: argparse.Namespace) -> None:
    model, split, device = _model_and_split(args)
    scores, counts = score_autoencoder(model, split.images, device=device)
    metrics = {"split": args.split, **scores}
    out = Path(args.out or Path(args.run) / f"eval_{args.split}.json")
    write_json(out, metrics)
    histogram = plot_code_usage(counts, out.with_name(f"code_usage_{args.split}.png"),
                                f"{args.split} code usage")
    for key in ("images", "mse", "psnr", "mse_noq", "psnr_noq", "usage", "used_codes",
                "dead_codes", "perplexity", "code_entropy_bits"):
        value = metrics[key]
        print(f"{key:18s} {value:.4f}" if isinstance(value, float) else f"{key:18s} {value}")
    print(f"written to {out}")
    print(f"code usage histogram: {histogram}")


# --- stage 2 -----------------------------------------------------------------------------------


def cmd_encode(args: argparse.Namespace) -> None:
    codes = encode_dataset(args.run, args.data, args.batch_size, pick_device(args.device))
    path = save_codes(codes, args.out)
    h, w = codes.grid
    sizes = ", ".join(f"{len(s)} {name}" for name, s in codes.splits.items())
    labels = f"{codes.num_classes} classes" if codes.classes else "no labels"
    print(f"encoded {sizes} images of {codes.source} into {h}x{w} grids of "
          f"{codes.codebook_size} codes ({labels}): {path}")


def _prior_codes(args: argparse.Namespace, runtime: Runtime) -> tuple[Codes, str]:
    """The codes to train on: a codes file, or a stage-1 run's data encoded now (by every rank:
    the same codes, no collective)."""
    if bool(args.codes) == bool(args.stage1):
        raise ConfigError("give either --codes CODES or --stage1 RUN_DIR (which encodes its data)")
    if args.codes:
        if args.data:
            raise ConfigError("--data goes with --stage1; a codes file already names its data")
        return load_codes(args.codes), str(Path(args.codes).resolve())
    return encode_dataset(args.stage1, args.data, device=runtime.device,
                          progress=runtime.is_main), ""


@contextmanager
def _launch(device: str) -> Iterator[Runtime]:
    """One process, or under torchrun one rank of many; only rank 0 talks (other ranks' warnings
    are silenced: they would repeat rank 0's)."""
    with launch(pick_device(device)) as runtime, warnings.catch_warnings():
        if not runtime.is_main:
            warnings.simplefilter("ignore")
        yield runtime


def cmd_train_prior(args: argparse.Namespace) -> None:
    device = _given(args, "ptrain").get("device") or (
        load_prior_run_config(args.resume).train.device if args.resume else "auto")
    with _launch(device) as runtime:
        result = _train_prior(args, runtime)
    if not runtime.is_main:
        return
    m = result.metrics
    print(f"trained the prior to step {result.step}; run folder: {result.run_dir}")
    extra = (f" ({m['bits_per_code_uncond']:.4f} with the null class)"
             if "bits_per_code_uncond" in m else "")
    print(f"held-out ({m['grids']} grids): {m['bits_per_code']:.4f} bits/code{extra}")
    print(f"  samples: {result.samples}")
    print(f"  curves: {result.run_dir / 'curves.png'}")
    print(f"  metrics: {result.run_dir / 'eval.json'}")


def _train_prior(args: argparse.Namespace, runtime: Runtime) -> PriorTrainResult:
    codes = None
    if args.resume:
        run_dir = Path(args.resume)
        cfg = _resumed(args, load_prior_run_config(run_dir), ("prior", "ptrain"), "ptrain",
                       ("out", "codes", "stage1", "data", "conditional"))
    else:
        if not args.out:
            raise ConfigError("--out RUN_DIR is required (or --resume RUN_DIR)")
        run_dir = Path(args.out)
        codes, codes_path = _prior_codes(args, runtime)
        if args.conditional and not codes.num_classes:
            raise ConfigError("--conditional needs class labels, and these codes have none")
        h, w = codes.grid
        make_model, make_train = PRIOR_PRESETS[args.preset]
        model = make_model(codes.codebook_size, h, w, codes.num_classes if args.conditional else 0)
        cfg = PriorRunConfig(replace(model, **_given(args, "prior")),
                             replace(make_train(), **_given(args, "ptrain")), codes_path,
                             codes.stage1, codes.stage1_sha256, args.preset)
    return train_prior(cfg, run_dir, resume=bool(args.resume), codes=codes, runtime=runtime)


def cmd_sample(args: argparse.Namespace) -> None:
    device = pick_device(args.device)
    run = Path(args.run)
    cfg = load_prior_run_config(run)
    prior = load_prior(run, device)
    stage1 = load_stage1(cfg, device)
    classes = prior.cfg.num_classes
    if args.cls is not None and not classes:
        raise ConfigError("--class needs a class-conditional prior (train-prior --conditional)")
    if args.cls is not None and not 0 <= args.cls < classes:
        raise ConfigError(f"--class {args.cls} is out of range: this prior knows classes "
                          f"0..{classes - 1}")
    if args.guidance != 1.0 and args.cls is None:
        raise ConfigError("--guidance needs --class")
    try:
        codes = prior.generate(args.n, labels=args.cls, guidance=args.guidance,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               generator=torch.Generator().manual_seed(args.seed),
                               batch_size=args.batch_size, use_cache=not args.no_cache)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = Path(args.out or run / "sample")
    png = save_png(samples_grid(decode_codes(stage1, codes)), out / "samples.png")
    labels = None if args.cls is None else torch.full((args.n,), args.cls, dtype=torch.long)
    names = tuple(str(i) for i in range(classes)) if classes else None
    saved = save_codes(Codes({"samples": CodeSplit(codes.cpu(), labels)},
                             prior.cfg.codebook_size, cfg.stage1, cfg.stage1_sha256,
                             f"prior {run}", names), out / "samples.safetensors")
    print(f"{args.n} samples: {png}")
    print(f"their codes: {saved}")


# --- parser ------------------------------------------------------------------------------------


def _run_options(p: argparse.ArgumentParser, default_n: int) -> None:
    p.add_argument("run", metavar="RUN_DIR", help="a run folder written by `vqvae train`")
    p.add_argument("--data", help="another data source (default: the run's own)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="(default: test)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    if default_n:
        p.add_argument("--n", type=int, default=default_n, help=f"grid size (default: {default_n})")
        p.add_argument("--seed", type=int, default=0, help="which images are drawn (default: 0)")


class _PresetAction(argparse.Action):
    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        namespace.preset, namespace.preset_given = values, True


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqvae", description=(
        "Train a VQ-VAE on a pile of images, then reconstruct, interpolate and evaluate it; "
        "encode images into codes, train a prior over them and sample new images."))
    parser.add_argument("--version", action="version", version=f"vqvae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train stage 1 (the VQ-VAE)",
                       description="Train a VQ-VAE; options override the chosen preset.")
    p.add_argument("--out", metavar="RUN_DIR", help="new run folder to write")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(PRESETS), default="default", action=_PresetAction,
                   help="seed: the blog post's model exactly; default: the improved one")
    p.set_defaults(func=cmd_train, preset_given=False)
    _add_options(p, DataConfig, "data", "data")
    _add_options(p, VQVAEConfig, "model (defaults come from --preset)", "model",
                 show_default=False)
    _add_options(p, TrainConfig, "training", "train")

    p = sub.add_parser("reconstruct", help="reconstruction grids with and without quantization")
    _run_options(p, 8)
    p.add_argument("--out", help="folder for the PNGs (default: RUN_DIR/reconstruct)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("interpolate", help="interpolate latents of image pairs, one row per pair")
    _run_options(p, 8)
    p.add_argument("--out", help="folder for the PNG (default: RUN_DIR/interpolate)")
    p.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("eval", help="held-out metrics: MSE, PSNR, codebook usage, perplexity")
    _run_options(p, 0)
    p.add_argument("--out", help="JSON file to write (default: RUN_DIR/eval_SPLIT.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("encode", help="turn a data set into code grids with a stage-1 model",
                       description="Encode the train and test splits into one codes file.")
    p.add_argument("run", metavar="RUN_DIR", help="a stage-1 run folder (or checkpoint folder)")
    p.add_argument("--data", help="another data source (default: the run's own)")
    p.add_argument("--out", metavar="CODES", required=True, help="codes file to write "
                   "(.safetensors)")
    p.add_argument("--batch-size", type=int, default=256, help="images per batch (default: 256)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("train-prior", help="train stage 2 (the autoregressive prior)",
                       description="Train a Transformer prior over code grids; options override "
                       "the chosen preset.")
    p.add_argument("--codes", metavar="CODES", help="a codes file written by `vqvae encode`")
    p.add_argument("--stage1", metavar="RUN_DIR", help="or: encode this stage-1 run's data now")
    p.add_argument("--data", help="with --stage1: another data source (default: the run's own)")
    p.add_argument("--out", metavar="RUN_DIR", help="new run folder to write")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(PRIOR_PRESETS), default="default",
                   action=_PresetAction, help="seed: the blog post's prior and optimiser exactly; "
                   "default: GPT blocks")
    p.add_argument("--conditional", action="store_true",
                   help="condition on the codes' class labels (enables --class and --guidance)")
    p.set_defaults(func=cmd_train_prior, preset_given=False)
    _add_options(p, PriorConfig, "prior model (defaults come from --preset)", "prior",
                 show_default=False)
    _add_options(p, PriorTrainConfig, "training (defaults come from --preset)", "ptrain",
                 show_default=False)

    p = sub.add_parser("sample", help="draw new images from a trained prior",
                       description="Draw code grids token by token (KV cache), decode them with "
                       "the stage-1 model, write a PNG grid and the codes.")
    p.add_argument("run", metavar="RUN_DIR", help="a prior run folder written by `train-prior`")
    p.add_argument("--n", type=int, default=64, help="images to draw, laid out "
                   "ceil(sqrt(n)) per row (default: 64, an 8 x 8 grid)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default: 1)")
    p.add_argument("--top-k", type=int, help="keep only the k most probable codes")
    p.add_argument("--top-p", type=float, help="keep the smallest set of codes with mass >= p")
    p.add_argument("--class", dest="cls", type=int, help="class id (conditional priors)")
    p.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale, 1 = none (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--batch-size", type=int, default=64, help="grids per batch (default: 64)")
    p.add_argument("--no-cache", action="store_true",
                   help="recompute the whole prefix at every step (the seed's way; slow)")
    p.add_argument("--out", help="folder for samples.png and samples.safetensors "
                   "(default: RUN_DIR/sample)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps (default: auto)")
    p.set_defaults(func=cmd_sample)
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
            warnings.simplefilter("default")
            args.func(args)
    except (ConfigError, DataError, CheckpointError, FileExistsError, PeerError) as e:
        print(f"vqvae: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = original
    return 0


if __name__ == "__main__":
    sys.exit(main())
