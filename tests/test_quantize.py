import pytest
import torch
import torch.nn.functional as F

from vqvae import quantize
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
