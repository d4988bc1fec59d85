"""Code grids <-> bytes: a range coder (``constriction``'s queue coder) driven by the prior's
conditional probabilities, one stream per batch of grids.

Rissanen & Langdon, "Arithmetic coding" (1979); Bamler, "Understanding entropy coding with
asymmetric numeral systems" (2022) for ``constriction``. A batch's stream holds its class labels
(uniform over the classes) and then its codes in the order :func:`probabilities.walk` reveals them.
"""

from __future__ import annotations

import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import constriction
import numpy as np
import torch
from tqdm import tqdm

from ..errors import DataError
from ..models.maskgit import MaskGITPrior
from ..models.prior import Prior
from .probabilities import walk

# One family for every step: each symbol comes with its own (rows, K) float64 probability table.
# ``perfect=False`` quantizes a table the same way on both sides and quickly.
FAMILY = constriction.stream.model.Categorical(perfect=False)


@dataclass(frozen=True)
class Coded:
    """Grids coded: one byte stream per batch, each grid's checksum and its -log2 p per code."""

    streams: list[bytes]
    checksums: list[int]  # CRC-32 of each grid's codes and label
    bits: torch.Tensor  # (N, h*w) float64: -log2 p of each code as coded (the surprise map)
    threads: int  # the intra-op threads the probabilities were computed with (decode alike)


@contextmanager
def cpu_threads(threads: int) -> Iterator[None]:
    """Compute with ``threads`` intra-op threads: a CPU's float results depend on how a matrix
    product is split between threads (seen: a file coded with 1 thread fails with 2)."""
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads != before:
            torch.set_num_threads(before)


def checksum(codes: torch.Tensor, label: int | None) -> int:
    """CRC-32 of one grid's codes (as int32) and its label (-1 without)."""
    data = codes.reshape(-1).to("cpu", torch.int32).numpy().tobytes()
    return zlib.crc32(np.int32(-1 if label is None else label).tobytes(), zlib.crc32(data))


def check_labels(labels: torch.Tensor | None, n: int, classes: int) -> None:
    """Labels go with a class-conditional prior only: (n,) ids in [0, classes)."""
    if labels is None:
        return
    if not classes:
        raise DataError("class labels given to an unconditional prior")
    if tuple(labels.shape) != (n,):
        raise DataError(f"{tuple(labels.shape)} labels for {n} grids")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise DataError(f"class labels outside [0, {classes - 1}]")


def _uniform(classes: int) -> constriction.stream.model.Categorical:
    return constriction.stream.model.Categorical(np.full(classes, 1.0 / classes), perfect=False)


def _chunks(n: int, batch_size: int) -> list[tuple[int, int]]:
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def encode_grids(prior: Prior | MaskGITPrior, grids: torch.Tensor,
                 labels: torch.Tensor | None = None, batch_size: int = 64, steps: int = 12,
                 progress: bool = False, desc: str = "compress", threads: int = 1) -> Coded:
    """Code grids (N, h, w) (and their (N,) class labels, for a class-conditional prior) with the
    prior's probabilities, ``batch_size`` grids per stream and ``threads`` intra-op threads on a
    CPU (1: the fastest for small priors on a busy machine, and the same on any machine); the
    decoder repeats both."""
    n = grids.shape[0]
    flat = grids.reshape(n, -1).long()
    if flat.shape[1] != prior.cfg.seq_len:
        raise DataError(f"grids of {tuple(grids.shape[1:])} codes, the prior models "
                        f"{prior.cfg.height}x{prior.cfg.width}")
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= prior.cfg.codebook_size):
        raise DataError(f"codes outside [0, {prior.cfg.codebook_size - 1}]")
    check_labels(labels, n, prior.cfg.num_classes)
    device = prior.head.weight.device
    streams, bits = [], torch.zeros(flat.shape, dtype=torch.float64)
    if threads < 1:
        raise DataError(f"threads must be >= 1, got {threads}")
    with tqdm(total=n, desc=desc, unit="img", disable=not progress,
              dynamic_ncols=True) as bar, cpu_threads(threads):
        for s, e in _chunks(n, batch_size):
            encoder = constriction.stream.queue.RangeEncoder()
            rows = None if labels is None else labels[s:e].to(device)
            if rows is not None:
                encoder.encode(rows.cpu().numpy().astype(np.int32), _uniform(prior.cfg.num_classes))
            truth = flat[s:e].to(device)

            def reveal(positions: torch.Tensor, probs: torch.Tensor,
                       truth: torch.Tensor = truth, s: int = s) -> torch.Tensor:
                codes = truth.gather(1, positions)  # (B, P)
                table = probs.reshape(-1, probs.shape[-1]).cpu().numpy()
                encoder.encode(codes.reshape(-1).cpu().numpy().astype(np.int32), FAMILY, table)
                p = probs.gather(2, codes[..., None])[..., 0].cpu()
                bits[s:s + codes.shape[0]].scatter_(1, positions.cpu(), -torch.log2(p))
                return codes

            walk(prior, e - s, rows, reveal, steps)
            streams.append(encoder.get_compressed().tobytes())
            bar.update(e - s)
    checks = [checksum(flat[i], None if labels is None else int(labels[i])) for i in range(n)]
    return Coded(streams, checks, bits, threads)


def decode_grids(prior: Prior | MaskGITPrior, streams: list[bytes], n: int, labelled: bool,
                 batch_size: int = 64, steps: int = 12, progress: bool = False,
                 threads: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`encode_grids` undone: ``n`` grids (n, h, w) on the CPU and their labels (or None),
    decoded with the batch size, steps and threads they were coded with."""
    chunks = _chunks(n, batch_size)
    if len(chunks) != len(streams):
        raise DataError(f"{len(streams)} streams for {n} images in batches of {batch_size}")
    device = prior.head.weight.device
    grids, labels = [], []
    with tqdm(total=n, desc="decompress", unit="img", disable=not progress,
              dynamic_ncols=True) as bar, cpu_threads(max(threads, 1)):
        for (s, e), stream in zip(chunks, streams):
            decoder = constriction.stream.queue.RangeDecoder(np.frombuffer(stream, np.uint32))

            def reveal(positions: torch.Tensor, probs: torch.Tensor,
                       decoder: constriction.stream.queue.RangeDecoder = decoder
                       ) -> torch.Tensor:
                table = probs.reshape(-1, probs.shape[-1]).cpu().numpy()
                codes = decoder.decode(FAMILY, table)
                return torch.as_tensor(codes, dtype=torch.long).view(positions.shape)

            try:  # constriction asserts on a stream that these probabilities cannot decode
                rows = None
                if labelled:
                    rows = torch.as_tensor(decoder.decode(_uniform(prior.cfg.num_classes), e - s),
                                           dtype=torch.long, device=device)
                    labels.append(rows.cpu())
                grids.append(walk(prior, e - s, rows, reveal, steps).cpu())
            except (AssertionError, ValueError, RuntimeError) as error:
                raise DataError(f"stream {len(grids)} does not decode with these probabilities "
                                f"({error})") from None
            bar.update(e - s)
    h, w = prior.cfg.height, prior.cfg.width
    out = torch.cat(grids).view(n, h, w) if grids else torch.empty(0, h, w, dtype=torch.long)
    return out, torch.cat(labels) if labelled and labels else None
