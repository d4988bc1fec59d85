import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from vqvae import PRESETS, VQVAE, ConfigError, VQVAEConfig, load_autoencoder, seed_model
from vqvae.store import checkpoint as ckpt
from vqvae.models.quantizers import vq as quantize
from vqvae.config import from_dict, fsq_levels_for, to_dict
from vqvae.models.quantizers.fsq import FiniteScalarQuantizer
from vqvae.evaluation.metrics import CodeUsage
from vqvae.models.quantizers.vq import EMAVectorQuantizer, VectorQuantizer, kmeans, nearest_code

K, D = 12, 6
VARIANTS = {
    "vq": lambda: VectorQuantizer(K, D),
    "vq-all": lambda: VectorQuantizer(K, D, kmeans_init=True, restart_after=2, cosine=True,
                                      lookup_dim=3),
    "ema": lambda: EMAVectorQuantizer(K, D),
    "ema-all": lambda: EMAVectorQuantizer(K, D, kmeans_init=True, restart_after=2, cosine=True,
                                          lookup_dim=3),
    "vq-rotation": lambda: VectorQuantizer(K, D, estimator="rotation"),
    "ema-all-rotation": lambda: EMAVectorQuantizer(K, D, kmeans_init=True, restart_after=2,
                                                   cosine=True, lookup_dim=3, estimator="rotation"),
    "fsq": lambda: FiniteScalarQuantizer((3, 4), D),
    "fsq-no-projection": lambda: FiniteScalarQuantizer((3, 2, 2, 5, 2, 3), D),
}
CONFIGS = {
    "vq": {}, "vq-all": dict(kmeans_init=True, restart_after=2, cosine=True, lookup_dim=3),
    "ema": dict(quantizer="ema"),
    "ema-all": dict(quantizer="ema", kmeans_init=True, restart_after=2, cosine=True, lookup_dim=3),
    "vq-rotation": dict(estimator="rotation"),
    "ema-all-rotation": dict(quantizer="ema", kmeans_init=True, restart_after=2, cosine=True,
                             lookup_dim=3, estimator="rotation"),
    "fsq": dict(quantizer="fsq", codebook_size=16),
}


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("training", [True, False])
def test_index_round_trip_is_exact(name, training):
    q = VARIANTS[name]().train(training)
    z = torch.randn(3, D, 4, 5)
    for _ in range(3):  # also after k-means init, EMA updates and restarts
        out = q(z)
        assert out.quantized.shape == z.shape
        assert out.indices.shape == (3, 4, 5) and out.indices.dtype == torch.long
        assert 0 <= out.indices.min() and out.indices.max() < q.codebook_size
        assert torch.equal(q.indices_to_codes(out.indices), out.quantized)
        assert all(t.dim() == 0 for t in out[2:])  # loss, codebook_loss, commitment_loss


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
@pytest.mark.parametrize("options", [{}, dict(cosine=True, lookup_dim=3)])
def test_continuous_path_is_the_lookup_without_the_snap(cls, options):
    z = torch.randn(1, D, 3, 4)  # 12 vectors = K codes
    q = cls(K, D, **options).eval()
    cont = q.continuous(z)
    if not options:  # the seed's: the latents themselves
        assert torch.equal(cont, z)
    # Put a code exactly on every lookup vector: the snap becomes a no-op, so the quantized
    # output must equal the continuous path.
    with torch.no_grad():
        lookup = q.space.inward(z.permute(0, 2, 3, 1).reshape(-1, D))
        q.codebook.copy_(lookup)
    assert torch.allclose(q(z).quantized, cont, atol=1e-5)


def test_fsq_continuous_path_is_within_half_a_step_of_the_codes():
    levels = (3, 2, 2, 5, 2, 3)
    q = FiniteScalarQuantizer(levels, D)  # no projection: D == len(levels)
    z = torch.randn(2, D, 3, 3) * 2
    gap = (q(z).quantized - q.continuous(z)).abs()  # scaled units: grid step 2 / L
    bound = (1.0 / torch.tensor(levels, dtype=torch.float32)).view(1, -1, 1, 1)
    assert (gap <= bound + 1e-6).all() and gap.max() > 0


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_the_encoder(name, tiny_cfg):
    model = VQVAE(replace(tiny_cfg, **CONFIGS[name]))
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    out = model(x)
    (F.mse_loss(out.reconstruction, x) + out.quantized.loss).backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0


def test_loss_reporting():
    z = torch.randn(2, D, 3, 3)
    ema = EMAVectorQuantizer(K, D, beta=0.5).eval()(z)
    assert torch.allclose(ema.loss, 0.5 * ema.commitment_loss)
    assert torch.allclose(ema.codebook_loss, ema.commitment_loss)
    fsq = FiniteScalarQuantizer((4, 4), D)(z)
    assert fsq.loss == 0 and fsq.codebook_loss == 0 and fsq.commitment_loss > 0


def test_ema_update_equals_hand_computed():
    q = EMAVectorQuantizer(2, 1, decay=0.5, epsilon=0.1)
    q.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    q.embed_sum.copy_(q.codebook)
    z = torch.tensor([1.0, 2.0, 3.0, 9.0]).view(1, 1, 2, 2)  # codes 0, 0, 0, 1
    q.train()(z)
    # counts (3, 1), sums (6, 9); N = cluster_size = 0.5 * (1, 1) + 0.5 * (3, 1) = (2, 1)
    assert torch.allclose(q.cluster_size, torch.tensor([2.0, 1.0]))
    assert torch.allclose(q.embed_sum, torch.tensor([[0.5 * 0 + 0.5 * 6], [0.5 * 10 + 0.5 * 9]]))
    n = 3.0
    smoothed = torch.tensor([(2 + 0.1) / (n + 0.2) * n, (1 + 0.1) / (n + 0.2) * n])
    assert torch.allclose(q.codebook.squeeze(1), torch.tensor([3.0, 9.5]) / smoothed)
    before = q.codebook.clone()
    q.eval()(z)  # eval never updates state
    assert torch.equal(q.codebook, before)


def test_ema_update_with_decay_0_9_equals_hand_computed():
    """With decay 0.9 (not 0.5, where decay and 1 - decay are equal): the old state keeps
    weight 0.9 and the batch 0.1; a swap of the two gives other numbers."""
    q = EMAVectorQuantizer(2, 2, decay=0.9, epsilon=0.1)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    q.cluster_size.copy_(torch.tensor([2.0, 1.0]))
    q.embed_sum.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
    z = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 2.0], [9.0, 8.0]]).t().reshape(1, 2, 2, 2)
    q.train()(z)  # codes 0, 0, 0, 1: counts (3, 1), sums ((9, 8), (9, 8))
    cluster = torch.tensor([0.9 * 2 + 0.1 * 3, 0.9 * 1 + 0.1 * 1])  # (2.1, 1.0)
    embed = torch.tensor([[0.9 * 0 + 0.1 * 9, 0.9 * 0 + 0.1 * 8],
                          [0.9 * 10 + 0.1 * 9, 0.9 * 10 + 0.1 * 8]])  # ((0.9, 0.8), (9.9, 9.8))
    assert torch.allclose(q.cluster_size, cluster)
    assert torch.allclose(q.embed_sum, embed)
    n = cluster.sum()  # Laplace smoothing: (N_i + eps) / (n + K eps) * n
    smoothed = (cluster + 0.1) / (n + 2 * 0.1) * n
    assert torch.allclose(q.codebook, embed / smoothed.unsqueeze(1))


def _mixture(centres, per=200, spread=0.05):
    return torch.cat([c + spread * torch.randn(per, c.numel()) for c in centres])


def test_kmeans_finds_the_clusters_of_a_mixture():
    centres = torch.tensor([[4.0, 0.0], [-4.0, 0.0], [0.0, 4.0], [0.0, -4.0], [3.0, 3.0]])
    x = _mixture(centres)
    found, counts = kmeans(x, 5)
    assert torch.cdist(centres, found).min(1).values.max() < 0.1
    assert sorted(counts.tolist()) == [200.0] * 5


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_kmeans_init_on_first_training_batch_only(cls, monkeypatch):
    centres = torch.tensor([[5.0, 0.0, 0.0], [0.0, 5.0, 0.0], [0.0, 0.0, 5.0]])
    z = _mixture(centres, 64)[torch.randperm(192)].view(4, 6, 8, 3).permute(0, 3, 1, 2)
    q = cls(3, 3, kmeans_init=True)
    q.eval()(z)
    assert not q.initialized  # eval never initialises
    q.train()(z)
    assert q.initialized
    assert torch.cdist(centres, q.codebook_vectors()).min(1).values.max() < 0.1
    monkeypatch.setattr(quantize, "kmeans", lambda *a, **k: pytest.fail("k-means ran twice"))
    q(z)


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_restart_revives_codes_forced_dead(cls):
    q = cls(8, 2, restart_after=3).train()
    with torch.no_grad():  # codes 4..7 far away from every input: never chosen
        q.codebook[4:] = 1000.0
        if cls is EMAVectorQuantizer:
            q.embed_sum[4:] = 1000.0
    z = torch.randn(2, 2, 8, 8)
    for _ in range(2):
        q(z)
    assert (q.codebook_vectors()[4:] > 900).all()  # not yet: unused for 2 < 3 steps
    assert q.unused_steps[4:].eq(2).all() and int(q.restarted) == 0
    q(z)
    assert q.codebook_vectors()[4:].abs().max() < 10  # re-seeded from the batch
    assert q.unused_steps[4:].eq(0).all()
    assert int(q.restarted) == 4 and "restarted" not in q.state_dict()  # counted, not saved
    used = torch.zeros(8, dtype=torch.bool)
    for _ in range(5):
        used[q(z).indices.flatten()] = True
    assert used[4:].any()


def test_fsq_index_code_bijection():
    levels = (3, 4, 2)
    q = FiniteScalarQuantizer(levels, len(levels))  # no projection: codes are the grid itself
    assert q.codebook_size == 24
    every = torch.arange(24).view(2, 3, 4)
    codes = q.indices_to_codes(every)  # (2, 3, 2, 3, 4) grid values
    flat = codes.permute(0, 2, 3, 1).reshape(-1, 3)
    assert torch.unique(flat, dim=0).shape[0] == 24  # injective
    assert flat.abs().max() < 1
    # the latent tanh maps onto a grid point is quantized back to that point's index
    scale = torch.tensor(levels) / 2 * (1 - 1e-3)
    latent = torch.atanh(flat / (1 - 1e-3) * (torch.tensor(levels) / 2) / scale)
    latent = latent.view(2, 3, 4, 3).permute(0, 3, 1, 2)
    assert torch.equal(q(latent).indices, every)


def test_fsq_levels_and_codebook_size():
    assert fsq_levels_for(512) == (8, 8, 8) and fsq_levels_for(64) == (8, 8)
    assert math.prod(fsq_levels_for(1000)) == 1000 and fsq_levels_for(7) == (7,)
    cfg = VQVAEConfig(quantizer="fsq", codebook_size=512)
    assert cfg.quantizer_levels == (8, 8, 8) and VQVAE(cfg).quantizer.codebook_size == 512
    with pytest.raises(ConfigError, match="product of the levels"):
        VQVAEConfig(quantizer="fsq", codebook_size=64, fsq_levels=(8, 8, 8))
    with pytest.raises(ConfigError, match="kmeans_init"):
        VQVAEConfig(quantizer="fsq", codebook_size=64, kmeans_init=True)
    cfg = VQVAEConfig(quantizer="fsq", codebook_size=60, fsq_levels=[5, 4, 3])
    assert from_dict(VQVAEConfig, to_dict(cfg)) == cfg  # JSON lists come back as tuples


def test_seed_quantizer_state_is_the_codebook_alone():
    # Stage-1 checkpoints of the seed hold only ``quantizer.codebook``: still loadable.
    cfg = seed_model(16, 1)
    assert (cfg.quantizer, cfg.codebook_size, cfg.code_dim, cfg.beta) == ("vq", 64, 128, 0.25)
    assert not cfg.kmeans_init and cfg.restart_after == 0 and not cfg.cosine
    assert cfg.lookup_dim is None
    model = VQVAE(cfg)
    assert [k for k in model.state_dict() if k.startswith("quantizer.")] == ["quantizer.codebook"]


@pytest.mark.parametrize("name", CONFIGS)
def test_save_load_identical_and_no_reinitialisation(name, tiny_cfg, tmp_path, monkeypatch):
    cfg = replace(tiny_cfg, **CONFIGS[name])
    model = VQVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(8, 1, 8, 8) * 2 - 1
    for _ in range(3):
        out = model(x)
        (F.mse_loss(out.reconstruction, x) + out.quantized.loss).backward()
        opt.step()
    ckpt.write_checkpoint(tmp_path, 3, model, ckpt.VQVAE_KIND, to_dict(cfg), opt)
    loaded = load_autoencoder(tmp_path)
    for key, value in model.state_dict().items():  # EMA sums, flags and counters included
        assert torch.equal(loaded.state_dict()[key], value), key
    monkeypatch.setattr(quantize, "kmeans", lambda *a, **k: pytest.fail("re-initialised"))
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
        model.train(), loaded.train()
        torch.manual_seed(1)
        a = model(x)
        torch.manual_seed(1)
        b = loaded(x)
    assert torch.equal(a.quantized.indices, b.quantized.indices)
    assert torch.equal(a.reconstruction, b.reconstruction)


def test_code_usage_counts_a_sliding_window():
    usage = CodeUsage(4, window=2)
    usage.update(torch.tensor([0, 0, 1]))
    usage.update(torch.tensor([2]))
    assert usage.counts.tolist() == [2, 1, 1, 0]
    assert usage.stats()["dead_codes"] == 1 and usage.stats()["usage"] == 75.0
    usage.update(torch.tensor([[3, 3]]))  # the first step leaves the window
    assert usage.counts.tolist() == [0, 0, 1, 2]
    stats = usage.stats()
    assert stats["dead_codes"] == 2 and stats["used_codes"] == 2
    assert stats["perplexity"] == pytest.approx(math.exp(-(1 / 3) * math.log(1 / 3)
                                                         - (2 / 3) * math.log(2 / 3)))


def test_code_usage_long_windows_use_few_buckets():
    usage = CodeUsage(200, window=100)  # 50 buckets of 2 steps
    assert usage.ring.shape == (50, 200)
    for code in range(150):  # one new code per step
        usage.update(torch.tensor([code]))
    # 150 steps = 75 full buckets; the ring holds the last 50 of them: steps 50..149
    assert usage.counts.nonzero().flatten().tolist() == list(range(50, 150))
    usage.update(torch.tensor([0]))  # a new bucket starts and the oldest (steps 50, 51) leaves
    assert usage.stats()["used_codes"] == 99


@pytest.mark.cuda
@pytest.mark.parametrize("name", VARIANTS)
def test_cpu_and_cuda_agree(name):
    torch.manual_seed(0)
    cpu = VARIANTS[name]().eval()
    gpu = VARIANTS[name]().eval()
    gpu.load_state_dict(cpu.state_dict())
    gpu = gpu.cuda()
    z = torch.randn(3, D, 4, 5)
    a, b = cpu(z), gpu(z.cuda())
    assert torch.equal(a.indices, b.indices.cpu())
    assert torch.allclose(a.quantized, b.quantized.cpu(), atol=1e-5)
    assert torch.equal(gpu.indices_to_codes(b.indices), b.quantized)
    gpu.train()(z.cuda())  # state updates run on the device
    for key, value in gpu.state_dict().items():
        assert value.device.type == "cuda", key


# --- the lookup and the straight-through estimator ------------------------------------------


@pytest.mark.parametrize("n,d,k", [(1, 1, 2), (37, 3, 5), (500, 16, 64), (1000, 8, 513)])
def test_nearest_code_matches_brute_force(n, d, k, monkeypatch):
    monkeypatch.setitem(quantize.CHUNK_ELEMENTS, "cpu", 1000)  # force several chunks
    flat, codebook = torch.randn(n, d), torch.randn(k, d)
    brute = torch.cdist(flat.double(), codebook.double()).argmin(1)
    fast = nearest_code(flat, codebook)
    # Ties are measure-zero for random data; compare distances to be robust anyway.
    d_fast = (flat - codebook[fast]).pow(2).sum(1)
    d_brute = (flat - codebook[brute]).pow(2).sum(1)
    assert torch.allclose(d_fast, d_brute, atol=1e-5)
    assert (fast == brute).float().mean() > 0.99


def test_output_shapes_and_index_round_trip():
    vq = VectorQuantizer(10, 4)
    z = torch.randn(3, 4, 5, 6)
    out = vq(z)
    assert out.quantized.shape == z.shape
    assert out.indices.shape == (3, 5, 6) and out.indices.dtype == torch.long
    assert torch.equal(vq.indices_to_codes(out.indices), out.quantized)
    # indices_to_codes is the exact inverse: the codes of the codes are the same codes
    assert torch.equal(vq(vq.indices_to_codes(out.indices)).indices, out.indices)


def _reference_indices(flat, codebook):
    """The lookup's formula over the whole (N, K) matrix at once: what chunking must reproduce."""
    return torch.addmm(codebook.pow(2).sum(1), flat, codebook.t(), alpha=-2.0).argmin(1)


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000, 1 << 20])
def test_chunked_lookup_is_bit_identical_to_one_matrix(chunk, monkeypatch):
    # Chunk boundaries fall inside, at and past the end of the rows; codes are duplicated so
    # exact ties occur, and argmin must pick the first of them in every chunk.
    monkeypatch.setitem(quantize.CHUNK_ELEMENTS, "cpu", chunk)
    g = torch.Generator().manual_seed(0)
    codebook = torch.randn(37, 6, generator=g)
    codebook[20:30] = codebook[:10]  # exact duplicates: ties
    flat = torch.cat([torch.randn(300, 6, generator=g), codebook[:10], codebook[25:35]])
    fast = nearest_code(flat, codebook)
    assert torch.equal(fast, _reference_indices(flat, codebook))
    assert torch.equal(fast[300:310], torch.arange(10))  # a tie goes to the lower index
    assert torch.equal(fast[310:315], torch.arange(5, 10))
    assert nearest_code(flat[:0], codebook).shape == (0,)


@pytest.mark.parametrize("quantizer", [
    lambda: quantize.VectorQuantizer(16, 8), lambda: quantize.EMAVectorQuantizer(16, 8),
    lambda: quantize.VectorQuantizer(16, 8, cosine=True, lookup_dim=3),
    lambda: quantize.VectorQuantizer(16, 8, cosine=True, lookup_dim=3, estimator="rotation"),
    lambda: FiniteScalarQuantizer((4, 3), 8)])
def test_channels_last_latents_give_the_same_output_and_gradients(quantizer):
    z = torch.randn(3, 8, 5, 4)
    upstream = torch.randn(3, 8, 5, 4)
    results = []
    for layout in (torch.contiguous_format, torch.channels_last):
        torch.manual_seed(0)
        q = quantizer()
        zz = z.clone(memory_format=layout).requires_grad_()
        out = q(zz)
        ((out.quantized * upstream).sum() + out.loss).backward()
        assert out.quantized.is_contiguous(memory_format=layout)  # the layout is kept
        grads = [p.grad for p in q.parameters() if p.grad is not None]
        results.append((out.indices, out.quantized, out.loss, zz.grad, grads))
    (i1, q1, l1, g1, p1), (i2, q2, l2, g2, p2) = results
    assert torch.equal(i1, i2) and torch.equal(q1, q2)
    assert torch.allclose(l1, l2) and torch.allclose(g1, g2, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(p1, p2))


def test_fused_losses_match_autograd_of_the_seed_formula():
    # quantized = z + sg(e - z); loss = mse(sg(z), e) + beta * mse(z, sg(e)): the seed's terms,
    # differentiated by autograd, against the quantizer's hand-written backward.
    vq = VectorQuantizer(6, 3, beta=0.25)
    z = torch.randn(2, 3, 4, 5, requires_grad=True)
    upstream = torch.randn(2, 3, 4, 5)
    out = vq(z)
    ((out.quantized * upstream).sum() + out.loss).backward()
    z_ref = z.detach().clone().requires_grad_()
    codebook = vq.codebook.detach().clone().requires_grad_()
    codes = codebook[out.indices].permute(0, 3, 1, 2)
    quantized = z_ref + (codes - z_ref).detach()
    loss = F.mse_loss(codes, z_ref.detach()) + 0.25 * F.mse_loss(z_ref, codes.detach())
    ((quantized * upstream).sum() + loss).backward()
    assert torch.allclose(out.loss, loss)
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-6)
    assert torch.allclose(vq.codebook.grad, codebook.grad, atol=1e-6)


def test_straight_through_gradient_is_identity():
    vq = VectorQuantizer(8, 3)
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    upstream = torch.randn(2, 3, 4, 4)
    (vq(z).quantized * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert vq.codebook.grad is None  # the straight-through path does not touch the codebook


def test_loss_terms_values_and_gradients():
    vq = VectorQuantizer(6, 2, beta=0.25)
    z = torch.randn(2, 2, 3, 3, requires_grad=True)
    out = vq(z)
    codes = vq.codebook[out.indices].permute(0, 3, 1, 2)
    expected = F.mse_loss(codes, z)
    assert torch.allclose(out.codebook_loss, expected)
    assert torch.allclose(out.commitment_loss, expected)
    assert torch.allclose(out.loss, expected * 1.25)
    # codebook loss moves only the codebook; commitment loss moves only the encoder output
    out.codebook_loss.backward(retain_graph=True)
    assert z.grad is None and vq.codebook.grad.abs().sum() > 0
    vq.codebook.grad = None
    out.commitment_loss.backward()
    assert vq.codebook.grad is None and z.grad.abs().sum() > 0


def test_seed_codebook_init_is_keras_uniform():
    cb = VectorQuantizer(64, 128).codebook
    assert cb.min() >= -0.05 and cb.max() <= 0.05 and cb.std() > 0.02


def test_lookup_chunk_follows_the_device():
    # CPU: cache-sized blocks (1M floats); CUDA: large blocks; never more rows than vectors
    assert quantize.lookup_rows(65536, 512, "cpu") == 2048
    assert quantize.lookup_rows(65536, 512, "cuda") == 65536
    assert quantize.lookup_rows(262144, 16384, "cuda") == 4096  # 64M floats = 256 MiB
    assert quantize.lookup_rows(10, 1 << 30, "cpu") == 1 and quantize.lookup_rows(5, 2, "mps") == 5


@pytest.mark.parametrize("preset", ["seed", "default"])
def test_mixed_precision_keeps_the_lookup_in_fp32(preset):
    """Under bf16 autocast the quantizer runs in fp32: the same latents give the same codes as
    without autocast (the encoder's bf16 convolutions may move near-ties, so the test feeds the
    quantizer the same latents), and a training step works (it used to fail: bf16 x fp32)."""
    model = VQVAE(PRESETS[preset].model(16, 1))
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    model(x)  # k-means initialisation (default preset), then compare without state changes
    model.eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encoder(x)
        mixed = model.quantizer(z)
    plain = model.quantizer(z.float())
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert z.dtype == torch.bfloat16 and mixed.quantized.dtype == torch.float32
    assert torch.equal(mixed.indices, plain.indices)
    assert torch.allclose(mixed.loss, plain.loss)
    from vqvae.training.stage1 import vqvae_losses

    vqvae_losses(x, out)["loss"].backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


# --- the rotation trick -------------------------------------------------------------------------


def _explicit_rotation(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """The paper's (d, d) matrix: R = I - 2 r r^T + 2 q_hat e_hat^T, r = (e_hat + q_hat) / |.|."""
    e_hat, q_hat = e / e.norm(), q / q.norm()
    r = (e_hat + q_hat) / (e_hat + q_hat).norm()
    return torch.eye(len(e), dtype=e.dtype) - 2 * torch.outer(r, r) + 2 * torch.outer(q_hat, e_hat)


def test_rotation_gradient_equals_the_papers_matrix_on_a_hand_example():
    vq = VectorQuantizer(3, 3, estimator="rotation")
    with torch.no_grad():
        vq.codebook.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.5, 0.5], [-1.0, -1.0, 1.0]]))
    e = torch.tensor([[1.0, 0.5, 0.0], [0.2, 1.0, 0.1], [-0.3, -0.6, 0.2]])  # -> codes 0, 1, 2
    z = e.t().reshape(1, 3, 1, 3).requires_grad_()  # (B, D, H, W): 3 vectors in a row
    upstream = torch.tensor([[0.3, -1.0, 0.4], [1.0, 0.2, -0.5], [-0.7, 0.1, 0.9]])
    out = vq(z)
    assert out.indices.flatten().tolist() == [0, 1, 2]
    (out.quantized * upstream.t().reshape(1, 3, 1, 3)).sum().backward()
    got = z.grad.reshape(3, 3).t()
    for i, code in enumerate(vq.codebook.detach().double()):
        rot = _explicit_rotation(e[i].double(), code)
        assert torch.allclose(rot @ (e[i].double() / e[i].norm()), code / code.norm())
        assert torch.allclose(rot @ rot.t(), torch.eye(3, dtype=torch.float64))
        want = code.norm() / e[i].norm() * rot.t() @ upstream[i].double()
        assert torch.allclose(got[i].double(), want, atol=1e-6)
        assert not torch.allclose(got[i], upstream[i], atol=1e-2)  # STE's would be upstream


@pytest.mark.parametrize("cls", [VectorQuantizer, EMAVectorQuantizer])
def test_rotation_acts_in_the_lookup_space(cls):
    # cosine codes in a projection: autograd through the projections and an explicit constant
    # R between the lookup vector and its code must give the quantizer's gradients
    q = cls(8, 5, cosine=True, lookup_dim=3, estimator="rotation").eval()
    z = torch.randn(2, 5, 3, 2, requires_grad=True)
    upstream = torch.randn(2, 5, 3, 2)
    out = q(z)
    (out.quantized * upstream).sum().backward()
    z_ref = z.detach().clone().requires_grad_()
    x = q.space.inward(z_ref.permute(0, 2, 3, 1).reshape(-1, 5))  # (12, 3)
    codes = q.codebook_vectors().detach()[out.indices.flatten()]
    rotations = torch.stack([codes[i].norm() / x[i].norm() * _explicit_rotation(x[i], codes[i])
                             for i in range(len(x))]).detach()  # (12, 3, 3), constants
    rotated = torch.einsum("nij,nj->ni", rotations, x)
    assert torch.allclose(rotated, codes, atol=1e-5)  # the forward value is the code
    ref = q.space.outward(rotated).view(2, 3, 2, 5).permute(0, 3, 1, 2)
    (ref * upstream).sum().backward()
    assert torch.allclose(z.grad, z_ref.grad, atol=1e-5)


@pytest.mark.parametrize("name", ["vq", "vq-all", "ema", "ema-all"])
def test_rotation_changes_the_gradient_not_the_forward(name):
    z = torch.randn(3, D, 4, 5)
    upstream = torch.randn(3, D, 4, 5)
    runs = []
    for estimator in ("ste", "rotation"):
        torch.manual_seed(0)
        q = VARIANTS[name]()
        q.estimator = estimator
        zz = z.clone().requires_grad_()
        outs = [q(zz) for _ in range(3)]  # training mode: k-means, EMA updates, restarts
        ((outs[-1].quantized * upstream).sum() + outs[-1].loss).backward()
        runs.append((outs, zz.grad))
    (ste, ste_grad), (rot, rot_grad) = runs
    for a, b in zip(ste, rot):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.quantized, b.quantized)
        assert all(torch.equal(x, y) for x, y in zip(a[2:], b[2:]))  # the same losses
    assert not torch.allclose(ste_grad, rot_grad, atol=1e-4)


def test_rotation_gradient_invariants_and_degenerate_vectors():
    e, q, g = torch.randn(50, 7), torch.randn(50, 7), torch.randn(50, 7)
    got = quantize.rotation_gradient(e, q, g)
    # R is orthogonal: the norm is scaled by |q| / |e|, and the angle between the gradient and
    # the code is the angle between the encoder vector and the gradient it receives
    scale = q.norm(dim=1) / e.norm(dim=1)
    assert torch.allclose(got.norm(dim=1), scale * g.norm(dim=1), rtol=1e-4)
    assert torch.allclose(F.cosine_similarity(got, e), F.cosine_similarity(g, q), atol=1e-5)
    # e = 0 has no direction: straight through; e = -q: a reflection, finite and orthogonal
    e[0], e[1] = 0.0, -q[1] * 0.5
    got = quantize.rotation_gradient(e, q, g)
    assert torch.equal(got[0], g[0])
    assert torch.isfinite(got).all()
    assert torch.allclose(got[1].norm(), 2 * g[1].norm(), rtol=1e-4)
    assert torch.allclose(F.cosine_similarity(got[1:2], e[1:2]),
                          F.cosine_similarity(g[1:2], q[1:2]), atol=1e-5)


def test_estimator_option_in_config_checkpoint_and_cli(tmp_path, capsys):
    from vqvae.cli import main, make_parser
    from vqvae.config import run_config
    from vqvae.options import given

    assert quantize.ESTIMATORS == ("ste", "rotation")
    cfg = VQVAEConfig(image_size=8, in_channels=1, hidden_channels=8, codebook_size=16,
                      code_dim=8, estimator="rotation")
    assert VQVAE(cfg).quantizer.estimator == "rotation"
    ckpt.write_config(tmp_path / "config.json", ckpt.VQVAE_KIND, to_dict(cfg))
    kind, saved = ckpt.read_config(tmp_path / "config.json")
    assert kind == ckpt.VQVAE_KIND and from_dict(VQVAEConfig, saved) == cfg
    old = {k: v for k, v in saved.items() if k != "estimator"}  # written before the option
    assert from_dict(VQVAEConfig, old).estimator == "ste"
    with pytest.raises(ConfigError, match="fsq has no codebook vectors"):
        VQVAEConfig(quantizer="fsq", codebook_size=64, estimator="rotation")
    with pytest.raises(ConfigError, match="estimator"):
        VQVAEConfig(estimator="gumbel")
    with pytest.raises(ValueError, match="estimator"):
        VectorQuantizer(4, 2, estimator="gumbel")
    args = make_parser().parse_args(["train", "--out", "x", "--estimator", "rotation"])
    assert run_config(args.preset, model=given(args, "model")).model.estimator == "rotation"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--estimator {ste,rotation}" in capsys.readouterr().out
