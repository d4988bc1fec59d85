"""A perceptual loss: LPIPS over a VGG16 feature network, with user-supplied weights.

Zhang et al., "The Unreasonable Effectiveness of Deep Features as a Perceptual Metric" (2018),
arXiv:1801.03924; VGG16: Simonyan & Zisserman (2014), arXiv:1409.1556.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from pathlib import Path

import safetensors.torch as st
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import PerceptualWeightsError
from .quantizers.vq import full_precision

# VGG16's convolutions as (in, out) channels, with "M" for a 2x2 max-pool, in the order of
# torchvision's ``vgg16().features``; the final max-pool (index 30) is left out, as no tap
# follows it. Submodule i of ``VGG16Features`` is ``features.i`` there, so its state dict loads.
VGG16_LAYOUT: tuple[tuple[int, int] | str, ...] = (
    (3, 64), (64, 64), "M",
    (64, 128), (128, 128), "M",
    (128, 256), (256, 256), (256, 256), "M",
    (256, 512), (512, 512), (512, 512), "M",
    (512, 512), (512, 512), (512, 512),
)
TAPS = (3, 8, 15, 22, 29)  # outputs of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
MIN_SIZE = 16  # four max-pools before relu5_3: 16 px leaves it one pixel
# LPIPS v0.1's scaling of [-1, 1] RGB inputs to the statistics VGG16 was trained on
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10


class VGG16Features(nn.Sequential):
    """VGG16's convolutional trunk up to relu5_3: scaled RGB images (B, 3, H, W) -> the five
    activations LPIPS compares, (B, 64, H, W) ... (B, 512, H/16, W/16)."""

    def __init__(self):
        layers: list[nn.Module] = []
        for spec in VGG16_LAYOUT:
            if spec == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cin, cout = spec
                layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(inplace=True)]
        super().__init__(*layers)
        assert len(self) == TAPS[-1] + 1

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self):
            x = layer(x)
            if i in TAPS:
                taps.append(x)
        return taps


def unit_normalize(f: torch.Tensor) -> torch.Tensor:
    """Scale each feature vector (over dim 1) to unit length. The eps sits inside the root, so
    the gradient is finite everywhere, an all-zero vector included (LPIPS's f / (|f| + eps)
    has a NaN one there, from sqrt's derivative at 0); elsewhere the two agree to float
    precision."""
    return f * torch.rsqrt(f.pow(2).sum(1, keepdim=True) + EPS * EPS)


class LPIPS(nn.Module):
    """LPIPS distance between two batches of images (B, C, H, W) in [-1, 1], C = 1 or 3 ->
    per-image distances (B,), computed in fp32 under autocast too.

    Per tap l of VGG16: unit-normalise the features of both images along channels, square the
    difference, weight the channels with a non-negative 1x1 convolution ``lins[l]`` (no bias),
    average over space; sum over the five taps. Everything is frozen and stays in eval mode,
    but gradients reach the images. Grayscale images are repeated to RGB; images under 16 px on
    a side are bilinearly upsampled by the smallest integer factor that reaches 16 px, so every
    tap is defined. Fresh ``lins`` are ones (the paper's unweighted baseline); trained weights
    come from :func:`load_perceptual`."""

    def __init__(self):
        super().__init__()
        self.features = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in TAP_CHANNELS)
        for lin in self.lins:
            nn.init.ones_(lin.weight)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        """A frozen metric has no training mode: stays in eval when a parent calls train()."""
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise ValueError(f"LPIPS compares images of one shape, got {tuple(x.shape)} and "
                             f"{tuple(y.shape)}")
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS takes (B, 1 or 3, H, W) images, got {tuple(x.shape)}")
        with full_precision(x):
            # Two passes, not one over torch.cat: identical images get bit-identical features,
            # so distance(x, x) is exactly 0.
            fx, fy = self.features(self.prepare(x)), self.features(self.prepare(y))
            total = x.new_zeros(x.shape[0], dtype=torch.float32)
            for lin, a, b in zip(self.lins, fx, fy):
                diff = (unit_normalize(a) - unit_normalize(b)).pow(2)  # (B, C_l, h, w)
                total = total + lin(diff).mean((1, 2, 3))  # (B, 1, h, w) -> (B,)
            return total

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images (B, 1 or 3, H, W) -> VGG16's scaled fp32 RGB input, >= 16 px a side."""
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        factor = math.ceil(MIN_SIZE / min(x.shape[-2:]))
        if factor > 1:
            x = F.interpolate(x, scale_factor=factor, mode="bilinear", align_corners=False)
        return (x - self.shift) / self.scale


# --- weights -------------------------------------------------------------------------------------



def load_perceptual(path: str | Path, device: str | torch.device = "cpu") -> LPIPS:
    """An :class:`LPIPS` with the weights of one safetensors file, frozen, on ``device``.

    The file holds exactly the module's state dict: torchvision's VGG16 keys
    ``features.{i}.weight`` / ``features.{i}.bias`` for the 13 convolutions (i = 0, 2, 5, ...,
    28) and ``lins.{l}.weight`` (1, C_l, 1, 1), non-negative, for LPIPS's ``lin{l}.model.1.weight``
    (l = 0..4). ``scripts/convert_lpips.py`` writes it from the published files. Nothing is
    unpickled; every problem is reported in one line."""
    path = Path(path)
    if not path.is_file():
        raise PerceptualWeightsError(f"perceptual weights {path} not found (write them with "
                                     f"scripts/convert_lpips.py; see docs/perceptual.md)")
    try:
        tensors = st.load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PerceptualWeightsError(f"{path} is not a readable safetensors file: {e}") from None
    model = LPIPS()
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        raise PerceptualWeightsError(f"{path}: {len(missing)} expected tensor(s) missing, "
                                     f"e.g. {missing[0]}")
    if unexpected:
        raise PerceptualWeightsError(f"{path}: {len(unexpected)} unexpected tensor(s), e.g. "
                                     f"{unexpected[0]} (not LPIPS-VGG16 weights?)")
    for key, want in expected.items():
        got = tensors[key]
        if got.shape != want.shape:
            raise PerceptualWeightsError(f"{path}: {key} has shape {tuple(got.shape)}, "
                                         f"expected {tuple(want.shape)}")
        if not got.is_floating_point():
            raise PerceptualWeightsError(f"{path}: {key} is {got.dtype}, expected floats")
        if key.startswith("lins.") and bool((got < 0).any()):
            raise PerceptualWeightsError(f"{path}: {key} has negative weights; LPIPS's are "
                                         f"non-negative")
    _check_contents(path, tensors)
    model.load_state_dict(tensors)
    _check_sources(path)
    return model.to(device)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The sha256 of a state dict's names, dtypes, shapes and values (in name order): what
    ``scripts/convert_lpips.py`` records in the file's metadata, so a changed byte is seen."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# torchvision names its weight files after the first digits of their sha256: vgg16-397923af.pth
VGG_SHA256_PREFIX = "397923af"
# the sha256 of LPIPS v0.1's published lin layers for VGG (``lpips/weights/v0.1/vgg.pth`` of
# richzhang/PerceptualSimilarity, 7,289 bytes, the file the pip package ships)
LIN_SHA256 = "a78928a0af1e5f0fcb1f3b9e8f8c3a2a5a3de244d830ad5c1feddc79b8432868"


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), "pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError):
        return {}


def _check_contents(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """The weights against the checksum the converter recorded in the file (files without one,
    from before it did, are accepted)."""
    recorded = _metadata(path).get("tensors_sha256")
    if recorded is not None and tensors_sha256(tensors) != recorded:
        raise PerceptualWeightsError(f"{path} is corrupt: its weights' sha256 differs from the "
                                     f"one recorded in it when it was converted")


def _check_sources(path: Path) -> None:
    """Warn when a weights file does not say it was converted from torchvision's published VGG16
    and LPIPS's published lin layers (scripts/convert_lpips.py records its source files'
    sha256): names and shapes alone cannot tell trained weights from random ones, and a loss
    over random features trains nothing."""
    meta = _metadata(path)
    vgg, lin = meta.get("vgg_sha256"), meta.get("lin_sha256")
    if vgg is None:
        warnings.warn(f"{path} records no source files (not written by scripts/convert_lpips.py): "
                      f"nothing says its VGG16 weights are torchvision's trained ones")
    elif not vgg.startswith(VGG_SHA256_PREFIX):
        warnings.warn(f"{path} was converted from a VGG16 file that is not torchvision's "
                      f"vgg16-{VGG_SHA256_PREFIX}.pth (sha256 {vgg[:8]}...): the perceptual "
                      f"loss may measure nothing useful")
    if vgg is not None and lin != LIN_SHA256:
        warnings.warn(f"{path} was converted from lin layers that are not LPIPS v0.1's published "
                      f"vgg.pth (sha256 {str(lin)[:8]}..., expected {LIN_SHA256[:8]}...): the "
                      f"perceptual loss weighs its features differently")
