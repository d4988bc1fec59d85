"""ONNX export of a stage-1 tokenizer: ``encoder.onnx`` (uint8 images -> code ids), ``decoder.onnx``
(code ids -> images), ``preprocessing.json``, and their parity with PyTorch under onnxruntime.

ONNX (Open Neural Network Exchange), opset 17; graphs traced by ``torch.onnx.export``'s TorchScript
exporter, which maps every op of both architectures (attention included) onto plain ONNX ops.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import io
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..config import QuantizerName
from ..data.images import to_float
from ..data.sources import load_splits
from ..distributed import pick_device
from ..errors import CheckpointError, ConfigError, DataError
from ..fileio import write_bytes, write_json
from ..generation.codes import fingerprint
from ..models.autoencoder import VQVAE
from ..models.quantizers.vq import flatten_latents
from ..store import checkpoint as ckpt
from ..store import runs

OPSET = 17
ENCODER_FILE, DECODER_FILE = "encoder.onnx", "decoder.onnx"
PREPROCESSING_FILE = "preprocessing.json"
FORMAT = "vqvae-onnx/1"
EXTRA = "pip install 'vqvae[export]'"
# Parity: onnxruntime's code ids agree with PyTorch's on this fraction of codes at least, and its
# decoded images (from the same ids) are within this max abs difference. An id that differs
# agrees if it is a tie: two codes equally near within float32 rounding (seen: two codes of a
# trained cosine codebook 2.8e-7 apart), which a different summation order may break the other
# way. PyTorch's own quantizer then picks onnxruntime's id too once the latents move by TIE of
# their size in one of TIE_DRAWS random directions.
AGREE, MAX_PIXEL_DIFF = 0.999, 1e-4
TIE, TIE_DRAWS = 1e-5, 16
PARITY_IMAGES, PARITY_BATCH = 64, 16


# --- the graphs --------------------------------------------------------------------------------


class NearestCode(nn.Module):
    """vq/ema lookup for export: latents (B, D, h, w) -> ids (B, h, w) of the nearest code in the
    lookup space (projection and cosine normalisation as trained), the codes frozen as constants.
    One (N, K) distance matrix, not the chunked loop of ``nearest_code``: the same argmin."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.space = quantizer.space
        codebook = quantizer.codebook_vectors().detach().float().clone()  # (K, d)
        self.register_buffer("codebook", codebook)
        self.register_buffer("codebook_sq", codebook.pow(2).sum(1))  # (K,)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.space.inward(flatten_latents(z).float())  # (B*h*w, d)
        distance = self.codebook_sq - 2.0 * x @ self.codebook.t()  # |e|^2 - 2 x.e, (B*h*w, K)
        return distance.argmin(1).reshape(-1, z.shape[2], z.shape[3])


class QuantizerIndices(nn.Module):
    """The ids of a quantizer whose forward traces as it is (fsq: bound, round, mixed-radix
    digits); the rest of its output is left out of the graph."""

    def __init__(self, quantizer: nn.Module):
        super().__init__()
        self.quantizer = quantizer

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.quantizer(z).indices


# The config's quantizer name -> the module that finds its code ids in an exported encoder. A
# quantizer missing here cannot be exported (a ConfigError says so).
LOOKUPS: dict[QuantizerName, Callable[[nn.Module], nn.Module]] = {
    "vq": NearestCode,
    "ema": NearestCode,
    "fsq": QuantizerIndices,
}


class ImagesToCodes(nn.Module):
    """encoder.onnx: uint8 images (B, C, S, S) -> int64 code ids (B, h, w); ``to_float`` inside."""

    def __init__(self, model: VQVAE):
        super().__init__()
        if model.cfg.quantizer not in LOOKUPS:
            raise ConfigError(f"ONNX export has no code lookup for the {model.cfg.quantizer!r} "
                              f"quantizer (it exports {', '.join(LOOKUPS)})")
        self.encoder = model.encoder
        self.lookup = LOOKUPS[model.cfg.quantizer](model.quantizer)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0  # data.images.to_float: [0, 255] -> [-1, 1]
        return self.lookup(self.encoder(x))


class CodesToImages(nn.Module):
    """decoder.onnx: int64 code ids (B, h, w) -> float images (B, C, S, S) near [-1, 1]."""

    def __init__(self, model: VQVAE):
        super().__init__()
        self.model = model

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.model.decode_indices(codes)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _onnx_modules() -> tuple[Any, Any]:
    """The ``onnx`` and ``onnxruntime`` packages (the ``export`` extra), imported when needed."""
    try:
        return importlib.import_module("onnx"), importlib.import_module("onnxruntime")
    except ImportError:
        raise ConfigError(f"ONNX export needs onnx and onnxruntime: {EXTRA}") from None


def _graph(module: nn.Module, example: torch.Tensor, names: tuple[str, str], what: str) -> bytes:
    """``module`` traced on ``example`` as ONNX bytes, batch dimension dynamic."""
    onnx, _ = _onnx_modules()
    buffer = io.BytesIO()
    axes = {names[0]: {0: "batch"}, names[1]: {0: "batch"}}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(module.eval(), (example,), buffer, input_names=[names[0]],
                              output_names=[names[1]], dynamic_axes=axes, opset_version=OPSET,
                              dynamo=False)
        onnx.checker.check_model(onnx.load_from_string(buffer.getvalue()))
    except Exception as e:  # the exporter's and checker's own errors, of many types: one line
        raise ConfigError(f"cannot export the {what} to ONNX: {_first_line(e)}") from None
    return buffer.getvalue()


# --- parity ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Parity:
    """onnxruntime (CPU) against PyTorch on the same images: code ids and decoded images."""

    images: int
    codes: int  # code ids compared (images x h x w)
    same_codes: int  # of them, equal in both
    ties: int  # of the others, ties (see TIE)
    max_pixel_diff: float  # decoded from PyTorch's ids by both decoders
    source: str  # where the images came from

    @property
    def agreeing(self) -> float:
        """The fraction of codes whose ids are identical or tie."""
        return (self.same_codes + self.ties) / max(self.codes, 1)

    @property
    def ok(self) -> bool:
        return self.agreeing >= AGREE and self.max_pixel_diff <= MAX_PIXEL_DIFF

    def summary(self) -> str:
        others = self.codes - self.same_codes
        ties = f", {self.ties} of the other {others} ties" if others else ""
        return (f"parity on {self.images} {self.source}: {self.same_codes}/{self.codes} code ids "
                f"identical{ties} ({100 * self.agreeing:.2f}% agree, need >= {100 * AGREE:.1f}%), "
                f"decoded max abs diff {self.max_pixel_diff:.2e} (need <= {MAX_PIXEL_DIFF:.0e})")

    def as_dict(self) -> dict[str, Any]:
        return {"images": self.images, "source": self.source, "codes": self.codes,
                "same_codes": self.same_codes, "ties": self.ties,
                "max_pixel_diff": self.max_pixel_diff,
                "thresholds": {"agree": AGREE, "tie": TIE, "max_pixel_diff": MAX_PIXEL_DIFF}}


class _Graph:
    """One ONNX file under onnxruntime on the CPU; its errors are one-line CheckpointErrors."""

    def __init__(self, path: Path):
        _, ort = _onnx_modules()
        self.path = path
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime's own error types: a missing or broken file
            raise CheckpointError(f"onnxruntime cannot load {path}: {_first_line(e)}") from None

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        try:
            return torch.from_numpy(self.session.run(None, {name: x.numpy()})[0])
        except Exception as e:  # e.g. the graph of a model of another image size
            raise CheckpointError(f"onnxruntime cannot run {self.path} on {name} of shape "
                                  f"{tuple(x.shape)}: {_first_line(e)}") from None


@torch.no_grad()
def parity(model: VQVAE, folder: Path, images: torch.Tensor, source: str = "images",
           device: str | torch.device = "cpu") -> Parity:
    """Run ``folder``'s encoder.onnx and decoder.onnx under onnxruntime (CPU) and ``model`` under
    PyTorch (on ``device``) on uint8 ``images`` (N, C, S, S); compare ids and decoded images."""
    encoder, decoder = _Graph(folder / ENCODER_FILE), _Graph(folder / DECODER_FILE)
    device = pick_device(device)
    model = model.eval().to(device)
    same = ties = total = 0
    worst = 0.0
    for start in range(0, images.shape[0], PARITY_BATCH):
        batch = images[start:start + PARITY_BATCH]
        z = model.encoder(to_float(batch.to(device)))  # (b, D, h, w)
        ids = model.quantizer(z).indices.cpu()  # (b, h, w)
        onnx_ids = encoder("images", batch)
        if onnx_ids.shape != ids.shape:
            raise CheckpointError(f"{folder / ENCODER_FILE} gives code grids of shape "
                                  f"{tuple(onnx_ids.shape)}, the model {tuple(ids.shape)}")
        same += int((onnx_ids == ids).sum())
        ties += _ties(model, z, ids, onnx_ids)
        total += ids.numel()
        decoded = model.decode_indices(ids.to(device)).float().cpu()
        onnx_decoded = decoder("codes", ids)
        worst = max(worst, float((onnx_decoded - decoded).abs().max()))
    return Parity(images.shape[0], total, same, ties, worst, source)


def _ties(model: VQVAE, z: torch.Tensor, ids: torch.Tensor, onnx_ids: torch.Tensor) -> int:
    """How many of the ids where ``onnx_ids`` differs from PyTorch's ``ids`` (b, h, w) are ties:
    PyTorch's quantizer gives onnxruntime's id for the latents ``z`` (b, D, h, w) moved by TIE of
    each latent vector's largest entry in one of TIE_DRAWS seeded random directions."""
    differ = (onnx_ids != ids).to(z.device)
    if not differ.any():
        return 0
    target, tie = onnx_ids.to(z.device), torch.zeros_like(differ)
    generator = torch.Generator(z.device).manual_seed(0)
    scale = TIE * z.abs().amax(dim=1, keepdim=True)  # (b, 1, h, w)
    for _ in range(TIE_DRAWS):
        moved = z + torch.randn(z.shape, generator=generator, device=z.device) * scale
        tie |= model.quantizer(moved).indices == target
    return int((tie & differ).sum())


def synthetic_images(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """``n`` seeded uint8 images (n, C, S, S): a flat colour, a horizontal ramp of random slope
    and pixel noise each, so that their latents spread over many codes."""
    g = torch.Generator().manual_seed(seed)
    level = torch.randint(0, 256, (n, channels, 1, 1), generator=g)
    slope = torch.randint(-120, 121, (n, channels, 1, 1), generator=g)
    noise = torch.randint(-30, 31, (n, channels, size, size), generator=g)
    ramp = torch.linspace(-1.0, 1.0, size).view(1, 1, 1, size) * slope
    return (level + ramp + noise).round().clamp(0, 255).to(torch.uint8)


def parity_images(checkpoint: Path, model: VQVAE, n: int = PARITY_IMAGES) -> tuple[torch.Tensor,
                                                                                  str]:
    """Up to ``n`` uint8 images (n, C, S, S) for the parity check and what they are: the first
    held-out images of the run the checkpoint belongs to, or (a checkpoint outside a run, its
    data not found here) :func:`synthetic_images`."""
    cfg = model.cfg
    try:
        data = runs.read_run_config(checkpoint, ckpt.VQVAE_KIND).data
        if data.size == cfg.image_size:
            test = load_splits(replace(data, workers=0)).test
            take = torch.arange(min(n, len(test)))
            if len(take):
                return test.take(take), f"held-out images of {data.source}"
    except (CheckpointError, DataError):
        pass
    return (synthetic_images(n, cfg.in_channels, cfg.image_size),
            "synthetic images (no held-out data found for this checkpoint)")


def check_onnx(run: str | Path, folder: str | Path, n: int = PARITY_IMAGES,
               device: str = "cpu") -> Parity:
    """Parity of an ONNX export in ``folder`` with the stage-1 model of ``run`` (its run or
    checkpoint folder) on ``n`` of its held-out images."""
    checkpoint = ckpt.resolve(run)
    model = ckpt.load_autoencoder(checkpoint)
    images, source = parity_images(checkpoint, model, n)
    return parity(model, Path(folder), images, source, device)


# --- the writer --------------------------------------------------------------------------------


def _version() -> str:
    try:
        return importlib.metadata.version("vqvae")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def preprocessing(model: VQVAE, checkpoint: Path) -> dict[str, Any]:
    """What ``preprocessing.json`` states: the graphs' inputs and outputs, exactly."""
    cfg = model.cfg
    s, c, h = cfg.image_size, cfg.in_channels, cfg.latent_size
    colours = "RGB" if c == 3 else "grayscale"
    overshoot = ("tanh output, within [-1, 1]" if cfg.architecture == "resnet"
                 else "no tanh: may overshoot [-1, 1] slightly, clip before converting")
    return {
        "format": FORMAT, "vqvae_version": _version(), "opset": OPSET,
        "checkpoint": {"path": str(checkpoint.resolve()), "sha256": fingerprint(checkpoint)},
        "model": {"architecture": cfg.architecture, "quantizer": cfg.quantizer,
                  "image_size": s, "channels": c, "grid": [h, h],
                  "codebook_size": cfg.codebook_size},
        "encoder": {
            "file": ENCODER_FILE,
            "input": {"name": "images", "layout": "(B, C, H, W)", "shape": ["batch", c, s, s],
                      "dtype": "uint8", "range": [0, 255], "channels": colours},
            "resize": f"shorter side to {s} px (bilinear, antialiased), centre crop to {s}x{s}",
            "normalisation": "inside the graph: x / 127.5 - 1 (to [-1, 1]); give raw pixels",
            "output": {"name": "codes", "shape": ["batch", h, h], "dtype": "int64",
                       "range": [0, cfg.codebook_size - 1]},
        },
        "decoder": {
            "file": DECODER_FILE,
            "input": {"name": "codes", "shape": ["batch", h, h], "dtype": "int64",
                      "range": [0, cfg.codebook_size - 1]},
            "output": {"name": "images", "layout": "(B, C, H, W)", "shape": ["batch", c, s, s],
                       "dtype": "float32", "range": [-1.0, 1.0], "note": overshoot,
                       "to_uint8": "round((clip(x, -1, 1) + 1) * 127.5), half to even"},
        },
    }


def write_onnx(checkpoint: Path, folder: Path, device: str | torch.device = "cpu",
               report: Callable[[str], None] = print) -> None:
    """Write encoder.onnx, decoder.onnx and preprocessing.json of the stage-1 checkpoint into
    ``folder``, after checking their parity with PyTorch (a failed check writes no
    preprocessing.json and raises a :class:`ConfigError`)."""
    _onnx_modules()
    pick_device(device)  # a bad --device is refused before any work
    model = ckpt.load_autoencoder(checkpoint)  # CPU, eval mode: the traced copy
    cfg = model.cfg
    what = f"{cfg.architecture} {cfg.quantizer}"
    images = torch.zeros(2, cfg.in_channels, cfg.image_size, cfg.image_size, dtype=torch.uint8)
    codes = torch.zeros(2, cfg.latent_size, cfg.latent_size, dtype=torch.long)
    write_bytes(folder / ENCODER_FILE, _graph(ImagesToCodes(model), images, ("images", "codes"),
                                              f"{what} encoder"))
    write_bytes(folder / DECODER_FILE, _graph(CodesToImages(model), codes, ("codes", "images"),
                                              f"{what} decoder"))
    sample, source = parity_images(checkpoint, model)
    result = parity(model, folder, sample, source, device)
    report(result.summary())
    if not result.ok:
        raise ConfigError(f"the ONNX export of {checkpoint} does not match PyTorch: "
                          f"{result.summary()}")
    write_json(folder / PREPROCESSING_FILE,
               {**preprocessing(model, checkpoint), "parity": result.as_dict()})

