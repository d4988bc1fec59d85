"""Training augmentation for natural images: random square crops, left-right flips and colour
jitter (hue and saturation).

Every random choice comes from a generator seeded by (seed, step, position in the batch), so a
batch is the same however many worker processes decoded it and whether the run was resumed. The
crop follows the tokenizer recipes (LlamaGen, MaskGIT): a square covering 80-100% of the shorter
side, resized to the training size; held-out images are never augmented. Colour jitter widens
the colours a codebook sees beyond its training photos' own (benchmarks/unseen_photos.py): it
rotates the chroma plane of YIQ by a random hue angle and scales it by a random saturation
factor, leaving luma exactly as it was (a grey pixel stays grey).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CROP_SCALE = (0.8, 1.0)  # side of a random crop, as a fraction of the image's shorter side
_GOLDEN = 0x9E3779B97F4A7C15  # spreads nearby (seed, step, position) over the seed space


def sample_generator(seed: int, step: int, position: int) -> torch.Generator:
    """The generator of one training sample's random choices."""
    key = (seed * _GOLDEN + step * 0x100000001B3 + position * 0x5BD1E995) % (1 << 63)
    return torch.Generator().manual_seed(key)


def resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (C, h, w) -> uint8 (C, size, size), antialiased bilinear."""
    if image.shape[1] == image.shape[2] == size:
        return image
    out = F.interpolate(image.unsqueeze(0).float(), size=(size, size), mode="bilinear",
                        antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8)


def crop_box(height: int, width: int, gen: torch.Generator) -> tuple[int, int, int]:
    """(top, left, side) of a random square covering 80-100% of the shorter side."""
    lo, hi = CROP_SCALE
    fraction = lo + (hi - lo) * float(torch.rand((), generator=gen))
    side = max(1, round(min(height, width) * fraction))
    top = int(torch.randint(0, height - side + 1, (), generator=gen))
    left = int(torch.randint(0, width - side + 1, (), generator=gen))
    return top, left, side


def random_crop(image: torch.Tensor, size: int, gen: torch.Generator) -> torch.Tensor:
    """uint8 (C, H, W) -> uint8 (C, size, size): a :func:`crop_box` square resized to ``size``."""
    top, left, side = crop_box(image.shape[1], image.shape[2], gen)
    return resize(image[:, top:top + side, left:left + side], size)


def maybe_flip(image: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(C, H, W) flipped left-right with probability 1/2."""
    return image.flip(-1) if bool(torch.rand((), generator=gen) < 0.5) else image


# RGB -> YIQ (NTSC): Y is luma, (I, Q) the chroma plane a hue rotation turns
_YIQ = torch.tensor([[0.299, 0.587, 0.114],
                     [0.595716, -0.274453, -0.321263],
                     [0.211456, -0.522591, 0.311135]], dtype=torch.float64)


def jitter_matrix(strength: float, gen: torch.Generator) -> torch.Tensor:
    """The (3, 3) RGB matrix of one draw: hue turned by up to +-``strength`` x 180 degrees,
    saturation scaled by a factor in [1 - ``strength``/2, 1 + ``strength``/2]."""
    angle = math.pi * strength * (2 * float(torch.rand((), generator=gen)) - 1)
    scale = 1 + strength * (float(torch.rand((), generator=gen)) - 0.5)
    c, s = math.cos(angle) * scale, math.sin(angle) * scale
    chroma = torch.tensor([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]], dtype=torch.float64)
    return (torch.linalg.inv(_YIQ) @ chroma @ _YIQ).float()


def apply_jitter(images: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W), each image times its (3, 3) matrix of ``matrices`` (B, 3, 3),
    rounded and clipped to the RGB cube, on the images' device."""
    out = torch.einsum("bij,bjhw->bihw", matrices.to(images.device), images.float())
    return out.round().clamp(0, 255).to(torch.uint8)


def color_jitter(image: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """uint8 (3, H, W) with :func:`jitter_matrix`'s hue and saturation change; a one-channel
    image has no colour and is returned as it is."""
    if image.shape[0] != 3:
        return image
    return apply_jitter(image[None], jitter_matrix(strength, gen)[None])[0]


def augment_batch(images: torch.Tensor, size: int, crop: str, flip: bool, seed: int,
                  step: int, jitter: float = 0.0) -> torch.Tensor:
    """Augment a uint8 batch (B, C, S, S) of in-memory images the way streamed images are
    (crops of an in-memory image come from its stored resolution); a batch that is only
    colour-jittered stays on its device and is jittered in one product."""
    random, colour = crop == "random", bool(jitter) and images.shape[1] == 3
    if not random and not flip and not colour:
        return images
    out = images if not random and not flip else torch.empty(
        images.shape[0], images.shape[1], size, size, dtype=torch.uint8)
    matrices = []
    for i, image in enumerate(images):
        gen = sample_generator(seed, step, i)
        if random or flip:
            image = random_crop(image, size, gen) if random else image
            out[i] = maybe_flip(image, gen) if flip else image
        if colour:
            matrices.append(jitter_matrix(jitter, gen))
    return apply_jitter(out, torch.stack(matrices)) if colour else out
