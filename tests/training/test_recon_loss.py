"""``--recon-loss l1``: the loss's pixel term, what a run logs and saves, and the term the GAN's
adaptive weight balances against."""

import json

import pytest
import torch

import vqvae.training.adversarial
import vqvae.training.stage1
from vqvae import VQVAE
from vqvae.cli import main
from vqvae.config import ConfigError, TrainConfig, run_config
from vqvae.training.stage1 import vqvae_losses

from tests import tiny

TINY = tiny.STAGE1_16PX


def test_the_pixel_term_is_the_chosen_loss_and_mse_is_still_logged(tiny_cfg):
    model = VQVAE(tiny_cfg)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    out = model(x)
    error = out.reconstruction - x
    mse, l1 = vqvae_losses(x, out, "mse"), vqvae_losses(x, out, "l1")
    assert "l1_x" not in mse and torch.allclose(mse["mse_x"], error.pow(2).mean())
    assert torch.allclose(l1["l1_x"], error.abs().mean())
    assert torch.allclose(l1["mse_x"], mse["mse_x"])  # logged under both, so curves compare
    quantizer = out.quantized.loss
    assert torch.allclose(mse["loss"], mse["mse_x"] + quantizer)
    assert torch.allclose(l1["loss"], l1["l1_x"] + quantizer)
    # the L1 term's gradient on a pixel is its error's sign over the pixel count
    rec = out.reconstruction.detach().requires_grad_(True)
    torch.nn.functional.l1_loss(rec, x).backward()
    assert torch.allclose(rec.grad, error.detach().sign() / x.numel())


def test_the_default_preset_trains_with_l1_and_cosine_and_the_seed_stays_faithful():
    default = run_config("default").train
    assert (default.recon_loss, default.schedule) == ("l1", "cosine")
    assert run_config("seed").train == TrainConfig()  # MSE at a constant rate, as the seed
    mse = run_config("default", train={"recon_loss": "mse", "schedule": "constant"}).train
    assert (mse.recon_loss, mse.schedule) == ("mse", "constant")


def test_a_bad_recon_loss_is_named():
    with pytest.raises(ConfigError, match="recon_loss"):
        TrainConfig(recon_loss="l2")


def test_an_l1_run_saves_logs_and_balances_the_gan_against_it(tmp_path, monkeypatch):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    assert main(["train", *TINY, "--recon-loss", "l1", "--steps", "4", "--out", str(base)]) == 0
    config = json.loads((base / "config.json").read_text())
    assert config["config"]["train"]["recon_loss"] == "l1"
    record = json.loads((base / "train.jsonl").read_text().splitlines()[0])
    assert {"l1_x", "mse_x", "mse_e", "mse_z"} <= set(record)

    pixel_terms, balanced = [], []
    real_losses = vqvae.training.stage1.vqvae_losses
    real_weight = vqvae.training.adversarial.adaptive_weight

    def losses(x, out, recon="mse", *frequency):
        terms = real_losses(x, out, recon, *frequency)
        pixel_terms.append(terms[f"{recon}_x"].item())
        return terms

    def weight(rec, adv, last):
        balanced.append(rec.item())
        return real_weight(rec, adv, last)

    monkeypatch.setattr(vqvae.training.stage1, "vqvae_losses", losses)
    monkeypatch.setattr(vqvae.training.adversarial, "adaptive_weight", weight)
    # the fine-tune inherits the run's pixel loss, and the adaptive weight balances that term
    assert main(["finetune-decoder", str(base), "--steps", "3", "--every", "3",
                 "--gan-weight", "0.5", "--disc-channels", "8", "--out", str(tuned)]) == 0
    assert json.loads((tuned / "config.json").read_text())["config"]["train"]["recon_loss"] == "l1"
    assert len(balanced) == 3 and balanced == pytest.approx(pixel_terms[:3])
