"""Data parallelism: torchrun's environment -> a process group and a Runtime; synchronised BN.

PyTorch DistributedDataParallel (Li et al., "PyTorch Distributed", VLDB 2020, arXiv:2006.15704);
cross-GPU BatchNorm statistics as in Peng et al., "MegDet" (2018), arXiv:1711.07240.
"""

from __future__ import annotations

import inspect
import os
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError, PeerError

# A rank that waits longer than this in a collective (a peer crashed or hangs) raises instead of
# waiting forever. Rank 0 alone writes checkpoints, grids and plots while the others wait, so
# this must exceed the slowest checkpoint.
TIMEOUT = timedelta(minutes=15)
PEER_GRACE_S = 10.0  # how long a rank that stops for rank 0's failure lets rank 0 go first


@dataclass(frozen=True)
class Runtime:
    """Where this process runs: its device and its rank among ``world_size`` data-parallel ranks."""

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0



def torchrun_env() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK) as set by torchrun; (0, 1, 0) in a plain process."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


@contextmanager
def launch(device: str | torch.device = "auto") -> Iterator[Runtime]:
    """This process's :class:`Runtime` on ``device`` (:func:`pick_device`'s rule). Under
    ``torchrun`` with several processes: joins the
    process group (NCCL on CUDA, one GPU per process = ``cuda:LOCAL_RANK``; gloo on the CPU) and
    leaves it on the way out, also on error; only rank 0 talks (the other ranks' warnings would
    repeat its own and are silenced). A plain process gets ``Runtime(device)``."""
    device = pick_device(device)
    rank, world, local = torchrun_env()
    if world == 1:
        yield Runtime(device)
        return
    if device.type == "cuda":
        if device.index not in (None, local):
            raise ConfigError(f"under torchrun every process uses cuda:LOCAL_RANK; got --device "
                              f"{device}: pass --device cuda (or auto)")
        device, backend = torch.device("cuda", local), "nccl"
        torch.cuda.set_device(device)
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"data-parallel training needs CUDA (NCCL) or the CPU (gloo), not "
                          f"{device.type}: pass --device cpu")
    owner = not dist.is_initialized()  # a caller's own process group is left to the caller
    if owner:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=TIMEOUT)
    try:
        with warnings.catch_warnings():
            if dist.get_rank() != 0:
                warnings.simplefilter("ignore")
            yield Runtime(device, dist.get_rank(), dist.get_world_size())
        if owner:  # leave together: a rank closing its connections early can abort the others
            dist.barrier()
    except PeerError:
        # Let rank 0 print its error and exit first: torchrun then names it as the root cause
        # and stops this rank, instead of stopping rank 0 before it could say what went wrong.
        time.sleep(PEER_GRACE_S)
        raise
    finally:
        if owner:
            dist.destroy_process_group()


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """The one device rule of every command: ``auto`` picks CUDA, then Apple MPS, then the CPU;
    anything else is passed to torch. Under torchrun ``auto`` and ``cuda`` are this process's
    GPU, ``cuda:LOCAL_RANK``. A :class:`torch.device` is returned as it is."""
    if isinstance(name, torch.device):
        return name
    if name in ("auto", "cuda") and torch.cuda.is_available() and torchrun_env()[1] > 1:
        return torch.device("cuda", torchrun_env()[2])
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ConfigError(f"device {name!r} is not a valid torch device: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


# --- agreeing across ranks ---------------------------------------------------------------------


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """True on every rank if ``flag`` is true on any (a stop request, a deadline): ranks must
    leave the training loop at the same step. Free in a single process."""
    if runtime.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=runtime.device)
    dist.all_reduce(t)
    return bool(t.item())


def stop_and_seconds(flag: bool, seconds: float, runtime: Runtime) -> tuple[bool, float]:
    """:func:`any_rank` of ``flag`` and the largest ``seconds`` (a run's clock, which each rank
    reads a little apart) in one collective: what every rank's schedule then reads."""
    if runtime.world_size == 1:
        return flag, seconds
    t = torch.tensor([float(flag), seconds], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    stop, agreed = t.tolist()
    return stop > 0, agreed


def mean_over_ranks(values: dict[str, float], runtime: Runtime) -> dict[str, float]:
    """Per-rank numbers (e.g. window means of the loss terms) -> their mean over ranks, the same
    on every rank. With equal local batches, the mean of the global batch."""
    if runtime.world_size == 1 or not values:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return dict(zip(values, (t / runtime.world_size).tolist()))


def main_does(fn: Callable[[], object], runtime: Runtime, what: str) -> None:
    """Run ``fn()`` on rank 0 only (I/O such as preparing the run folder); if it raises, rank 0
    re-raises and every other rank raises :class:`PeerError` instead of waiting for it."""
    error: BaseException | None = None
    if runtime.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, after the others have heard of it
            error = e
    if any_rank(error is not None, runtime):
        if error is not None:
            raise error
        raise PeerError(f"rank 0 failed to {what} (its message says why)")


def sum_over_ranks(values: dict[str, float], device: torch.device | str) -> dict[str, float]:
    """Per-rank sums (e.g. of a sharded evaluation) -> their sum over ranks, in float64."""
    if not _distributed() or not values:
        return values
    t = all_reduce_sum(torch.tensor(list(values.values()), dtype=torch.float64, device=device))
    return dict(zip(values, t.tolist()))


# --- the implicit process group: what the quantizer's statistics and k-means go through -------


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over data-parallel ranks; the identity in a single process.

    Every statistic that updates a codebook (EMA sums, k-means, usage counters) goes through here,
    so all ranks keep identical codebooks.
    """
    if _distributed():
        dist.all_reduce(tensor)
    return tensor


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's ``tensor`` on every rank (random choices: k-means seeds, restart samples)."""
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def world_size() -> int:
    """Ranks in the process group (1 without one)."""
    return dist.get_world_size() if _distributed() else 1


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (N, D) stacked in rank order (W*N, D): with equal local batches,
    exactly the rows one process with the global batch would see. The identity in one process."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def pick_rows(x: torch.Tensor, picks: torch.Tensor) -> torch.Tensor:
    """Rows ``picks`` (K,) of :func:`gather_rows` (x) without gathering: each rank fills the rows
    it holds, zeros elsewhere, and a sum over ranks assembles them. Every rank must hold the same
    number of rows (the batch stream gives each rank an equal slice)."""
    if not _distributed():
        return x[picks]
    n = x.shape[0]
    mine = (picks // n == dist.get_rank()).unsqueeze(1)  # (K, 1)
    return all_reduce_sum(torch.where(mine, x[picks % n], torch.zeros((), dtype=x.dtype,
                                                                      device=x.device)))


# --- the model for training --------------------------------------------------------------------


class _SumOverRanks(torch.autograd.Function):
    """y = sum of x over ranks; every rank's loss depends on y, so dx = sum of dy over ranks."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        dist.all_reduce(y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch of all ranks: the
    per-channel sum, sum of squares and count are summed over ranks (differentiably), so W ranks
    of batch B normalise like one process of batch W*B and update identical running stats.

    For gloo on the CPU, where ``torch.nn.SyncBatchNorm`` refuses; eval mode and a single process
    are plain BatchNorm2d, and the state dict has BatchNorm2d's keys.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > 1):
            return super().forward(x)
        c = x.shape[1]
        x64 = x.double()  # sums of squares in float64: E[x^2] - E[x]^2 without cancellation
        local = torch.cat([x64.sum((0, 2, 3)), x64.pow(2).sum((0, 2, 3)),
                           x64.new_full((1,), x.numel() // c)])  # (2C + 1,)
        total = _SumOverRanks.apply(local)
        n = total[-1]
        mean = total[:c] / n
        var = (total[c:2 * c] / n - mean.pow(2)).clamp_min(0.0)  # biased, as BN normalises
        if self.track_running_stats and self.running_mean is not None:
            self._track(mean.detach(), var.detach() * n / (n - 1).clamp_min(1.0))
        scale = torch.rsqrt(var + self.eps)  # (C,)
        shift = -mean * scale
        if self.weight is not None:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        view = (1, c, 1, 1)
        return x * scale.to(x.dtype).view(view) + shift.to(x.dtype).view(view)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def sync_batchnorm(module: nn.Module, cuda: bool) -> nn.Module:
    """Swap every BatchNorm2d under ``module`` for a synchronised one holding the same parameters
    and buffers (an optimizer built before keeps working): torch's SyncBatchNorm on CUDA, ours
    elsewhere."""
    if cuda:
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = SyncBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                   child.track_running_stats, device="meta")
            sync.weight, sync.bias = child.weight, child.bias
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(sync, buffer, getattr(child, buffer))
            sync.train(child.training)
            setattr(module, name, sync)
        else:
            sync_batchnorm(child, cuda)
    return module


def data_parallel(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` ready to train on every rank: BatchNorm synchronised (in place) and wrapped in
    DistributedDataParallel, which averages gradients. Save and evaluate ``model`` itself, never
    the wrapper. A single process gets ``model`` back unchanged."""
    if runtime.world_size == 1:
        return model
    cuda = runtime.device.type == "cuda"
    sync_batchnorm(model, cuda)
    # Buffers (BN running stats, EMA codebooks, restart counters) are kept identical by the
    # synchronised updates themselves: no per-step broadcast from rank 0 (the option's name
    # changed in newer torch).
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers"
               in inspect.signature(DistributedDataParallel).parameters else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=[runtime.device.index] if cuda else None,
                                   **{no_sync: False})
