import pytest
import torch
import torch.nn.functional as F

from vqvae import quantize
from vqvae.fsq import FiniteScalarQuantizer
from vqvae.quantize import VectorQuantizer, nearest_code


@pytest.mark.parametrize("n,d,k", [(1, 1, 2), (37, 3, 5), (500, 16, 64), (1000, 8, 513)])
def test_nearest_code_matches_brute_force(n, d, k, monkeypatch):
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", 1000)  # force several chunks
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
    monkeypatch.setattr(quantize, "CHUNK_ELEMENTS", chunk)
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
