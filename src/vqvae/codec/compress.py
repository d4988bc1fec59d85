"""Images <-> compressed files: the stage-1 model turns images into code grids, the prior's
probabilities code the grids (:mod:`.coder`), the container wraps them (:mod:`.container`).

van den Oord et al., "Neural Discrete Representation Learning" (2017), on a VQ-VAE with a prior as
a lossy codec. ``vqvae compress`` and ``vqvae decompress`` are :func:`compress_files` and
:func:`decompress_file`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..config import SampleConfig
from ..data.files import IMAGE_EXTENSIONS
from ..data.sources import read_image
from ..errors import DataError
from ..fileio import check_writable, write_bytes
from ..generation.grids import save_png, tile
from ..generation.pipeline import Pipeline
from ..models.maskgit import MaskGITPrior
from .coder import check_labels, checksum, cpu_threads, decode_grids, encode_grids
from .container import Container, Header, pack, unpack

ENCODE_BATCH = 256  # images through the stage-1 encoder at once


def fingerprint(module: nn.Module) -> bytes:
    """The first 8 bytes of a sha256 over a module's weights (names, dtypes, shapes, bytes):
    which exact model coded a file."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().contiguous().cpu()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.digest()[:8]


def load_pipeline(pipeline_or_run: Pipeline | str | Path,
                  device: str | torch.device = "auto") -> Pipeline:
    """The pipeline given, or that of a prior run folder."""
    pipe = (pipeline_or_run if isinstance(pipeline_or_run, Pipeline)
            else Pipeline.from_run(pipeline_or_run, device))
    return require_grid(pipe)


def require_grid(pipe: Pipeline) -> Pipeline:
    """The codec codes one grid of codes per image, a code at a time (raster) or a schedule's
    group at a time (maskgit); a var prior's token maps of several scales are not coded yet."""
    if pipe.prior.cfg.variant == "var":
        raise DataError(f"{pipe.name}: the codec codes grid priors (raster or maskgit); a var "
                        f"prior's multiscale token maps are not supported by it yet")
    return pipe


def coding_steps(pipe: Pipeline, steps: int | None = None) -> int:
    """Parallel iterations (a maskgit prior's; 0 for an autoregressive one)."""
    if not isinstance(pipe.prior, MaskGITPrior):
        return 0
    steps = SampleConfig().steps if steps is None else steps
    if steps < 1:
        raise DataError(f"steps must be >= 1, got {steps}")
    return steps


def compress_codes(pipeline: Pipeline, grids: torch.Tensor, labels: torch.Tensor | None = None,
                   names: Sequence[str] | None = None, batch_size: int = 64,
                   steps: int | None = None, prior_path: str = "",
                   progress: bool = False, threads: int = 1) -> bytes:
    """Code grids (N, h, w) of the pipeline's stage-1 model -> the bytes of a compressed file.
    ``labels`` (N,) class ids of a class-conditional prior are coded too (uniformly: log2 C bits
    each); without them the grids are coded with the null class. ``batch_size`` grids share a
    stream (and a forward pass); ``steps``: a maskgit prior's parallel iterations (default: the
    sampler's); ``threads``: intra-op threads on a CPU (recorded: decoding uses as many);
    ``names`` are stored for :func:`decompress_file`; ``prior_path`` too."""
    require_grid(pipeline)
    if batch_size < 1:
        raise DataError(f"batch size must be >= 1, got {batch_size}")
    if names is not None and (len(names) != grids.shape[0] or any("\n" in n for n in names)):
        raise DataError(f"{len(names)} names for {grids.shape[0]} images (one line each)")
    labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    check_labels(labels, grids.shape[0], pipeline.prior.cfg.num_classes)
    steps = coding_steps(pipeline, steps)
    coded = encode_grids(pipeline.prior, grids, labels, batch_size, steps, progress,
                         threads=threads)
    cfg = pipeline.stage1.cfg
    header = Header(fingerprint(pipeline.prior), fingerprint(pipeline.stage1), cfg.image_size,
                    cfg.in_channels, tuple(grids.shape[1:]), pipeline.prior.cfg.codebook_size,
                    grids.shape[0], batch_size, steps, coded.threads, pipeline.device.type,
                    labels is not None, prior_path)
    return pack(Container(header, coded.checksums, coded.streams, list(names or [])))


@torch.inference_mode()
def encode_images(pipeline: Pipeline, images: torch.Tensor) -> torch.Tensor:
    """uint8 images (N, C, H, W) at the stage-1 model's size -> code grids (N, h, w) on the CPU."""
    cfg = pipeline.stage1.cfg
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != want or images.dtype != torch.uint8:
        raise DataError(f"images must be uint8 (N, {want[0]}, {want[1]}, {want[2]}), got "
                        f"{images.dtype} {tuple(images.shape)}")
    return torch.cat([pipeline.encode(images[s:s + ENCODE_BATCH]).cpu()
                      for s in range(0, images.shape[0], ENCODE_BATCH)])


def compress(pipeline_or_run: Pipeline | str | Path, images: torch.Tensor,
             labels: torch.Tensor | None = None, names: Sequence[str] | None = None,
             batch_size: int = 64, steps: int | None = None, device: str | torch.device = "auto",
             progress: bool = False, threads: int = 1) -> bytes:
    """uint8 images (N, C, H, W) at the stage-1 model's size -> a compressed file's bytes
    (:func:`compress_codes` on their codes). ``pipeline_or_run``: a :class:`Pipeline`, or a prior
    run folder (its path is stored, so :func:`decompress_file` finds the models)."""
    pipe = load_pipeline(pipeline_or_run, device)
    path = "" if isinstance(pipeline_or_run, Pipeline) else str(Path(pipeline_or_run).resolve())
    with cpu_threads(threads):  # the stage-1 encoder too: small convolutions, a busy CPU
        grids = encode_images(pipe, images)
    return compress_codes(pipe, grids, labels, names, batch_size, steps, path, progress, threads)


def read_header(data: bytes, name: str = "the file") -> Header:
    """The header of a compressed file (checked as :func:`decompress` checks it)."""
    return unpack(data, name).header


def decompress_codes(pipeline: Pipeline, data: bytes, name: str = "the file",
                     progress: bool = False) -> tuple[Container, torch.Tensor,
                                                      torch.Tensor | None]:
    """A compressed file's bytes -> (its container, code grids (N, h, w), labels or None); a file
    of another model, or whose decoded codes fail their checksums, is a one-line error."""
    require_grid(pipeline)
    box = unpack(data, name)
    h, prior = box.header, pipeline.prior
    for what, recorded, module in (("prior", h.prior, prior), ("stage-1 model", h.stage1,
                                                                 pipeline.stage1)):
        if recorded != fingerprint(module):
            raise DataError(f"{name} was compressed with another {what} (weights fingerprint "
                            f"{recorded.hex()}, this one's {fingerprint(module).hex()})")
    if h.grid != (prior.cfg.height, prior.cfg.width) or h.codebook_size != prior.cfg.codebook_size:
        raise DataError(f"{name}: its {h.grid[0]}x{h.grid[1]} grids of {h.codebook_size} codes "
                        f"do not fit this prior")
    try:
        grids, labels = decode_grids(prior, box.streams, h.images, h.labelled, h.batch_size,
                                     h.steps, progress, h.threads)
    except DataError as e:
        raise DataError(f"{name}: {e}: {_differ(h, pipeline)}") from None
    for i, grid in enumerate(grids):
        if checksum(grid, None if labels is None else int(labels[i])) != box.checksums[i]:
            image = f"image {i}" + (f" ({box.names[i]})" if box.names else "")
            raise DataError(f"{name}: {image} decodes to codes that fail its checksum: "
                            f"{_differ(h, pipeline)}")
    return box, grids, labels


def _differ(header: Header, pipeline: Pipeline) -> str:
    """Why a decoder's probabilities may differ from the encoder's."""
    here = pipeline.device.type
    where = (f"it was coded on {header.device}, this is {here}" if header.device != here
             else "another machine or library version?")
    return f"this machine's probabilities differ from the compressing one's ({where})"


@dataclass(frozen=True)
class Decompressed:
    images: torch.Tensor  # (N, C, H, W) uint8: the stage-1 model's decoding of the codes
    codes: torch.Tensor  # (N, h, w)
    labels: torch.Tensor | None  # (N,) class ids, when they were coded
    names: list[str]  # as stored ([] when none were)


def decompress(pipeline_or_run: Pipeline | str | Path, data: bytes, name: str = "the file",
               device: str | torch.device = "auto", progress: bool = False) -> Decompressed:
    """A compressed file's bytes -> the decoded images, their codes, labels and names."""
    pipe = load_pipeline(pipeline_or_run, device)
    box, grids, labels = decompress_codes(pipe, data, name, progress)
    with cpu_threads(box.header.threads):
        return Decompressed(pipe.decode(grids), grids, labels, box.names)


def image_files(paths: Sequence[str | Path]) -> list[Path]:
    """Image files named, or found directly inside named folders (sorted)."""
    found = []
    for path in map(Path, paths):
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"no such image file or folder: {path}")
    if not found:
        raise DataError("no images to compress")
    return found


@dataclass(frozen=True)
class Compressed:
    path: Path
    images: int
    bytes: int
    header_bytes: int  # all but the coded streams
    pixels: int  # per image

    def summary(self) -> str:
        return (f"{self.images} images -> {self.bytes} bytes ({self.bytes / self.images:.1f} "
                f"per image, {8 * self.bytes / (self.images * self.pixels):.3f} bits per pixel, "
                f"header {self.header_bytes}): {self.path}")


def compress_files(prior_run: str | Path, image_paths: Sequence[str | Path], out: str | Path,
                   labels: Sequence[int] | None = None, batch_size: int = 64,
                   steps: int | None = None, device: str | torch.device = "auto",
                   progress: bool = True, threads: int = 1) -> Compressed:
    """``vqvae compress``: image files (or folders of them), resized to the model's size, into
    one compressed file ``out`` with their names and the prior run's path; ``labels``: one class
    id for all images or one per image (class-conditional priors)."""
    check_writable(out, "compressed file to write (e.g. images.vqvc)")
    files = image_files(image_paths)
    pipe = Pipeline.from_run(prior_run, device)
    cfg = pipe.stage1.cfg
    images = torch.cat([read_image(f, cfg.image_size, cfg.in_channels) for f in files])
    if labels is not None:
        labels = list(labels) * len(files) if len(labels) == 1 else list(labels)
    with cpu_threads(threads):
        grids = encode_images(pipe, images)
    data = compress_codes(pipe, grids, labels, [f.name for f in files], batch_size, steps,
                          str(Path(prior_run).resolve()), progress, threads)
    path = write_bytes(out, data)
    streams = unpack(data).payload_bytes()
    return Compressed(path, len(files), len(data), len(data) - streams, cfg.image_size ** 2)


def _png_names(names: list[str], n: int) -> list[str]:
    """Stored names -> PNG file names (``shirt.jpg`` -> ``shirt.png``), unique; numbers without."""
    if not names:
        return [f"{i:05d}.png" for i in range(n)]
    out, seen = [], set()
    for i, name in enumerate(names):
        stem = Path(name).stem or f"{i:05d}"
        png = f"{stem}.png" if f"{stem}.png" not in seen else f"{stem}-{i}.png"
        seen.add(png)
        out.append(png)
    return out


def decompress_file(file: str | Path, out_dir: str | Path, prior_run: str | Path | None = None,
                    device: str | torch.device = "auto", progress: bool = True) -> list[Path]:
    """``vqvae decompress``: a compressed file -> one PNG per image in ``out_dir``, named as the
    compressed files were; the models from ``prior_run`` (default: the path the file records).
    Nothing is written unless every image decodes to codes that pass its checksum."""
    file = Path(file)
    try:
        data = file.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {file}: {e.strerror}") from None
    header = read_header(data, str(file))
    run = prior_run or header.prior_path
    if not run:
        raise DataError(f"{file} records no prior run: name it (--prior PRIOR_RUN)")
    if not Path(run).exists():
        raise DataError(f"the prior run {run} that {file} was compressed with is not here: "
                        f"name it (--prior PRIOR_RUN)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file: name a folder for the PNGs")
    result = decompress(run, data, str(file), device, progress)
    return [save_png(tile(image[None], 1, min_tile=1, gap=0), out_dir / png)
            for image, png in zip(result.images, _png_names(result.names, len(result.images)))]
