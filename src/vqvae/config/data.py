"""The data config (``DataConfig``): where a run's images come from, their size, the held-out
split, caching, training augmentation and decoding workers."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal, get_args

from .base import _check, _help

CacheMode = Literal["auto", "memory", "stream"]
CropMode = Literal["center", "random"]


# The default colour jitter of RGB training data: hue +-45 degrees, saturation x0.875-1.125
# (benchmarks/unseen_photos.py and natural_images.py: docs/tokenizer.md, "Unseen photos")
RGB_JITTER = 0.25


@dataclass(frozen=True)
class DataConfig:
    source: str = field(default="digits", metadata=_help(
        "digits | fashion-mnist | mnist | a directory of images or IDX files | a .npy/.npz file",
        flag="data"))
    size: int = field(default=16, metadata=_help("image side in pixels (resized, centre-cropped)"))
    channels: int | None = field(default=None, metadata=_help(
        "1 (grayscale) or 3 (RGB); default: the source's own (1 for digits/IDX, 3 for folders)"))
    holdout: float = field(default=0.1, metadata=_help(
        "fraction held out for evaluation when the source has no test split of its own"))
    eval_source: str | None = field(default=None, metadata=_help(
        "the held-out set: a source as --data (folder, shards, IDX, array) evaluated instead of "
        "a share of --data (a --data folder with train/ and val/ or test/ inside needs none)",
        flag="eval-data"))
    split_seed: int = field(default=0, metadata=_help("seed of the deterministic held-out split"))
    cache: CacheMode = field(default="auto", metadata=_help(
        "memory: decode every image into RAM before step 1 | stream: decode batches as they are "
        "needed, in worker processes (folders, shards) | auto: memory for arrays, IDX files and "
        "small folders, stream for large folders and shards"))
    crop: CropMode = field(default="center", metadata=_help(
        "training crop: center (the shorter side resized to size) | random (a random square "
        "covering 80-100%% of the shorter side); held-out images are always centre-cropped"))
    flip: bool = field(default=False, metadata=_help(
        "flip training images left-right at random (held-out images never)"))
    color_jitter: float | None = field(default=None, metadata=_help(
        "colour jitter of RGB training images: hue turned by up to +-J x 180 degrees and "
        "saturation scaled by 1 +- J/2 at random, luma kept (held-out images never); it widens "
        "the colours the codebook covers, so unseen photos keep theirs (docs/tokenizer.md); "
        f"default: {RGB_JITTER:g} for RGB data, 0 for grey; 0 = off"))
    workers: int = field(default=2, metadata=_help(
        "worker processes decoding streamed images (0: decode in the training process); with "
        "shards, also the readers each rank splits its shards over"))
    max_unreadable: float = field(default=0.05, metadata=_help(
        "stop training (after a checkpoint) when more than this share of the images of a log "
        "window, or of the held-out set, could not be read (files deleted or damaged meanwhile)"))

    # runs saved before colour jitter existed trained without it
    SAVED_WITHOUT: ClassVar[dict[str, Any]] = {"color_jitter": 0.0}

    def __post_init__(self) -> None:
        _check(bool(self.source), "data source is empty")
        _check(self.eval_source is None or bool(self.eval_source), "--eval-data is empty")
        _check(self.size >= 4, f"size must be at least 4 pixels, got {self.size}")
        _check(self.channels in (None, 1, 3), f"channels must be 1 or 3, got {self.channels}")
        _check(0.0 < self.holdout < 1.0, f"holdout must be in (0, 1), got {self.holdout}")
        _check(self.cache in get_args(CacheMode),
               f"cache must be one of {get_args(CacheMode)}, got {self.cache!r}")
        _check(self.crop in get_args(CropMode),
               f"crop must be one of {get_args(CropMode)}, got {self.crop!r}")
        _check(isinstance(self.flip, bool), f"flip must be true or false, got {self.flip!r}")
        _check(self.color_jitter is None or 0.0 <= self.color_jitter <= 1.0,
               f"color_jitter must be in [0, 1], got {self.color_jitter}")
        _check(0 <= self.workers <= 64, f"workers must be in [0, 64], got {self.workers}")
        _check(0.0 <= self.max_unreadable <= 1.0,
               f"max_unreadable must be in [0, 1], got {self.max_unreadable}")

    @property
    def augmented(self) -> bool:
        return self.crop == "random" or self.flip or bool(self.color_jitter)

    def resolved(self, channels: int) -> DataConfig:
        """This config for data of ``channels`` channels: the colour jitter decided (the
        default's for RGB, none for grey; a jitter asked of grey data is refused)."""
        if self.color_jitter is None:
            return replace(self, channels=channels,
                           color_jitter=RGB_JITTER if channels == 3 else 0.0)
        _check(not self.color_jitter or channels == 3,
               f"--color-jitter changes colours, and {self.source} has {channels} channel(s): "
               f"drop it, or pass --channels 3")
        return replace(self, channels=channels)
