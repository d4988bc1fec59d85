"""SSIM (metrics.ssim) against its definition, and its place in the held-out metrics."""

import math

import numpy as np
import pytest
import torch

from vqvae import VQVAE, to_float
from vqvae.evaluation.metrics import evaluate_autoencoder, ssim, ssim_window


def _reference_ssim(x: np.ndarray, y: np.ndarray, data_range: float, side: int,
                    sigma: float = 1.5) -> float:
    """Wang et al. (2004) written out slowly: for every channel and every window position, the
    Gaussian-weighted means, variances and covariance, then SSIM; the mean over all of them."""
    offsets = np.arange(side) - (side - 1) / 2
    g = np.exp(-offsets**2 / (2 * sigma**2))
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    scores = []
    for c in range(x.shape[0]):
        for i in range(x.shape[1] - side + 1):
            for j in range(x.shape[2] - side + 1):
                a, b = x[c, i:i + side, j:j + side], y[c, i:i + side, j:j + side]
                mu_a, mu_b = (w * a).sum(), (w * b).sum()
                var_a, var_b = (w * (a - mu_a) ** 2).sum(), (w * (b - mu_b) ** 2).sum()
                cov = (w * (a - mu_a) * (b - mu_b)).sum()
                scores.append((2 * mu_a * mu_b + c1) * (2 * cov + c2)
                              / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)))
    return float(np.mean(scores))


def _pair(shape, noise=0.3):
    x = torch.rand(shape) * 2 - 1
    return x, (x + noise * torch.randn(shape)).clamp(-1, 1)


def test_ssim_of_an_image_with_itself_is_one():
    x = torch.rand(3, 2, 16, 16) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(3), atol=1e-6)


def test_ssim_is_symmetric_and_bounded():
    x, y = _pair((4, 3, 20, 13))
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-7)
    assert ((ssim(x, y) > -1) & (ssim(x, y) < 1)).all()


def test_ssim_falls_as_noise_grows():
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    noise = torch.randn_like(x)
    scores = [ssim(x, (x + s * noise).clamp(-1, 1)) for s in (0.0, 0.05, 0.2, 0.5, 1.0)]
    for better, worse in zip(scores, scores[1:]):
        assert (worse < better).all()


@pytest.mark.parametrize("shape,side", [((2, 1, 16, 16), 11), ((2, 3, 12, 14), 11),
                                        ((2, 1, 8, 8), 7), ((1, 2, 10, 17), 9)])
def test_ssim_matches_the_definition_written_out(shape, side):
    # scikit-image is not a dependency: an independent loop over windows is the reference, on
    # the [0, 255] scale with L = 255, the usual convention that [-1, 1] images are scored on.
    assert ssim_window(shape[2], shape[3]) == side
    x, y = _pair(shape)
    got = ssim(x, y)
    for b in range(shape[0]):
        pixels = [(t[b].double().numpy() + 1) * 127.5 for t in (x, y)]
        want = _reference_ssim(*pixels, 255.0, side)
        assert math.isclose(got[b].item(), want, abs_tol=1e-5)


def test_ssim_depends_on_the_range_not_on_the_units():
    x, y = _pair((2, 1, 16, 16))
    for scale in (0.5, 127.5):
        assert torch.allclose(ssim(x * scale, y * scale, data_range=2 * scale), ssim(x, y),
                              atol=1e-5)


def test_ssim_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 9))


def test_held_out_metrics_report_ssim(tiny_cfg):
    model = VQVAE(tiny_cfg)
    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    metrics = evaluate_autoencoder(model, images, batch_size=2)
    x = to_float(images)
    model.eval()
    with torch.no_grad():
        want = ssim(model.reconstruct(x), x).mean().item()
        want_noq = ssim(model.reconstruct(x, quantize=False), x).mean().item()
    assert math.isclose(metrics["ssim"], want, abs_tol=1e-5)
    assert math.isclose(metrics["ssim_noq"], want_noq, abs_tol=1e-5)
