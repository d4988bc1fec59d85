"""The sharper half of a stage-1 step: perceptual and adversarial terms for the autoencoder,
and the discriminator's own step (VQGAN, Esser et al. 2021, arXiv:2012.09841).

Before ``gan_start`` (or the ``sharpen`` phase) only the reconstruction (and perceptual) loss
trains; from it on, the autoencoder also minimises its weight x adaptive weight x the generator
loss of a PatchGAN that trains beside it with its own Adam (betas 0.5, 0.9, as VQGAN). The
discriminator's weights, LeCAM averages and optimizer are saved in every checkpoint and restored
on resume.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from ..config import TrainConfig
from ..distributed import Runtime, all_reduce_sum, data_parallel
from ..models.discriminator import (LeCam, PatchDiscriminator, adaptive_weight, diff_augment,
                                    discriminator_loss, generator_loss, patchgan_layers)
from ..precision import autocast
from ..store.checkpoint import Companions

ADVERSARY = "adversary"  # file name of its state in a checkpoint folder
DIFFAUG_MIN_SIZE = 32  # at this size and below DiffAugment was measured to stall the discriminator


class Adversary(nn.Module):
    """The discriminator and its LeCAM averages, saved together."""

    def __init__(self, in_channels: int, image_size: int, channels: int, layers: int):
        super().__init__()
        self.disc = PatchDiscriminator(in_channels, channels, patchgan_layers(image_size, layers))
        self.lecam = LeCam()


class Sharpener:
    """Perceptual and adversarial terms of one stage-1 step, for a :class:`TrainConfig` that
    asks for them (``perceptual_weight``, ``gan_weight`` or ``sharpen``); the discriminator
    trains at the steps ``started`` says (default: from ``gan_start``)."""

    def __init__(self, tc: TrainConfig, in_channels: int, image_size: int, runtime: Runtime,
                 started: Callable[[int], bool] | None = None):
        self.tc, self.runtime = tc, runtime
        self.started = started or (lambda step: step >= tc.gan_start)
        self.perceptual = None
        if tc.perceptual_weight > 0:
            from ..models.lpips import load_perceptual

            self.perceptual = load_perceptual(tc.perceptual_weights, runtime.device)
        self.adversary = self.opt = self.disc_net = None
        if tc.adversarial:
            if tc.diffaug and image_size <= DIFFAUG_MIN_SIZE:
                warnings.warn(f"--diffaug at {image_size} px kept the discriminator from learning "
                              f"in docs/tokenizer.md's {DIFFAUG_MIN_SIZE}-px runs (its hinge loss "
                              f"stayed at 1.0): watch disc_loss in train.jsonl, or leave it off")
            self.adversary = Adversary(in_channels, image_size, tc.disc_channels,
                                       tc.disc_layers).to(runtime.device)
            self.opt = torch.optim.Adam(self.adversary.parameters(), lr=tc.disc_lr or tc.lr,
                                        betas=(0.5, 0.9))
            self.disc_net = data_parallel(self.adversary.disc, runtime)

    @property
    def active(self) -> bool:
        return self.perceptual is not None or self.adversary is not None

    def companions(self) -> Companions:
        """What checkpoints save and restore beside the model."""
        return {ADVERSARY: (self.adversary, self.opt)} if self.adversary is not None else {}

    def _view(self, images: torch.Tensor) -> torch.Tensor:
        return diff_augment(images) if self.tc.diffaug else images

    def autoencoder_terms(self, step: int, x: torch.Tensor, reconstruction: torch.Tensor,
                          pixel: torch.Tensor, last_layer: torch.Tensor) -> dict[str, torch.Tensor]:
        """Terms added to the autoencoder's loss (``loss``) and what to log about them;
        ``pixel`` is the loss's pixel term (mse_x or l1_x)."""
        terms: dict[str, torch.Tensor] = {}
        added = pixel.new_zeros(())  # what the sharper terms add to the seed's loss
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction, x).mean()
            added = self.tc.perceptual_weight * terms["perceptual"]
        rec_loss = pixel + added  # the reconstruction loss the adaptive weight balances against
        if self.adversary is not None:
            zero = pixel.detach() * 0
            terms |= {"gan_g": zero, "gan_weight": zero}
            if self.started(step):
                self.adversary.requires_grad_(False)  # the generator's pass: no D gradients
                g = generator_loss(self.adversary.disc(self._view(reconstruction)),
                                   self.tc.gan_loss)
                self.adversary.requires_grad_(True)
                weight = self.tc.adversary_weight * adaptive_weight(rec_loss, g, last_layer)
                terms |= {"gan_g": g, "gan_weight": weight}
                added = added + weight * g
        terms["loss"] = added
        return terms

    def discriminator_step(self, step: int, x: torch.Tensor,
                           reconstruction: torch.Tensor) -> dict[str, torch.Tensor]:
        """One Adam step of the discriminator on real and reconstructed images (one batch
        through it, so data parallelism sees one forward per backward); logs its loss and
        mean logits (zeros before ``gan_start``)."""
        if self.adversary is None:
            return {}
        if not self.started(step):
            zero = x.new_zeros(())
            return {"gan_d": zero, "logits_real": zero, "logits_fake": zero}
        with autocast(self.tc.precision, self.runtime.device):
            logits = self.disc_net(self._view(torch.cat([x, reconstruction.detach()])))
            real, fake = logits.float().chunk(2)
            loss = discriminator_loss(real, fake, self.tc.gan_loss)
            if self.tc.lecam > 0:
                means = all_reduce_sum(torch.stack([real.mean(), fake.mean()]).detach())
                self.adversary.lecam.update(*(means / self.runtime.world_size))
                loss = loss + self.tc.lecam * self.adversary.lecam(real, fake)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return {"gan_d": loss.detach(), "logits_real": real.detach().mean(),
                "logits_fake": fake.detach().mean()}
