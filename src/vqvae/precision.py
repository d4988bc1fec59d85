"""Numerics of a training run: TF32, mixed precision (bf16 / fp16 autocast, fp16 loss scaling)
and deterministic kernels for an exact resume on CUDA.

Micikevicius et al., "Mixed Precision Training" (2018), arXiv:1710.03740 (fp16 with loss
scaling); Kalamkar et al., "A Study of BFLOAT16 for Deep Learning Training" (2019),
arXiv:1905.12322. Weights, optimizer state and checkpoints stay fp32 in every mode.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}  # precision -> autocast dtype
# cuBLAS reuses workspaces across streams unless told this; deterministic mode needs it set
# before the first cuBLAS call of the process (PyTorch's reproducibility notes).
CUBLAS_WORKSPACE = ":4096:8"


def autocast(precision: str, device: torch.device) -> Any:
    """The context a training step's forward runs in: bf16 or fp16 autocast, or nothing."""
    if precision in AUTOCAST:
        return torch.autocast(device.type, dtype=AUTOCAST[precision])
    return nullcontext()


def sampling_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The dtype a sampler's forward passes run in under ``precision`` (fp32 | bf16 | fp16):
    None for fp32."""
    if precision not in ("fp32", *AUTOCAST):
        raise ValueError(f"sampling precision must be fp32, bf16 or fp16, got {precision!r}")
    return AUTOCAST.get(precision)


def sampling_autocast(dtype: torch.dtype | None, device: torch.device) -> Any:
    """Autocast to ``dtype`` for sampling, without autocast's weight-cast cache (which a CUDA
    graph capture must not use); nothing for None."""
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


def loss_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """fp16's dynamic loss scaler (small gradients would underflow fp16's range); a disabled one,
    whose ``scale`` and ``step`` pass through, in every other precision."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


@contextmanager
def numerics(precision: str, device: torch.device, deterministic: bool = False
             ) -> Iterator[None]:
    """Process-wide math settings for a training run, restored on the way out.

    On CUDA: TF32 tensor cores for matmuls and convolutions unless ``precision`` is ``fp32``
    (PyTorch already allows them for convolutions; strict fp32 made the seed preset's 128 px step
    3.8x slower on an H200). ``deterministic``: kernels that give the same bits on every run
    (cuDNN's deterministic algorithms, no autotuning, a fixed cuBLAS workspace, PyTorch's
    deterministic mode, which warns where an op has no deterministic kernel), so that a resumed
    run continues exactly as the uninterrupted one would; it costs speed (docs/benchmarks.md).
    A CPU needs none of it: its kernels are deterministic already and it has no TF32.
    """
    cuda = device.type == "cuda"
    before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
              torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if cuda and deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = before[:4]
        torch.use_deterministic_algorithms(before[4], warn_only=before[5])
