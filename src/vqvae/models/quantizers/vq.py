"""Codebook quantizers behind one small API: ``forward(z) -> QuantizerOutput`` and its inverse,
``indices_to_codes``.

vq: van den Oord et al., "Neural Discrete Representation Learning" (2017), arXiv:1711.00937;
ema: the same paper's appendix / Razavi et al. (2019), arXiv:1906.00446; k-means init and
dead-code restarts: Dhariwal et al., "Jukebox" (2020), arXiv:2005.00341; cosine codes in a
projected lookup space: Yu et al., "Vector-quantized Image Modeling with Improved VQGAN" (2021),
arXiv:2110.04627; the rotation trick (estimator "rotation"): Fifty et al., "Restructuring Vector
Quantization with the Rotation Trick" (2024), arXiv:2410.06424. The implicit codebook of FSQ,
with the same API, is in :mod:`vqvae.models.quantizers.fsq`.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...distributed import all_reduce_sum, broadcast_from_main, gather_rows, pick_rows, world_size

# Elements of the (rows, K) distance block computed at once, by device type. On a CPU, blocks
# that stay in cache between the addmm and the argmin beat one whole matrix by 1.5-2x
# (benchmarks/quantizer_speed.py): 1M floats, 4 MiB. On a GPU a cache-sized block made the vq
# train step 5.6-7.6x the floor; 16M-128M-element blocks ran at or below it (measured on an H200
# with an earlier version): 64M floats, 256 MiB at most. Every block reuses one buffer.
CHUNK_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 26}
OTHER_DEVICES = 1 << 24  # e.g. MPS: not measured, between the two


def lookup_rows(n: int, k: int, device_type: str) -> int:
    """Rows of an (n, k) distance matrix the lookup computes at once on ``device_type``."""
    return max(1, min(n, CHUNK_ELEMENTS.get(device_type, OTHER_DEVICES) // max(k, 1)))
KMEANS_ITERS = 10
ESTIMATORS = ("ste", "rotation")  # how the snap to a code passes gradients to the encoder


class QuantizerOutput(NamedTuple):
    quantized: torch.Tensor  # (B, D, H, W): forward = codes, backward = identity (ste) or rotated
    indices: torch.Tensor  # (B, H, W) int64
    loss: torch.Tensor  # scalar: the quantizer's share of the training loss
    codebook_loss: torch.Tensor  # scalar: mse(sg(z), e), moves codes towards encoder outputs
    commitment_loss: torch.Tensor  # scalar: mse(z, sg(e)), keeps encoder outputs near codes


# --- shared pieces -----------------------------------------------------------------------------


@torch.no_grad()
def nearest_code(flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook row (squared L2) for every row of ``flat`` (N, D) -> (N,).

    ``|z|^2`` is the same for every code, so argmin(|e|^2 - 2 z.e) suffices; one ``addmm`` per
    chunk of rows keeps the full (N, K) distance matrix from ever being held.
    """
    e_sq = codebook.pow(2).sum(1)  # (K,)
    rows = lookup_rows(flat.shape[0], codebook.shape[0], flat.device.type)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    dist_ = flat.new_empty(rows, codebook.shape[0])  # (rows, K), refilled by every chunk
    for start in range(0, flat.shape[0], rows):
        chunk = flat[start:start + rows]
        d = torch.addmm(e_sq, chunk, codebook.t(), alpha=-2.0, out=dist_[:chunk.shape[0]])
        torch.argmin(d, 1, out=out[start:start + rows])
    return out


def cluster_sums(x: torch.Tensor, indices: torch.Tensor,
                 k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-code counts (K,) and sums (K, D) of the rows of ``x`` (N, D) assigned by ``indices``,
    summed over ranks; no (N, K) one-hot matrix is built."""
    # index_add_, not bincount: a fixed output shape, which torch.compile captures in one graph
    counts = x.new_zeros(k).index_add_(0, indices, x.new_ones(indices.shape[0]))
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, indices, x)
    return all_reduce_sum(counts), all_reduce_sum(sums)


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int = KMEANS_ITERS,
           cosine: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of the rows of ``x`` (N, D) on all ranks (sums over ranks), seeded by
    k-means++ over every rank's rows.

    Returns centroids (K, D) and their final cluster sizes (K,); with ``cosine`` the centroids
    are kept on the unit sphere (spherical k-means). A cluster that empties keeps its seed.
    """
    x = x.float()
    # Seeds from all ranks' rows, drawn identically on every rank; rank 0's are kept.
    centroids = broadcast_from_main(_kmeans_plus_plus(gather_rows(x), k))
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        counts, sums = cluster_sums(x, nearest_code(x, centroids), k)
        means = sums / counts.clamp_min(1.0).unsqueeze(1)
        if cosine:
            means = F.normalize(means, dim=1)
        centroids = torch.where(counts.unsqueeze(1) > 0, means, centroids)
    return centroids, counts


def _kmeans_plus_plus(x: torch.Tensor, k: int) -> torch.Tensor:
    """k seeds drawn with probability proportional to the squared distance to the nearest seed
    so far (Arthur & Vassilvitskii, 2007). Fewer distinct rows than k: duplicates are drawn."""
    seeds = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    seeds[0] = x[torch.randint(x.shape[0], (), device=x.device)]
    d2 = (x - seeds[0]).pow(2).sum(1)  # (N,) squared distance to the nearest seed
    for i in range(1, k):
        pick = torch.multinomial(d2 + 1e-12, 1)  # all zero (k > distinct rows): uniform
        seeds[i] = x[pick[0]]
        d2 = torch.minimum(d2, (x - seeds[i]).pow(2).sum(1))
    return seeds


class LookupSpace(nn.Module):
    """Where codes live: the latent space itself, or a linear projection of it to ``lookup_dim``
    (and back), optionally l2-normalised so that nearest = highest cosine similarity."""

    def __init__(self, dim: int, lookup_dim: int | None = None, cosine: bool = False):
        super().__init__()
        self.dim = lookup_dim or dim
        self.cosine = cosine
        self.project_in = nn.Linear(dim, lookup_dim) if lookup_dim else nn.Identity()
        self.project_out = nn.Linear(lookup_dim, dim) if lookup_dim else nn.Identity()

    def inward(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, dim) latents -> (N, lookup_dim) lookup vectors."""
        x = self.project_in(flat)
        return F.normalize(x, dim=-1) if self.cosine else x

    def outward(self, codes: torch.Tensor) -> torch.Tensor:
        """(N, lookup_dim) codes -> (N, dim) vectors for the decoder."""
        return self.project_out(codes)


def full_precision(z: torch.Tensor) -> torch.autocast:
    """Autocast off: under mixed precision the lookup, codebook statistics and losses still run
    in fp32 (a bf16 distance flips near-ties; bf16 EMA sums drift)."""
    return torch.autocast(z.device.type, enabled=False)


def flatten_latents(z: torch.Tensor) -> torch.Tensor:
    """(B, D, H, W) -> (B*H*W, D); a view, no copy, when ``z`` is channels-last in memory."""
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def unflatten_latents(flat: torch.Tensor, shape: Sequence[int],
               like: torch.Tensor | None = None) -> torch.Tensor:
    """(B*H*W, D) -> (B, D, H, W) in the memory format of ``like`` (contiguous without one):
    a channels-last input gets a channels-last output for free, others pay one copy."""
    b, h, w = shape
    out = flat.view(b, h, w, -1).permute(0, 3, 1, 2)
    return out if like is not None and _channels_last(like) else out.contiguous()


def _channels_last(z: torch.Tensor) -> bool:
    return not z.is_contiguous() and z.is_contiguous(memory_format=torch.channels_last)


# Below this norm an encoder vector has no direction to rotate: its gradient passes straight
# through. Below ANTIPODAL, |e_hat + q_hat| gives no reliable direction r (e points away from q):
# r = 0 turns R into the reflection I + 2 q_hat e_hat^T, which also maps e_hat to q_hat = -e_hat.
TINY, ANTIPODAL = 1e-12, 1e-4


def rotation_gradient(e: torch.Tensor, q: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The rotation trick's gradient (N, d) w.r.t. encoder vectors ``e`` (N, d) snapped to codes
    ``q`` (N, d), given the gradient ``grad`` (N, d) w.r.t. the codes, in fp32.

    Forward, the trick writes q = sg(|q|/|e| R) e with R the rotation taking e/|e| to q/|q|:
    R = I - 2 r r^T + 2 q_hat e_hat^T, r = (e_hat + q_hat) / |e_hat + q_hat|, a constant. So
    grad_e = |q|/|e| R^T grad = |q|/|e| (grad - 2 r (r.grad) + 2 e_hat (q_hat.grad)): dot
    products per row, no (d, d) matrix.
    """
    e, q, grad = e.float(), q.float(), grad.float()
    e_norm, q_norm = e.norm(dim=1, keepdim=True), q.norm(dim=1, keepdim=True)  # (N, 1)
    e_hat, q_hat = e / e_norm.clamp_min(TINY), q / q_norm.clamp_min(TINY)
    r = e_hat + q_hat
    r_norm = r.norm(dim=1, keepdim=True)
    r = torch.where(r_norm > ANTIPODAL, r / r_norm.clamp_min(TINY), torch.zeros_like(r))
    rotated = (grad - 2 * r * (r * grad).sum(1, keepdim=True)
               + 2 * e_hat * (q_hat * grad).sum(1, keepdim=True))  # R^T grad
    return torch.where(e_norm > TINY, rotated * (q_norm / e_norm.clamp_min(TINY)), grad)


class _SnapWithLosses(torch.autograd.Function):
    """(x, codes) (N, d) -> (codes with x's gradient, mse(codes, sg(x)), mse(x, sg(codes))).

    Straight-through: the forward value is exactly ``codes``, the gradient reaches x unchanged
    (the seed's z + sg(e - z) is the same up to rounding); with ``rotate`` it reaches x through
    the rotation trick (:func:`rotation_gradient`), the forward value unchanged. Both loss terms
    come from one difference: three passes over (N, d) instead of about ten (``F.mse_loss`` twice,
    forward and backward, and the estimator's arithmetic), which is most of a CPU train step
    beyond the lookup.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, codes: torch.Tensor, rotate: bool = False):
        diff = (codes - x).reshape(-1)  # (N*d,)
        mse = torch.dot(diff, diff) / diff.numel()
        # the rotation needs both vectors; the difference is recomputed from them, bit for bit
        ctx.save_for_backward(*((x, codes) if rotate else (diff,)))
        ctx.shape, ctx.rotate = x.shape, rotate
        ctx.set_materialize_grads(False)  # an unused output sends no gradient, not zeros
        return codes.view_as(codes), mse, mse.clone()

    @staticmethod
    def backward(ctx, grad_quantized, grad_codebook, grad_commitment):
        if ctx.rotate:
            x, codes = ctx.saved_tensors
            diff = codes - x
            if grad_quantized is not None:
                grad_quantized = rotation_gradient(x, codes, grad_quantized)
        else:
            (diff,) = ctx.saved_tensors
            diff = diff.view(ctx.shape)
        scale = 2.0 / diff.numel()  # d mse(a, b) / da = 2 (a - b) / n
        grad_x = grad_quantized
        if grad_commitment is not None:
            grad_x = (diff * (grad_commitment * -scale) if grad_x is None
                      else torch.addcmul(grad_x, diff, grad_commitment, value=-scale))
        grad_codes = None if grad_codebook is None else diff * (grad_codebook * scale)
        return grad_x, grad_codes, None


# --- learned codebooks: vq and ema -------------------------------------------------------------


class _CodebookQuantizer(nn.Module):
    """What vq and ema share: the lookup, k-means init, dead-code restarts, the output.

    Subclasses hold the codebook (a parameter or a buffer) and say how it is read
    (``codebook_vectors``), overwritten (``_overwrite``) and learned (``_learn``, ``_loss``).
    State lives in buffers so it is saved with the weights: ``initialized`` (with k-means init;
    a loaded model never re-initialises) and ``unused_steps`` (with restarts).
    """

    def __init__(self, codebook_size: int, dim: int, beta: float, kmeans_init: bool,
                 restart_after: int, cosine: bool, lookup_dim: int | None, estimator: str):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.codebook_size, self.dim, self.beta = codebook_size, dim, beta
        self.estimator = estimator
        self.restart_after = restart_after
        self.space = LookupSpace(dim, lookup_dim, cosine)
        if kmeans_init:
            self.register_buffer("initialized", torch.tensor(False))
        # ``initialized`` read once and remembered on the host: the check costs a sync (and a
        # graph break under torch.compile) until it is true, never after
        self._initialized_seen = False
        if restart_after > 0:
            self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.long))
            # codes re-seeded since the trainer last read (and zeroed) it; not saved
            self.register_buffer("restarted", torch.zeros((), dtype=torch.long),
                                 persistent=False)

    def _init_codebook(self) -> torch.Tensor:
        """The seed's U(-0.05, 0.05) codebook (K, lookup_dim), on the sphere for cosine codes."""
        codebook = torch.empty(self.codebook_size, self.space.dim).uniform_(-0.05, 0.05)
        return F.normalize(codebook, dim=1) if self.space.cosine else codebook

    def codebook_vectors(self) -> torch.Tensor:
        """The codes (K, lookup_dim) in the lookup space."""
        raise NotImplementedError

    def _overwrite(self, mask: torch.Tensor, vectors: torch.Tensor, counts: torch.Tensor) -> None:
        """Replace the codes where ``mask`` (K,) by ``vectors`` (K, d) backed by ``counts`` (K,)."""
        raise NotImplementedError

    def _learn(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        """Update the codebook from this batch's assignments (ema); vq learns by gradient."""

    def _loss(self, codebook_loss: torch.Tensor, commitment_loss: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        with full_precision(z):
            return self._forward(z)

    def _forward(self, z: torch.Tensor) -> QuantizerOutput:
        b, _, h, w = z.shape
        x = self.space.inward(flatten_latents(z).float())  # (N, d) in the lookup space
        if self.training:
            self._maybe_initialize(x.detach())
        indices = nearest_code(x.detach(), self.codebook_vectors().detach())  # (N,)
        if self.training:  # state changes before the gather, so indices_to_codes agrees after
            with torch.no_grad():
                self._learn(x.detach().float(), indices)
                self._restart_dead(x.detach().float(), indices)
        codes = F.embedding(indices, self.codebook_vectors())  # (N, d)
        # The rotation trick acts where the snap does: between the lookup vector x and its code,
        # both in the lookup space (after projection and cosine normalisation). That step alone
        # has no gradient; the projections around it are differentiated as they are, with either
        # estimator. With cosine codes |x| = |code| = 1: a pure rotation on the sphere.
        quantized, codebook_loss, commitment_loss = _SnapWithLosses.apply(
            x, codes, self.estimator == "rotation")
        quantized = self.space.outward(quantized)
        return QuantizerOutput(unflatten_latents(quantized, (b, h, w), z), indices.view(b, h, w),
                               self._loss(codebook_loss, commitment_loss), codebook_loss,
                               commitment_loss)

    def continuous(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> what the decoder would see if the nearest code sat exactly on each
        lookup vector: the projection and normalisation without the snap (identity for the seed)."""
        b, _, h, w = z.shape
        lookup = self.space.inward(flatten_latents(z))
        return unflatten_latents(self.space.outward(lookup), (b, h, w), z)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        """(B, H, W) code ids -> (B, D, H, W) code vectors; the exact inverse of the lookup."""
        codes = F.embedding(indices.reshape(-1), self.codebook_vectors())  # (N, d)
        return unflatten_latents(self.space.outward(codes), indices.shape)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._initialized_seen = False  # the loaded ``initialized`` decides again
        super()._load_from_state_dict(*args, **kwargs)

    @torch.no_grad()
    def _maybe_initialize(self, x: torch.Tensor) -> None:
        if self._initialized_seen or not hasattr(self, "initialized"):
            return
        if bool(self.initialized):
            self._initialized_seen = True
            return
        centroids, counts = kmeans(x, self.codebook_size, cosine=self.space.cosine)
        everything = torch.ones(self.codebook_size, dtype=torch.bool, device=x.device)
        self._overwrite(everything, centroids, counts.clamp_min(1.0))
        self.initialized.fill_(True)
        self._initialized_seen = True

    def _restart_dead(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        """Re-seed every code unused for ``restart_after`` steps with a random vector of this
        (global) batch. Written without a host sync: all K rows get a candidate, the mask picks."""
        if self.restart_after <= 0:
            return
        used = all_reduce_sum(torch.zeros(self.codebook_size, dtype=torch.long,
                                          device=x.device).index_fill_(0, indices, 1)) > 0
        self.unused_steps.add_(1).masked_fill_(used, 0)
        dead = self.unused_steps >= self.restart_after  # (K,)
        # Rank 0's draw among all ranks' vectors (the picks of one process with the global batch).
        pick = broadcast_from_main(torch.randint(x.shape[0] * world_size(), (self.codebook_size,),
                                                 device=x.device))
        candidates = pick_rows(x, pick)  # (K, d)
        self._overwrite(dead, candidates, torch.ones_like(dead, dtype=x.dtype))
        self.unused_steps.masked_fill_(dead, 0)
        self.restarted.add_(dead.sum())


class VectorQuantizer(_CodebookQuantizer):
    """The seed's quantizer: a learned codebook, codebook loss + beta * commitment loss.

    Options (all off in the seed): ``kmeans_init`` on the first training batch, ``restart_after``
    steps unused -> re-seeded, ``cosine`` codes, lookup in a ``lookup_dim`` projection, and the
    ``estimator`` of the encoder's gradient: ``ste`` (straight-through) or ``rotation``.
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, *,
                 kmeans_init: bool = False, restart_after: int = 0, cosine: bool = False,
                 lookup_dim: int | None = None, estimator: str = "ste"):
        super().__init__(codebook_size, dim, beta, kmeans_init, restart_after, cosine, lookup_dim,
                         estimator)
        self.codebook = nn.Parameter(self._init_codebook())

    def codebook_vectors(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=1) if self.space.cosine else self.codebook

    def _overwrite(self, mask: torch.Tensor, vectors: torch.Tensor, counts: torch.Tensor) -> None:
        self.codebook.data.copy_(torch.where(mask.unsqueeze(1), vectors.to(self.codebook.dtype),
                                             self.codebook.data))

    def _loss(self, codebook_loss: torch.Tensor, commitment_loss: torch.Tensor) -> torch.Tensor:
        return codebook_loss + self.beta * commitment_loss


class EMAVectorQuantizer(_CodebookQuantizer):
    """Codes are exponential moving averages of the vectors assigned to them; the encoder
    only pays the commitment loss.

    ``cluster_size`` (K,) and ``embed_sum`` (K, d) are EMAs of per-code counts and sums; the
    code is ``embed_sum / smoothed(cluster_size)`` with Laplace smoothing ``epsilon``.
    """

    def __init__(self, codebook_size: int, dim: int, beta: float = 0.25, *,
                 decay: float = 0.99, epsilon: float = 1e-5, kmeans_init: bool = False,
                 restart_after: int = 0, cosine: bool = False, lookup_dim: int | None = None,
                 estimator: str = "ste"):
        super().__init__(codebook_size, dim, beta, kmeans_init, restart_after, cosine, lookup_dim,
                         estimator)
        self.decay, self.epsilon = decay, epsilon
        codebook = self._init_codebook()
        self.register_buffer("codebook", codebook)
        # Every code starts as the mean of one pseudo-vector: a code nothing is assigned to
        # keeps its place instead of being dragged to zero by the decay.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("embed_sum", codebook.clone())

    def codebook_vectors(self) -> torch.Tensor:
        return self.codebook

    def _refresh(self) -> None:
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.epsilon) / (n + self.codebook_size * self.epsilon) * n
        codebook = self.embed_sum / smoothed.unsqueeze(1)
        self.codebook.copy_(F.normalize(codebook, dim=1) if self.space.cosine else codebook)

    def _learn(self, x: torch.Tensor, indices: torch.Tensor) -> None:
        counts, sums = cluster_sums(x, indices, self.codebook_size)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        self._refresh()

    def _overwrite(self, mask: torch.Tensor, vectors: torch.Tensor, counts: torch.Tensor) -> None:
        self.cluster_size.copy_(torch.where(mask, counts, self.cluster_size))
        self.embed_sum.copy_(torch.where(mask.unsqueeze(1), vectors * counts.unsqueeze(1),
                                         self.embed_sum))
        self._refresh()

    def _loss(self, codebook_loss: torch.Tensor, commitment_loss: torch.Tensor) -> torch.Tensor:
        return self.beta * commitment_loss  # codebook_loss is reported, never trained on
