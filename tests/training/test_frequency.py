"""``--freq-weight``: the focal frequency loss against a hand computation, its limits, and a run
that trains, logs and saves with it."""

import json
import math

import pytest
import torch

from vqvae import VQVAE
from vqvae.cli import main
from vqvae.config import ConfigError, TrainConfig
from vqvae.training.frequency import focal_frequency_loss
from vqvae.training.stage1 import vqvae_losses

from tests import tiny

TINY = tiny.STAGE1_16PX


def dft2(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal 2-D DFT of one (H, W) image by its definition, as a complex matrix."""
    h, w = x.shape
    rows = torch.tensor([[complex(math.cos(-2 * math.pi * u * y / h),
                                  math.sin(-2 * math.pi * u * y / h)) for y in range(h)]
                         for u in range(h)], dtype=torch.complex128)
    cols = torch.tensor([[complex(math.cos(-2 * math.pi * v * x_ / w),
                                  math.sin(-2 * math.pi * v * x_ / w)) for v in range(w)]
                         for x_ in range(w)], dtype=torch.complex128)
    return rows @ x.to(torch.complex128) @ cols / math.sqrt(h * w)


@pytest.mark.parametrize("alpha", [1.0, 2.0])
def test_the_loss_matches_a_hand_computation(alpha):
    gen = torch.Generator().manual_seed(0)
    rec, real = torch.randn(2, 3, 4, 6, generator=gen), torch.randn(2, 3, 4, 6, generator=gen)
    total = 0.0
    for b in range(2):
        for c in range(3):
            diff = dft2(rec[b, c].double()) - dft2(real[b, c].double())
            distance = diff.abs() ** 2
            weight = diff.abs() ** alpha / (diff.abs() ** alpha).max()
            total += float((weight * distance).sum())
    expected = total / rec.numel()
    assert float(focal_frequency_loss(rec, real, alpha)) == pytest.approx(expected, rel=1e-5)


def test_zero_when_equal_and_mse_when_alpha_is_zero():
    x = torch.randn(3, 1, 8, 8)
    assert float(focal_frequency_loss(x, x)) == 0.0
    y = x + 0.1 * torch.randn_like(x)
    assert float(focal_frequency_loss(y, x)) > 0
    # every weight 1: Parseval's theorem makes it the mean squared pixel error
    assert float(focal_frequency_loss(y, x, 0.0)) == pytest.approx(
        float((y - x).pow(2).mean()), rel=1e-5)


def test_the_weights_are_constants_and_favour_the_worst_frequency():
    x = torch.zeros(1, 1, 8, 8)
    # the reconstruction misses a faint constant and a strong checkerboard (the top frequency)
    checker = (torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1
    rec = (0.1 + 0.5 * checker.float()).view(1, 1, 8, 8).requires_grad_(True)
    loss = focal_frequency_loss(rec, x)
    loss.backward()
    # spectrum of the error: 0.1 * 8 at (0, 0), 0.5 * 8 at (4, 4); weights 0.2 and 1
    assert float(loss.detach()) == pytest.approx((0.2 * 0.8 ** 2 + 1.0 * 4.0 ** 2) / 64, rel=1e-5)
    # with the weights constant, the gradient is 2 * w * F^H(F(e)) / n: the constant part's
    # share of it is cut to 0.2 of what an MSE would give, the checkerboard's kept whole
    mse_grad = 2 * rec.detach() / 64
    expected = 2 * (0.2 * 0.1 + 0.5 * checker.float()) / 64
    assert torch.allclose(rec.grad.view(8, 8), expected, atol=1e-6)
    assert not torch.allclose(rec.grad, mse_grad)


def test_bad_shapes_and_values_are_named():
    with pytest.raises(ValueError, match="focal_frequency_loss"):
        focal_frequency_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ConfigError, match="freq_weight"):
        TrainConfig(freq_weight=-1.0)
    with pytest.raises(ConfigError, match="freq_alpha"):
        TrainConfig(freq_alpha=-0.5)


def test_the_loss_term_is_added_times_its_weight(tiny_cfg):
    model = VQVAE(tiny_cfg)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    out = model(x)
    plain, with_freq = vqvae_losses(x, out, "l1"), vqvae_losses(x, out, "l1", 0.5, 1.0)
    assert "freq_x" not in plain
    expected = focal_frequency_loss(out.reconstruction, x, 1.0)
    assert torch.allclose(with_freq["freq_x"], expected)
    assert torch.allclose(with_freq["loss"], plain["loss"] + 0.5 * expected)


def test_a_run_with_the_loss_trains_logs_saves_and_resumes(tmp_path):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--freq-weight", "1", "--schedule", "constant", "--steps", "4",
                 "--out", str(run)]) == 0
    config = json.loads((run / "config.json").read_text())["config"]["train"]
    assert (config["freq_weight"], config["freq_alpha"]) == (1.0, 1.0)
    record = json.loads((run / "train.jsonl").read_text().splitlines()[0])
    assert record["freq_x"] > 0
    assert main(["train", "--resume", str(run), "--steps", "8"]) == 0
    assert json.loads((run / "train.jsonl").read_text().splitlines()[-1])["freq_x"] > 0
