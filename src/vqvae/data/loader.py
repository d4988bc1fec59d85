"""Training batches by step, from memory, an image folder or tar shards.

The batch of step t on rank r is a function of (seed, t, r) and, for shards, of the number of
readers (``DataConfig.workers``, saved with the run): a resumed run continues with exactly the
batches an uninterrupted one sees, however many processes decode them. In-memory sets and
folders draw a seeded permutation per epoch (:class:`~vqvae.data.sources.BatchStream`), a
folder's files decoded by ``workers`` processes; shards are read shard by shard
(:func:`~vqvae.data.shards.epoch_plan`), each rank and reader its own. An unreadable file is
replaced by another image of its batch and counted (:attr:`Batch.skipped`), never fatal.
"""

from __future__ import annotations

from itertools import count
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from ..config import DataConfig
from ..errors import DataError
from .augment import augment_batch, color_jitter, sample_generator
from .files import FileSet, TarFiles
from .images import Batch, ImageSet
from .shards import epoch_plan, shard_groups
from .sources import BatchStream

# Training data up to this size lives on a GPU for the whole run (an in-memory image set that is
# never cropped or flipped; a prior's code grids): a step indexes its batch there instead of
# gathering it on the host and copying it over.
RESIDENT_BYTES = 1 << 30


def train_batches(train: ImageSet | FileSet, data: DataConfig, batch_size: int, seed: int,
                  start: int, rank: int = 0, world_size: int = 1,
                  pin_memory: bool = False, device: torch.device | None = None
                  ) -> Iterator[Batch]:
    """Endless uint8 training batches for steps ``start``, ``start + 1``, ...; an in-memory set
    that fits :data:`RESIDENT_BYTES` and is neither cropped nor flipped gives them on ``device``
    (CUDA; a colour jitter is applied there)."""
    if isinstance(train, ImageSet):
        return _memory_batches(train, data, batch_size, seed, start, rank, world_size, device)
    workers = data.workers
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0,
                  prefetch_factor=4 if workers else None)
    if isinstance(train.files, TarFiles):
        stream = ShardStream(train, data, batch_size, seed, start, rank, world_size)
        return iter(DataLoader(stream, batch_size=None, **common))
    steps = _StepSampler(BatchStream(len(train), batch_size, seed, rank, world_size), start)
    return iter(DataLoader(_Augmented(train, data, seed), batch_sampler=steps,
                           collate_fn=fill_unreadable, **common))


def _memory_batches(train: ImageSet, data: DataConfig, batch_size: int, seed: int, start: int,
                    rank: int, world_size: int, device: torch.device | None = None
                    ) -> Iterator[Batch]:
    stream = BatchStream(len(train), batch_size, seed, rank, world_size)
    images_at = train.images
    plain = data.crop != "random" and not data.flip  # colour jitter runs on the device
    if (device is not None and device.type == "cuda" and plain
            and train.images.numel() <= RESIDENT_BYTES):
        images_at = train.images.to(device)  # uint8: one byte per pixel
    for step in count(start):
        index = stream.indices(step)
        images = augment_batch(images_at[index.to(images_at.device)], data.size, data.crop,
                               data.flip, seed, step, data.color_jitter or 0.0)
        yield Batch(images, None if train.labels is None else train.labels[index])


Item = tuple[int, int, int]  # (step, position in the batch, image index)


class _StepSampler:
    """The batches of steps ``start``, ``start + 1``, ... as lists of :data:`Item`."""

    def __init__(self, stream: BatchStream, start: int):
        self.stream, self.start = stream, start

    def __iter__(self) -> Iterator[list[Item]]:
        for step in count(self.start):
            yield [(step, i, int(j)) for i, j in enumerate(self.stream.indices(step))]


class _Augmented(Dataset):
    """One training image of a file set, augmented with its own (seed, step, position) draw."""

    def __init__(self, files: FileSet, data: DataConfig, seed: int):
        self.files, self.data, self.seed = files, data, seed

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, item: Item) -> torch.Tensor | str:
        step, position, index = item
        return decode_train(self.files, index, self.data, self.seed, step, position)


def decode_train(files: FileSet, index: int, data: DataConfig, seed: int, step: int,
                 position: int) -> torch.Tensor | str:
    gen = sample_generator(seed, step, position) if data.augmented else None
    image = files.decode(index, gen, data.crop, data.flip)
    if data.color_jitter and not isinstance(image, str):
        image = color_jitter(image, data.color_jitter, gen)
    return image


def fill_unreadable(images: Sequence[torch.Tensor | str]) -> Batch:
    """Stack a batch, unreadable images replaced by readable ones of the same batch (the batch
    keeps its size and every later batch its images); all unreadable is an error."""
    readable = [image for image in images if not isinstance(image, str)]
    if not readable:
        raise DataError(f"none of the {len(images)} images of a batch could be read "
                        f"(e.g. {images[0]})")
    filled = [image if not isinstance(image, str) else readable[i % len(readable)]
              for i, image in enumerate(images)]
    return Batch(torch.stack(filled), None, len(images) - len(readable))


class ShardStream(IterableDataset):
    """Batches read shard by shard. Each rank has ``readers`` = max(1, workers) readers, reader
    g = rank * readers + r of all of them reads its :func:`~vqvae.data.shards.epoch_plan` epoch
    after epoch; step t's batch is batch t // readers of reader t % readers. Worker w of a loader
    started at step s is the reader of steps s + w, s + w + workers, ...: it skips the samples
    of its earlier batches (counting them, without reading them) and goes on from there."""

    def __init__(self, train: FileSet, data: DataConfig, batch_size: int, seed: int, start: int,
                 rank: int, world_size: int):
        assert isinstance(train.files, TarFiles)
        self.train, self.data, self.batch_size, self.seed = train, data, batch_size, seed
        self.start, self.rank = start, rank
        self.readers = max(1, data.workers)
        self.total = self.readers * world_size
        self.groups = shard_groups(train.files.shard_ids)

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        step = self.start + worker  # with no workers, one reader serves every step
        reader = step % self.readers
        samples = self._samples(self.rank * self.readers + reader, (step // self.readers)
                                * self.batch_size)
        while True:
            rows = [next(samples) for _ in range(self.batch_size)]
            images = [decode_train(self.train, row, self.data, self.seed, step, i)
                      for i, row in enumerate(rows)]
            yield fill_unreadable(images)
            step += self.readers

    def _samples(self, reader: int, skip: int) -> Iterator[int]:
        """Reader ``reader``'s sample indices, epoch after epoch, the first ``skip`` left out."""
        for epoch in count():
            plan = epoch_plan(self.groups, self.seed, epoch, reader, self.total)
            if sum(len(rows) for rows in plan) == 0:
                raise DataError(f"reader {reader} of {self.total} has no training images: "
                                f"fewer images than readers (lower --workers)")
            for rows in plan:
                if skip >= len(rows):
                    skip -= len(rows)
                    continue
                yield from rows[skip:].tolist()
                skip = 0
