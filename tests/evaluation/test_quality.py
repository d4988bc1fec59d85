"""Sample quality: the Fréchet distance against hand computations, the classifier and judge()."""

import numpy as np
import pytest
import torch

import vqvae
from vqvae.evaluation.quality import (Classifier, ClassifierConfig, accuracy, copied_share,
                                      features, frechet_distance, judge, train_classifier)


def gaussian(n=400, dim=6, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim)) + shift


def test_frechet_of_identical_sets_is_zero():
    a = gaussian()
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_frechet_grows_with_the_shift():
    a, b = gaussian(seed=0), gaussian(seed=1)
    distances = [frechet_distance(a, b + s) for s in (0.0, 0.5, 1.0, 2.0)]
    assert all(x < y for x, y in zip(distances, distances[1:]))
    # A pure shift of one set by s adds exactly |s|^2 * dim to the mean term.
    assert frechet_distance(a, a + 2.0) == pytest.approx(4.0 * a.shape[1], rel=1e-9)


def test_frechet_matches_the_1d_formula():
    a, b = np.array([[0.0], [1.0], [2.0], [5.0]]), np.array([[3.0], [3.5], [7.0]])
    # 1-D Gaussians: (m_a - m_b)^2 + (s_a - s_b)^2, sample variances with ddof=1.
    m_a, m_b = 2.0, 13.5 / 3
    s_a = np.sqrt(((a - m_a) ** 2).sum() / 3)
    s_b = np.sqrt(((b - m_b) ** 2).sum() / 2)
    assert frechet_distance(a, b) == pytest.approx((m_a - m_b) ** 2 + (s_a - s_b) ** 2, rel=1e-9)


def test_frechet_matches_scipy_sqrtm():
    from scipy.linalg import sqrtm

    a, b = gaussian(dim=5, seed=2), gaussian(dim=5, shift=0.3, seed=3) * 1.5
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum()
                + np.trace(ca + cb - 2 * sqrtm(ca @ cb).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-7)


def test_frechet_rejects_mismatched_widths():
    with pytest.raises(ValueError, match="one width"):
        frechet_distance(np.zeros((4, 3)), np.zeros((4, 2)))


@pytest.mark.parametrize("size", [8, 16, 32])
def test_classifier_shapes(size):
    model = Classifier(channels=3, image_size=size, classes=7, feature_dim=24)
    x = torch.randn(5, 3, size, size)
    assert model(x).shape == (5, 7)
    assert model.features(x).shape == (5, 24)


def test_config_is_validated():
    with pytest.raises(vqvae.ConfigError, match="steps"):
        ClassifierConfig(steps=0)


@pytest.fixture(scope="module")
def digits():
    splits = vqvae.load_splits(vqvae.DataConfig(source="digits", size=8))
    small = splits.train.subset(torch.arange(400))
    cfg = ClassifierConfig(steps=60, batch_size=64, seed=0)
    return splits, train_classifier(small.images, small.labels, 10, cfg)


def test_training_is_seeded_and_learns(digits):
    splits, model = digits
    assert not model.training
    small = splits.train.subset(torch.arange(400))
    again = train_classifier(small.images, small.labels, 10,
                             ClassifierConfig(steps=60, batch_size=64, seed=0))
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(p, q)
    # 60 steps on 400 digits: far above the 10% of chance on the held-out images.
    assert accuracy(model, splits.test.images, splits.test.labels) > 0.6


def test_features_and_judge(digits):
    splits, model = digits
    reference = features(model, splits.train.images)
    assert reference.dtype == np.float64 and reference.shape == (len(splits.train), 64)
    real = judge(model, splits.test.images, reference)
    assert set(real) == {"n", "confidence", "confident", "coverage", "classes", "frechet"}
    assert real["n"] == len(splits.test) and real["classes"] == 10
    assert 0.1 <= real["confidence"] <= 1.0 and 0.0 <= real["confident"] <= 1.0
    assert 0 <= real["coverage"] <= 10
    # Blank images are judged worse than real ones: farther away, one class at most.
    blank = judge(model, torch.zeros(50, 1, 8, 8, dtype=torch.uint8), reference)
    assert blank["frechet"] > 2 * real["frechet"]
    assert blank["coverage"] <= 1 and real["coverage"] >= 5
    assert "frechet" not in judge(model, splits.test.images[:3])


def test_copied_share_counts_exact_copies_of_training_grids():
    train = torch.randint(0, 5, (50, 3, 4))
    assert copied_share(train[:10], train) == 1.0
    fresh = train[:4].clone()
    fresh[:, 0, 0] = 5  # a code no training grid has
    assert copied_share(fresh, train) == 0.0
    assert copied_share(torch.cat([train[:3], fresh]), train) == pytest.approx(3 / 7)
    assert copied_share(train[:2].int(), train) == 1.0  # dtype does not matter
    with pytest.raises(ValueError, match="shaped like"):
        copied_share(torch.zeros(2, 4, 3, dtype=torch.long), train)
