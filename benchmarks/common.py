"""What the benchmarks share: the environment line and command their output starts with, median
timings, the training loop's own stage-1 step, runs through the CLI, and the judging of images by
a small classifier (a classifier-feature Fréchet distance, after Heusel et al. 2017's FID).

``python benchmarks/NAME.py`` finds this module beside the script (Python searches a script's
own folder first); under pytest, pyproject.toml's ``pythonpath`` adds benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vqvae import (VQVAE, DataConfig, DataError, ImageSet, SampleConfig, Samples, Splits,
                   TrainConfig, load_splits, sample_images, to_float, to_uint8)
from vqvae.cli import main as vqvae
from vqvae.distributed import Runtime
from vqvae.evaluation.metrics import evaluate_autoencoder
from vqvae.evaluation.quality import (Classifier, ClassifierConfig, features, judge,
                                      train_classifier)
from vqvae.precision import loss_scaler
from vqvae.store import checkpoint as ckpt
from vqvae.training.stage1 import train_step, training_forward

# --- the header ---------------------------------------------------------------------------------


def environment(device: torch.device | str = "cpu", threads: int | None = None) -> str:
    """The setting a benchmark's figures hold for: torch's version, then a CUDA device's name and
    CUDA's version, or the CPU's architecture, its cores and torch's intra-op ``threads``
    (default: torch's own count)."""
    device = torch.device(device)
    if device.type == "cuda":
        return (f"torch {torch.__version__}, {torch.cuda.get_device_name(device)}, "
                f"CUDA {torch.version.cuda}")
    threads = torch.get_num_threads() if threads is None else threads
    return (f"torch {torch.__version__}, {platform.machine()} with {os.cpu_count()} cores, "
            f"{threads} thread(s)")


def command_line(script: str, argv: list[str] | None = None,
                 python: str = "PYTHONPATH=src python") -> str:
    """``$ PYTHONPATH=src python benchmarks/NAME.py ARGS``: the command that printed a table, for
    ``script`` (the benchmark's ``__file__``) and ``argv`` (default: this process's arguments)."""
    args = sys.argv[1:] if argv is None else argv
    return f"$ {python} " + shlex.join([f"benchmarks/{Path(script).name}", *args])


# --- timing -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; a CPU has nothing queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], repeats: int, *, warmup: int = 0, per_call: int = 1,
                   device: torch.device = torch.device("cpu")) -> float:
    """Median wall time of one call of ``fn`` after ``warmup`` calls, timing ``per_call`` calls
    at a time, ``repeats`` times (the device synchronised before each reading)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(per_call):
            fn()
        sync(device)
        times.append((time.perf_counter() - start) / per_call)
    return statistics.median(times)


def interleaved_seconds(fns: dict, rounds: int, device: torch.device = torch.device("cpu")
                        ) -> dict:
    """Median seconds of each of ``fns`` (key -> a callable), all of them timed once per round,
    in reversed order every other round, so that a busy machine slows them alike."""
    times: dict = {key: [] for key in fns}
    for r in range(rounds):
        for key in fns if r % 2 == 0 else reversed(list(fns)):
            start = time.perf_counter()
            fns[key]()
            sync(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) for key, t in times.items()}


def timing_options(parser: argparse.ArgumentParser, steps: int, rounds: int) -> None:
    """``--steps`` (per timed block), ``--rounds`` and ``--threads`` of a CPU speed benchmark."""
    parser.add_argument("--steps", type=int, default=steps, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=rounds,
                        help="medians over this many rounds")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default: 1)")


# --- training -----------------------------------------------------------------------------------


def stage1_trainer(model: VQVAE, tc: TrainConfig, device: torch.device
                   ) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
    """The training loop's stage-1 step for ``model`` (on ``device``) under ``tc``:
    :func:`~vqvae.training.stage1.train_step` through ``training_forward``, Adam at ``tc.lr``
    (fused on CUDA, as the loop's) and the precision's loss scaler. A float batch (B, C, H, W) on
    the device -> the loss terms (0-d tensors, not read back)."""
    net = training_forward(model, tc, Runtime(device))
    opt = torch.optim.Adam(model.parameters(), lr=tc.lr, fused=device.type == "cuda")
    scaler = loss_scaler(tc.precision, device)
    return lambda x: train_step(net, model, opt, scaler, x, tc)[0]


# The MSE rows are the seed's recipe whatever the preset's (the `default` preset trains with L1
# and a cosine schedule): a constant rate is what makes the checkpoint at S the S-step run.
MSE_RECIPE = ("--recon-loss", "mse", "--schedule", "constant")


def train(options: list[str], run: Path, steps: int) -> None:
    """``vqvae OPTIONS --out RUN`` unless RUN has finished its ``steps`` (a run stopped early
    also writes eval.json, at the step it reached: resume or delete it)."""
    if (run / "eval.json").exists():
        reached = json.loads((run / "eval.json").read_text())["step"]
        if reached >= steps:
            return
        raise SystemExit(f"{run} stopped at step {reached} of {steps}: resume or delete it")
    options = [*options, "--out", str(run)]
    print("$ vqvae " + shlex.join(options), file=sys.stderr, flush=True)
    if vqvae(options) != 0:
        raise SystemExit(f"{run} failed")


def seconds(run: Path, step: int) -> float:
    """Training-loop seconds of ``run`` up to ``step``, from train.jsonl's logged speeds."""
    total, last = 0.0, 0
    for line in (run / "train.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["step"] > step:
            break
        total += (record["step"] - last) / record["steps_per_s"]
        last = record["step"]
    return total


def parse_spec(spec: str) -> tuple[str, tuple[str, ...]]:
    """'NAME=OPTIONS' -> (NAME, the options split as a shell would)."""
    name, sep, options = spec.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"expected NAME=OPTIONS, got {spec!r}")
    return name.strip(), tuple(shlex.split(options))


def slug(name: str) -> str:
    """A row's name as a folder name."""
    return "".join(c if c.isalnum() or c == "." else "-" for c in name)


# --- judging ------------------------------------------------------------------------------------

FORMAT = "vqvae-quality-classifier/1"


def classifier_for(train: ImageSet, data: DataConfig, cfg: ClassifierConfig,
                   cache: Path) -> tuple[Classifier, bool]:
    """The cached classifier when ``cache`` was trained on the same data with ``cfg``, else a
    freshly trained one, written to ``cache``. Returns (classifier, loaded from the cache)."""
    if train.labels is None:
        raise DataError(f"{data.source} has no labels: the quality benchmark needs classes")
    classes = len(train.classes) if train.classes else int(train.labels.max()) + 1
    meta = {"format": FORMAT, "source": data.source, "size": str(data.size),
            "channels": str(train.images.shape[1]), "classes": str(classes),
            "train_images": str(len(train)), "config": json.dumps(asdict(cfg), sort_keys=True)}
    model = Classifier(train.images.shape[1], data.size, classes)
    if cache.exists():
        try:
            with safe_open(str(cache), framework="pt") as f:
                stored = f.metadata() or {}
            if stored == meta:
                model.load_state_dict(load_file(str(cache)))
                return model.eval(), True
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:  # retrain
            print(f"ignoring the classifier cache {cache}: {e}", file=sys.stderr)
    model = train_classifier(train.images, train.labels, classes, cfg)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    os.replace(tmp, cache)
    return model, False


def default_cache(data: DataConfig) -> Path:
    """runs/quality/classifier-SOURCE-SIZEpx.safetensors: one cache per data source and size."""
    name = "".join(c if c.isalnum() else "-" for c in Path(data.source).name.lower())
    return Path(f"runs/quality/classifier-{name}-{data.size}px.safetensors")


class Judging(NamedTuple):
    """What every row of a benchmark is judged with: the classifier, its features of all the
    training images (N_train, F), and the held-out images judged (uint8 (n, C, S, S))."""

    classifier: Classifier
    reference: torch.Tensor
    held: torch.Tensor
    splits: Splits
    cached: bool  # the classifier came from its cache


def judging(data: DataConfig, n: int, cfg: ClassifierConfig | None = None,
            cache: Path | None = None) -> Judging:
    """The classifier of ``data`` (cached in ``cache``, default :func:`default_cache`), the
    training images' features, and at most ``n`` held-out images: the same seeded pick every
    time."""
    splits = load_splits(data)
    classifier, cached = classifier_for(splits.train, data, cfg or ClassifierConfig(),
                                        cache or default_cache(data))
    test = splits.test
    pick = torch.randperm(len(test), generator=torch.Generator().manual_seed(0))
    return Judging(classifier, features(classifier, splits.train.images),
                   test.images[pick[:min(n, len(test))]], splits, cached)


@torch.inference_mode()
def reconstructions(model: VQVAE, images: torch.Tensor, run: str = "the model",
                    batch_size: int = 256) -> torch.Tensor:
    """uint8 images (N, C, S, S) -> the stage-1 model's quantized reconstructions, uint8;
    ``run`` names the model in the error on images of another shape."""
    if (model.cfg.in_channels, model.cfg.image_size) != tuple(images.shape[1:3]):
        raise DataError(f"{run} expects {model.cfg.in_channels}x{model.cfg.image_size}px images, "
                        f"the benchmark's are {images.shape[1]}x{images.shape[2]}px")
    return torch.cat([to_uint8(model.reconstruct(to_float(images[s:s + batch_size])))
                      for s in range(0, images.shape[0], batch_size)])


def prior_samples(run: str, n: int, shape: torch.Size, draws: int, first_seed: int = 0,
                  temperature: float = 1.0, top_k: int | None = None) -> list[Samples]:
    """``draws`` sets of n samples (their images uint8 (n, C, S, S) and codes), drawn with seeds
    first_seed, first_seed + 1, ..."""
    sets = []
    for seed in range(first_seed, first_seed + draws):
        cfg = SampleConfig(n=n, temperature=temperature, top_k=top_k, seed=seed)
        sets.append(sample_images(run, cfg))
        if sets[-1].images.shape[1:] != shape:
            raise DataError(f"{run} draws images shaped {tuple(sets[-1].images.shape[1:])}, "
                            f"the benchmark's are {tuple(shape)}")
    return sets


def judged(classifier: Classifier, draws: list[torch.Tensor], reference) -> dict:
    """judge() of each draw of n images, averaged; the Fréchet distance's spread over the draws
    (sample standard deviation) when there are several."""
    results = [judge(classifier, images, reference) for images in draws]
    mean = {key: sum(r[key] for r in results) / len(results)
            for key in ("frechet", "confidence", "confident", "coverage")}
    sd = (statistics.stdev(r["frechet"] for r in results) if len(results) > 1 else None)
    return {**mean, "frechet_sd": sd, "n": results[0]["n"], "draws": len(results),
            "classes": results[0]["classes"]}


def score(path: Path, judge_with: Judging) -> dict[str, float]:
    """PSNR, SSIM and reconstruction Fréchet distance of one checkpoint on the held images."""
    model = ckpt.load_autoencoder(path)
    held = judge_with.held
    metrics = evaluate_autoencoder(model, held)
    fd = judged(judge_with.classifier, [reconstructions(model, held, str(path))],
                judge_with.reference)["frechet"]
    return {"psnr": metrics["psnr"], "ssim": metrics["ssim"], "fd": fd}
