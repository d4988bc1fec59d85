"""Sample quality of stage-1 reconstructions and prior samples, judged by a small classifier.

A CNN trained on the data set's training split (seeded; cached in a safetensors file this script
writes, so every run judges with the same classifier) scores each set of images: the Fréchet
distance of its penultimate features to those of the training images (a classifier-feature FID,
Heusel et al. 2017, comparable only within this benchmark), its mean top-1 confidence, the share
of images it classifies with confidence >= 0.8 and how many classes those cover. The floor is
what real held-out images score. Every row judges the same number n of images (the distance's
bias depends on n); a prior is judged on several draws of n, whose spread the table shows.

    PYTHONPATH=src python benchmarks/sample_quality.py --data digits --size 16 \\
        --stage1 runs/demo --prior runs/demo/prior

``--judge FOLDER`` instead prints one line for the samples `vqvae sample` saved in FOLDER (what
`make demo` ends with), judged by the same cached classifier of their stage-1 model's data.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from vqvae import (VQVAE, DataConfig, DataError, ImageSet, SampleConfig, Samples, load_samples,
                   load_splits, sample_images, to_float, to_uint8)
from vqvae.store import checkpoint as ckpt
from vqvae.generation.codes import stage1_data
from vqvae.evaluation.quality import (Classifier, ClassifierConfig, accuracy, features, judge,
                           train_classifier)

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


def row(name: str, result: dict) -> str:
    distance = f"{result['frechet']:.1f}"
    if result["frechet_sd"] is not None:
        distance += f" ± {result['frechet_sd']:.1f}"
    return (f"| {name} | {result['n']} x {result['draws']} | {distance} | "
            f"{result['confidence']:.3f} | {100 * result['confident']:.1f}% | "
            f"{result['coverage']:g}/{result['classes']} |")


def default_cache(data: DataConfig) -> Path:
    """runs/quality/classifier-SOURCE-SIZEpx.safetensors: one cache per data source and size."""
    slug = "".join(c if c.isalnum() else "-" for c in Path(data.source).name.lower())
    return Path(f"runs/quality/classifier-{slug}-{data.size}px.safetensors")


def judge_folder(folder: str, cfg: ClassifierConfig, cache: str | None = None) -> str:
    """One line on the samples saved in ``folder`` (samples.safetensors, decoded by their stage-1
    model), judged by the classifier of that model's data: share confident, classes covered,
    mean confidence and, for samples drawn for a class, the share classified as that class."""
    samples = load_samples(folder)
    stage1 = samples.codes.stage1
    data = stage1_data(stage1, ckpt.load_autoencoder(stage1))
    train = load_splits(data).train
    classifier, _ = classifier_for(train, data, cfg, Path(cache) if cache else default_cache(data))
    result = judge(classifier, samples.images)
    labels = samples.codes.split("samples").labels
    line = (f"{folder}: {100 * result['confident']:.0f}% of {result['n']} samples confident "
            f"(>= 0.8), {result['coverage']}/{result['classes']} classes, mean confidence "
            f"{result['confidence']:.2f}")
    if labels is not None:
        shown = accuracy(classifier, samples.images, labels)
        line += f", {100 * shown:.0f}% classified as the class they were drawn for"
    return line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="digits", help="data source with labels")
    parser.add_argument("--size", type=int, default=16, help="image side in pixels")
    parser.add_argument("--stage1", action="append", default=[], metavar="RUN_DIR",
                        help="a stage-1 run or checkpoint: judge its held-out reconstructions")
    parser.add_argument("--prior", action="append", default=[], metavar="PRIOR_DIR",
                        help="a prior run or checkpoint: judge n of its samples")
    parser.add_argument("--judge", action="append", default=[], metavar="SAMPLE_DIR",
                        help="instead of the table: one line on the samples `vqvae sample` saved "
                             "in this folder")
    parser.add_argument("--n", type=int, default=1000,
                        help="images per row (at most the held-out size)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--sample-seed", type=int, default=0, help="seed of the first draw")
    parser.add_argument("--draws", type=int, default=5,
                        help="sets of n samples per prior (seeds sample-seed, +1, ...): their "
                             "distances' mean and standard deviation")
    parser.add_argument("--classifier-steps", type=int, default=ClassifierConfig.steps)
    parser.add_argument("--classifier-seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="classifier cache file (safetensors); "
                        "default runs/quality/classifier-SOURCE-SIZEpx.safetensors")
    args = parser.parse_args(argv)
    if args.n < 2 or args.draws < 1:
        parser.error("--n must be >= 2 and --draws >= 1")
    if args.judge and (args.stage1 or args.prior):
        parser.error("--judge prints its own lines: give it without --stage1 / --prior")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = ClassifierConfig(steps=args.classifier_steps, seed=args.classifier_seed)
    if args.judge:
        for folder in args.judge:
            print(judge_folder(folder, cfg, args.cache), flush=True)
        return
    data = DataConfig(source=args.data, size=args.size)
    splits = load_splits(data)
    cache = Path(args.cache) if args.cache else default_cache(data)
    classifier, cached = classifier_for(splits.train, data, cfg, cache)
    test = splits.test
    n = min(args.n, len(test))
    held = test.images[torch.randperm(len(test), generator=torch.Generator().manual_seed(0))[:n]]
    reference = features(classifier, splits.train.images)  # (N_train, F)
    held_out_accuracy = ("n/a (unlabelled)" if test.labels is None else
                         f"{100 * accuracy(classifier, test.images, test.labels):.2f}%")

    print("$ PYTHONPATH=src python " + shlex.join(["benchmarks/sample_quality.py", *sys.argv[1:]]))
    print(f"\ndata: {args.data} at {args.size}px, {len(splits.train)} train / {len(test)} "
          f"held-out images; classifier: {cfg.steps} steps, seed {cfg.seed}, "
          f"{classifier.feature_dim} features, held-out accuracy {held_out_accuracy} "
          f"({'cached' if cached else 'trained'}: {cache}); every row: {n} images against the "
          f"features of all {len(splits.train)} training images; prior samples at temperature "
          f"{args.temperature:g}, top-k {args.top_k}, {args.draws} draws of {n} from seed "
          f"{args.sample_seed} (distance: mean ± sd over the draws)\n")
    print("| images | n x draws | Fréchet distance (classifier features) | mean confidence | "
          "confident (>= 0.8) | classes covered |")
    print("|---|---:|---:|---:|---:|---:|")
    print(row("held-out images (floor)", judged(classifier, [held], reference)), flush=True)
    for run in args.stage1:
        name = f"stage-1 reconstructions: {run} ({ckpt.resolve(run).name})"
        rec = reconstructions(ckpt.load_autoencoder(run), held, run)
        print(row(name, judged(classifier, [rec], reference)), flush=True)
    for run in args.prior:
        name = f"prior samples: {run} ({ckpt.resolve(run).name})"
        draws = [d.images for d in prior_samples(run, n, held.shape[1:], args.draws,
                                                 args.sample_seed, args.temperature, args.top_k)]
        print(row(name, judged(classifier, draws, reference)), flush=True)


if __name__ == "__main__":
    main()
