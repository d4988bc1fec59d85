"""The adversarial part of a sharper tokenizer: a PatchGAN discriminator, its losses, the
adaptive weight and the stabilisers.

PatchGAN: Isola et al., "Image-to-Image Translation with Conditional Adversarial Networks"
(2017), arXiv:1611.07004, as taming-transformers' VQGAN uses it (Esser et al. 2021,
arXiv:2012.09841, which also gives the adaptive weight). Hinge loss: Lim & Ye (2017); LeCAM
regularisation: Tseng et al. (2021), arXiv:2104.03310; DiffAugment: Zhao et al. (2020),
arXiv:2006.10738.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def patchgan_layers(image_size: int, layers: int) -> int:
    """Stride-2 layers that fit an image: each halves it, and the last two 4x4 convolutions
    need at least 4 pixels left (16 px -> 2, 32 px -> 3)."""
    return max(1, min(layers, int(math.log2(image_size)) - 2))


class PatchDiscriminator(nn.Module):
    """Images (B, C, H, W) in [-1, 1] -> real/fake logits per overlapping patch (B, 1, h, w).

    ``layers`` stride-2 4x4 convolutions doubling ``channels`` (at most 8x), a stride-1 one, and
    a 1-channel 4x4 head; GroupNorm (batch-independent, so real and fake batches can be scored
    together and ranks need no synchronised statistics) and LeakyReLU(0.2) between them."""

    def __init__(self, in_channels: int, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, layers + 1):
            out = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(width, out, 4, stride, 1, bias=False), _norm(out),
                     nn.LeakyReLU(0.2)]
            width = out
        mods.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*mods)
        for m in self.modules():  # DCGAN init, as the reference PatchGAN
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


# --- losses --------------------------------------------------------------------------------------


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The discriminator's loss on logits of real and of reconstructed images."""
    if kind == "hinge":
        return 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    return 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean())  # non-saturating


def generator_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """The autoencoder's adversarial loss on the logits of its reconstructions."""
    return -fake.mean() if kind == "hinge" else F.softplus(-fake).mean()


def adaptive_weight(reconstruction_loss: torch.Tensor, adversarial_loss: torch.Tensor,
                    last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """|grad of the reconstruction loss| / |grad of the adversarial loss| at the decoder's last
    layer (Esser et al. 2021, eq. 7), detached: the adversarial term pulls on the decoder as hard
    as the reconstruction does, whatever their scales."""
    rec = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    adv = torch.autograd.grad(adversarial_loss, last_layer, retain_graph=True)[0]
    return (rec.norm() / (adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class LeCam(nn.Module):
    """LeCAM regularisation: the discriminator's logits on real images are pulled towards the
    moving average of its logits on fakes and vice versa, which bounds how far apart they drift
    (the jump of the reconstruction loss when adversarial training starts). The averages are
    buffers, saved and resumed with the discriminator."""

    def __init__(self, decay: float = 0.99):
        super().__init__()
        self.decay = decay
        self.register_buffer("real_mean", torch.zeros(()))
        self.register_buffer("fake_mean", torch.zeros(()))

    @torch.no_grad()
    def update(self, real_mean: torch.Tensor, fake_mean: torch.Tensor) -> None:
        """Fold this step's mean logits (every rank's, so the averages stay identical) in."""
        self.real_mean.lerp_(real_mean.float(), 1 - self.decay)
        self.fake_mean.lerp_(fake_mean.float(), 1 - self.decay)

    def forward(self, real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
        """The penalty on this step's logits, after :meth:`update`."""
        return (F.relu(real - self.fake_mean).pow(2).mean()
                + F.relu(self.real_mean - fake).pow(2).mean())


def diff_augment(images: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
    """DiffAugment's colour, translation (1/8 of the side) and cutout (1/2) on a batch
    (B, C, H, W), differentiable, one draw per image; apply the same call to real and fake."""
    b, _, h, w = images.shape
    dev, dtype = images.device, images.dtype

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(dev, dtype)

    x = images + (rand(b, 1, 1, 1) - 0.5)  # brightness
    mean = x.mean(1, keepdim=True)
    x = (x - mean) * (rand(b, 1, 1, 1) * 2) + mean  # saturation
    mean = x.mean((1, 2, 3), keepdim=True)
    x = (x - mean) * (rand(b, 1, 1, 1) + 0.5) + mean  # contrast
    # translation: shift by up to h/8, w/8 pixels with zero padding
    sh, sw = max(1, h // 8), max(1, w // 8)
    dy = (rand(b) * (2 * sh + 1)).long().to(dev) - sh
    dx = (rand(b) * (2 * sw + 1)).long().to(dev) - sw
    rows = (torch.arange(h, device=dev)[None, :] - dy[:, None])  # (B, H) source rows
    cols = (torch.arange(w, device=dev)[None, :] - dx[:, None])
    valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
    index = rows.clamp(0, h - 1)[:, :, None] * w + cols.clamp(0, w - 1)[:, None, :]  # (B, H, W)
    x = x.flatten(2).gather(2, index.flatten(1)[:, None].expand(-1, x.shape[1], -1))
    x = x.view_as(images) * valid[:, None].to(dtype)
    # cutout: a zeroed square of half the side at a random centre
    ch, cw = max(1, h // 2), max(1, w // 2)
    cy = (rand(b) * (h + 1 - ch % 2)).long().to(dev)
    cx = (rand(b) * (w + 1 - cw % 2)).long().to(dev)
    ys = torch.arange(h, device=dev)[None, :]
    xs = torch.arange(w, device=dev)[None, :]
    cut_y = (ys >= (cy - ch // 2)[:, None]) & (ys < (cy - ch // 2 + ch)[:, None])
    cut_x = (xs >= (cx - cw // 2)[:, None]) & (xs < (cx - cw // 2 + cw)[:, None])
    keep = ~(cut_y[:, :, None] & cut_x[:, None, :])
    return x * keep[:, None].to(dtype)
