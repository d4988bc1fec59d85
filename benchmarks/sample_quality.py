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
from pathlib import Path

from vqvae import DataConfig, load_samples, load_splits
from vqvae.evaluation.quality import ClassifierConfig, accuracy, judge
from vqvae.generation.codes import stage1_data
from vqvae.store import checkpoint as ckpt

from common import (classifier_for, command_line, default_cache, judged, judging,
                    prior_samples, reconstructions)


def row(name: str, result: dict) -> str:
    distance = f"{result['frechet']:.1f}"
    if result["frechet_sd"] is not None:
        distance += f" ± {result['frechet_sd']:.1f}"
    return (f"| {name} | {result['n']} x {result['draws']} | {distance} | "
            f"{result['confidence']:.3f} | {100 * result['confident']:.1f}% | "
            f"{result['coverage']:g}/{result['classes']} |")


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
    cache = Path(args.cache) if args.cache else default_cache(data)
    classifier, reference, held, splits, cached = judging(data, args.n, cfg, cache)
    test, n = splits.test, len(held)
    held_out_accuracy = ("n/a (unlabelled)" if test.labels is None else
                         f"{100 * accuracy(classifier, test.images, test.labels):.2f}%")

    print(command_line(__file__, argv))
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
