"""CUDA graphs: a step of fixed shapes captured once and replayed, so that a small step costs
one launch instead of hundreds (what makes a batch-64 sampling step launch-bound on a GPU).

PyTorch's ``torch.cuda.graph`` API ("CUDA Graphs", NVIDIA CUDA Programming Guide).
"""

from __future__ import annotations

from typing import Callable

import torch

WARMUP = 3  # eager calls on a side stream before capture (lazy initialisation, autotuning)


class CapturedStep:
    """``fn(*inputs)`` captured in a CUDA graph: a call copies its inputs into the graph's own
    buffers and replays it, returning the graph's output tensor (overwritten by the next call:
    read or copy it before calling again).

    ``fn`` must have fixed shapes, no host syncs and no data-dependent control flow; the warm-up
    calls run it ``WARMUP`` times for real, so state it advances must be reset by the caller.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], *examples: torch.Tensor):
        self.inputs = [x.clone() for x in examples]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for buffer, x in zip(self.inputs, inputs):
            buffer.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.output
