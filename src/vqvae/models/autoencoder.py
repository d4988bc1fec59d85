"""The VQ-VAE autoencoder: convolutional encoder, vector quantizer, transposed-conv decoder.

van den Oord et al., "Neural Discrete Representation Learning" (2017), arXiv:1711.00937; the layer
plan is the VQ-VAE blog post's Keras model, which the ``seed`` preset reproduces layer by layer.
The encoder and decoder are one of :data:`ARCHITECTURES`: this ``resnet`` or ``vqgan`` (vqgan.py).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from ..config import Architecture, QuantizerName, VQVAEConfig
from .pretrained import VQVAE_KIND, CardFacts, PretrainedMixin
from .quantizers.fsq import FiniteScalarQuantizer
from .quantizers.multiscale import MultiScaleQuantizer
from .quantizers.vq import EMAVectorQuantizer, QuantizerOutput, VectorQuantizer
from .vqgan import Upsample, vqgan_decoder, vqgan_encoder


class ResidualBlock(nn.Module):
    """Pre-activation block, channels kept: x + Conv1x1(ReLU(BN(Conv3x3(ReLU(x)))))."""

    def __init__(self, channels: int, bn_momentum: float = 0.1, bn_eps: float = 1e-5):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.BatchNorm2d(channels, eps=bn_eps, momentum=bn_momentum),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _bn(cfg: VQVAEConfig) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(cfg.hidden_channels, eps=cfg.bn_eps, momentum=cfg.bn_momentum)


def _block(cfg: VQVAEConfig) -> ResidualBlock:
    return ResidualBlock(cfg.hidden_channels, cfg.bn_momentum, cfg.bn_eps)


def resnet_encoder(cfg: VQVAEConfig) -> nn.Sequential:
    """(B, C, S, S) -> (B, code_dim, S/2^n, S/2^n). Seed: conv-BN-ReLU-conv-BN, then blocks
    separated by BN; the output itself has no BN."""
    layers: list[nn.Module] = []
    channels = cfg.in_channels
    for i in range(cfg.downsamples):
        layers += [nn.Conv2d(channels, cfg.hidden_channels, 4, stride=2, padding=1), _bn(cfg)]
        if i < cfg.downsamples - 1:
            layers.append(nn.ReLU())
        channels = cfg.hidden_channels
    for i in range(cfg.res_blocks):
        layers.append(_block(cfg))
        if i < cfg.res_blocks - 1:
            layers.append(_bn(cfg))
    if cfg.code_dim != cfg.hidden_channels:  # project into the code space
        layers.append(nn.Conv2d(cfg.hidden_channels, cfg.code_dim, 1))
    return nn.Sequential(*layers)


def resnet_decoder(cfg: VQVAEConfig) -> nn.Sequential:
    """(B, code_dim, s, s) -> (B, C, s*2^n, s*2^n) in [-1, 1]. Seed: (BN, block) x n, then
    x2 upsamplings (``cfg.upsample``; the seed's are transposed convs) with BN-ReLU between
    them and tanh at the end."""
    layers: list[nn.Module] = []
    if cfg.code_dim != cfg.hidden_channels:
        layers.append(nn.Conv2d(cfg.code_dim, cfg.hidden_channels, 1))
    for _ in range(cfg.res_blocks):
        layers += [_bn(cfg), _block(cfg)]
    for _ in range(cfg.downsamples - 1):
        layers += [*_upsample(cfg, cfg.hidden_channels), _bn(cfg), nn.ReLU()]
    layers += [*_upsample(cfg, cfg.in_channels), nn.Tanh()]
    return nn.Sequential(*layers)


def _upsample(cfg: VQVAEConfig, out_channels: int) -> list[nn.Module]:
    """x2 from ``hidden_channels`` to ``out_channels``: the seed's 4x4 stride-2 transposed conv,
    or (``upsample="nearest"``) nearest-neighbour x2 and a 3x3 conv, whose output has no
    stride-periodic pattern (a transposed conv's kernel taps differ between even and odd
    output pixels)."""
    if cfg.upsample == "nearest":
        return [Upsample(cfg.hidden_channels, out_channels)]  # the vqgan decoder's
    return [nn.ConvTranspose2d(cfg.hidden_channels, out_channels, 4, stride=2, padding=1)]


def _vqgan_encoder(cfg: VQVAEConfig) -> nn.Sequential:
    return vqgan_encoder(cfg.in_channels, cfg.level_widths, cfg.res_blocks, cfg.code_dim,
                         cfg.attention, cfg.norm_groups,
                         middle_attention_only=cfg.middle_attention_only,
                         asymmetric_downsample=cfg.downsample_padding == "asymmetric",
                         latent_channels=cfg.latent_channels)


def _vqgan_decoder(cfg: VQVAEConfig) -> nn.Sequential:
    return vqgan_decoder(cfg.code_dim, cfg.level_widths, cfg.decoder_blocks, cfg.in_channels,
                         cfg.attention, cfg.norm_groups,
                         middle_attention_only=cfg.middle_attention_only,
                         latent_channels=cfg.latent_channels)


class EncoderDecoder(NamedTuple):
    encoder: Callable[[VQVAEConfig], nn.Module]  # images (B, C, S, S) -> (B, code_dim, s, s)
    decoder: Callable[[VQVAEConfig], nn.Module]  # (B, code_dim, s, s) -> images (B, C, S, S)


# The config's architecture name -> the builders of its encoder and decoder.
ARCHITECTURES: dict[Architecture, EncoderDecoder] = {
    "resnet": EncoderDecoder(resnet_encoder, resnet_decoder),
    "vqgan": EncoderDecoder(_vqgan_encoder, _vqgan_decoder),
}


def build_encoder(cfg: VQVAEConfig) -> nn.Module:
    """``cfg.architecture``'s encoder: images (B, C, S, S) -> latents (B, code_dim, s, s)."""
    return ARCHITECTURES[cfg.architecture].encoder(cfg)


def build_decoder(cfg: VQVAEConfig) -> nn.Module:
    """``cfg.architecture``'s decoder: latents (B, code_dim, s, s) -> images (B, C, S, S)."""
    return ARCHITECTURES[cfg.architecture].decoder(cfg)


def _keras_init(module: nn.Module) -> None:
    """Keras' defaults, as the seed ran: glorot-uniform kernels, zero biases."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _codebook_options(cfg: VQVAEConfig) -> dict:
    return {"kmeans_init": cfg.kmeans_init, "restart_after": cfg.restart_after,
            "cosine": cfg.cosine, "lookup_dim": cfg.lookup_dim, "estimator": cfg.estimator}


# The one quantizer registry: the config's quantizer name -> the leaf quantizer, built from plain
# numbers (quantize.py, fsq.py).
QUANTIZERS: dict[QuantizerName, Callable[[VQVAEConfig], nn.Module]] = {
    "vq": lambda cfg: VectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta,
                                      **_codebook_options(cfg)),
    "ema": lambda cfg: EMAVectorQuantizer(cfg.codebook_size, cfg.code_dim, cfg.beta,
                                          decay=cfg.ema_decay, epsilon=cfg.ema_epsilon,
                                          **_codebook_options(cfg)),
    "fsq": lambda cfg: FiniteScalarQuantizer(cfg.quantizer_levels, cfg.code_dim),
    "multiscale": lambda cfg: MultiScaleQuantizer(
        cfg.codebook_size, cfg.code_dim, cfg.quantizer_scales, cfg.beta,
        kmeans_init=cfg.kmeans_init, restart_after=cfg.restart_after),
}


def build_quantizer(cfg: VQVAEConfig) -> nn.Module:
    """The quantizer named by ``cfg.quantizer``; ``codebook_size`` codes for every variant."""
    return QUANTIZERS[cfg.quantizer](cfg)


class VQVAEOutput(NamedTuple):
    reconstruction: torch.Tensor  # (B, C, H, W) in [-1, 1] (vqgan: near it, unclamped)
    latents: torch.Tensor  # (B, D, h, w) continuous encoder output
    quantized: QuantizerOutput


class VQVAE(PretrainedMixin, nn.Module):
    """Encoder -> quantizer -> decoder, built from a :class:`VQVAEConfig`."""

    checkpoint_kind, config_class = VQVAE_KIND, VQVAEConfig

    def __init__(self, cfg: VQVAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = build_encoder(cfg)
        self.quantizer = build_quantizer(cfg)
        self.decoder = build_decoder(cfg)
        if cfg.weight_init == "keras":
            self.apply(_keras_init)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous latents (B, D, h, w), before quantization."""
        return self.encoder(x)

    def encode(self, x: torch.Tensor) -> QuantizerOutput:
        """Images (B, C, H, W) in [-1, 1] -> quantizer output with indices (B, h, w)."""
        return self.quantizer(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents or code vectors (B, D, h, w) -> images (B, C, H, W) in [-1, 1]; the vqgan
        decoder has no tanh, so its values may overshoot slightly (``to_uint8`` clamps)."""
        return self.decoder(z)

    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Code ids (B, h, w) -> images (B, C, H, W); a multiscale quantizer's token
        sequences (B, L)."""
        return self.decoder(self.quantizer.indices_to_codes(indices))

    def reconstruct(self, x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Images -> reconstructions, through the codebook or (``quantize=False``) around it:
        the quantizer's continuous path (projection/normalisation, no snap to a code)."""
        z = self.encoder(x)
        return self.decoder(self.quantizer(z).quantized if quantize
                            else self.quantizer.continuous(z))

    def last_layer(self) -> nn.Parameter:
        """The weight of the decoder's final layer (the last module with one): where the GAN's
        adaptive weight compares the gradients of the reconstruction and adversarial losses."""
        weights = [m.weight for m in self.decoder.modules()
                   if isinstance(getattr(m, "weight", None), nn.Parameter)]
        return weights[-1]

    def forward(self, x: torch.Tensor) -> VQVAEOutput:
        z = self.encoder(x)
        q = self.quantizer(z)
        return VQVAEOutput(self.decoder(q.quantized), z, q)

    def card_facts(self) -> CardFacts:
        cfg, side = self.cfg, self.cfg.latent_size
        summary = (f"A VQ-VAE image tokenizer: {cfg.image_size} x {cfg.image_size} images with "
                   f"{cfg.in_channels} channel(s) -> a {side} x {side} grid of codes out of "
                   f"K = {cfg.codebook_size} ({cfg.architecture} encoder and decoder, "
                   f"{cfg.quantizer} quantizer), and back.")
        facts = {"architecture": cfg.architecture, "quantizer": cfg.quantizer,
                 "codes K": cfg.codebook_size, "code grid h x w": f"{side} x {side}",
                 "code dimension": cfg.code_dim,
                 "image size": f"{cfg.image_size} x {cfg.image_size}",
                 "image channels": cfg.in_channels}
        return CardFacts("VQ-VAE image tokenizer", summary, facts,
                         ("image-tokenizer", "vq-vae", cfg.architecture, cfg.quantizer))
