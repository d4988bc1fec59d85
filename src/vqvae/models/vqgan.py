"""The VQGAN encoder and decoder (MaskGIT's and LlamaGen's tokenizers too): GroupNorm residual
blocks per level, attention. Esser et al., "Taming Transformers..." (2021), arXiv:2012.09841.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6)


class GroupNormResBlock(nn.Module):
    """shortcut(x) + Conv3x3(SiLU(GN(Conv3x3(SiLU(GN(x)))))); the shortcut is a 1x1 conv when
    the width changes, the identity otherwise."""

    def __init__(self, in_channels: int, out_channels: int, groups: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            group_norm(in_channels, groups), nn.SiLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            group_norm(out_channels, groups), nn.SiLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.shortcut = (nn.Identity() if in_channels == out_channels
                         else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)


class SelfAttention(nn.Module):
    """x + proj(attention(q, k, v)): one head over all H*W positions of a feature map, with q, k,
    v 1x1 convolutions of GN(x)."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, 3C, H, W) -> (B, 1, HW, 3C): one head; a view when x is channels-last
        qkv = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).unsqueeze(1)
        q, k, v = qkv.chunk(3, dim=-1)  # (B, 1, HW, C) each
        # Every position sees every other: an image has no order to be causal in.
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, HW, C)
        return x + self.proj(out.squeeze(1).transpose(1, 2).reshape(b, c, h, w))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv to ``out_channels`` (default: ``channels``); no
    transposed conv: no checkerboard artefacts."""

    def __init__(self, channels: int, out_channels: int | None = None):
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class AsymmetricDownsample(nn.Conv2d):
    """A 3x3 stride-2 conv after zero padding of one pixel on the right and bottom only (taming's
    and diffusers' Downsample2D); the symmetric default pads one pixel on every side. A conv
    itself, so its weights are named as a plain conv's."""

    def __init__(self, channels: int):
        super().__init__(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


def _level(layers: list[nn.Module], width: int, out: int, blocks: int, attention: bool,
           groups: int) -> None:
    """``blocks`` residual blocks (the first one changing ``width`` to ``out``), each followed
    by attention when asked."""
    for _ in range(blocks):
        layers.append(GroupNormResBlock(width, out, groups))
        width = out
        if attention:
            layers.append(SelfAttention(width, groups))


def _middle(width: int, attention: bool, groups: int) -> list[nn.Module]:
    return [GroupNormResBlock(width, width, groups),
            *([SelfAttention(width, groups)] if attention else []),
            GroupNormResBlock(width, width, groups)]


def vqgan_encoder(in_channels: int, widths: Sequence[int], res_blocks: int, out_channels: int,
                  attention: bool = True, groups: int = 32, *, middle_attention_only: bool = False,
                  asymmetric_downsample: bool = False,
                  latent_channels: int | None = None) -> nn.Sequential:
    """(B, in_channels, S, S) -> (B, out_channels, S/2^n, S/2^n), n = len(widths) - 1: a 3x3
    conv, then per level ``res_blocks`` blocks to its width and a stride-2 conv between levels
    (:class:`AsymmetricDownsample` with ``asymmetric_downsample``), a middle of
    block-attention-block, GN-SiLU-conv out (attention: at the lowest level and in the middle, or
    ``middle_attention_only``). With ``latent_channels`` the conv out gives that many channels
    and a 1x1 conv maps them to ``out_channels`` (diffusers' quant_conv)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1)]
    width = widths[0]
    for level, out in enumerate(widths):
        lowest = level == len(widths) - 1
        _level(layers, width, out, res_blocks, attention and lowest and not middle_attention_only,
               groups)
        width = out
        if not lowest:  # (B, C, H, W) -> (B, C, H/2, W/2)
            layers.append(AsymmetricDownsample(width) if asymmetric_downsample
                          else nn.Conv2d(width, width, 3, stride=2, padding=1))
    layers += [*_middle(width, attention, groups), group_norm(width, groups), nn.SiLU(),
               nn.Conv2d(width, latent_channels or out_channels, 3, padding=1)]
    if latent_channels:
        layers.append(nn.Conv2d(latent_channels, out_channels, 1))
    return nn.Sequential(*layers)


def vqgan_decoder(in_channels: int, widths: Sequence[int], res_blocks: int, out_channels: int,
                  attention: bool = True, groups: int = 32, *, middle_attention_only: bool = False,
                  latent_channels: int | None = None) -> nn.Sequential:
    """The encoder mirrored, (B, in_channels, s, s) -> (B, out_channels, s*2^n, s*2^n): a 3x3
    conv to the lowest level's width, the middle, then per level from the lowest ``res_blocks``
    blocks to its width and an upsampling between levels, GN-SiLU-conv out. With
    ``latent_channels`` a 1x1 conv from ``in_channels`` to that many comes first (diffusers'
    post_quant_conv). The output is not squashed (no tanh): the reconstruction loss keeps it
    near [-1, 1]; pictures clamp it."""
    width = widths[-1]
    layers: list[nn.Module] = ([nn.Conv2d(in_channels, latent_channels, 1)] if latent_channels
                               else [])
    layers += [nn.Conv2d(latent_channels or in_channels, width, 3, padding=1),
               *_middle(width, attention, groups)]
    for level in reversed(range(len(widths))):
        lowest = level == len(widths) - 1
        _level(layers, width, widths[level], res_blocks,
               attention and lowest and not middle_attention_only, groups)
        width = widths[level]
        if level > 0:  # (B, C, h, w) -> (B, C, 2h, 2w)
            layers.append(Upsample(width))
    layers += [group_norm(width, groups), nn.SiLU(),
               nn.Conv2d(width, out_channels, 3, padding=1)]
    return nn.Sequential(*layers)
