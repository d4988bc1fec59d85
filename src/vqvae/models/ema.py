"""An exponential moving average of a model's weights, the copy generative models of this field
are evaluated and sampled with (Polyak & Juditsky, 1992; LlamaGen, MaskGIT, MAR, the diffusion
models). Pure module: the training driver updates it, checkpoints save it as a companion.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

EMA = "ema"  # its name in a checkpoint folder: ema.safetensors + ema.json


class WeightEMA(nn.Module):
    """``average`` holds, for every floating-point parameter p of the model, ema <- d * ema +
    (1 - d) * p after each step, with d = min(decay, (1 + t) / (10 + t)) at step t (the early
    steps average over fewer of them, so the copy is not stuck near the initial weights); the
    model's buffers (BatchNorm statistics, the EMA quantizer's codebook) are copied as they are."""

    def __init__(self, model: nn.Module, decay: float):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.average = copy.deepcopy(model).requires_grad_(False).eval()

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After the optimizer step that made ``step`` steps in all."""
        d = min(self.decay, (1 + step) / (10 + step))
        mine = dict(self.average.named_parameters())
        for name, p in model.named_parameters():
            mine[name].lerp_(p.detach(), 1.0 - d)
        theirs = dict(model.named_buffers())
        for name, b in self.average.named_buffers():
            b.copy_(theirs[name])

    def state_dict(self, *args, **kwargs):  # the averaged model's keys, as the model's own
        return self.average.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.average.load_state_dict(state_dict, strict, assign)

    @contextmanager
    def applied(self, model: nn.Module) -> Iterator[None]:
        """``model`` holds the averaged weights inside the block, its own again after."""
        own = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.average.state_dict())
        try:
            yield
        finally:
            model.load_state_dict(own)
