"""The GAN half of stage 1: discriminator shapes, loss signs, the adaptive weight against a hand
computation, LeCAM, DiffAugment, and checkpoints that resume a GAN run exactly."""

import pytest
import torch
from safetensors.torch import load_file

from vqvae.cli import main
from vqvae.models.discriminator import (LeCam, PatchDiscriminator, adaptive_weight, diff_augment,
                                 discriminator_loss, generator_loss, patchgan_layers)

from tests import tiny

BASE = tiny.STAGE1_16PX
TINY = tiny.edit(BASE, gan_weight="0.5", gan_start=2, disc_channels=8, lecam="0.01", diffaug=True)


@pytest.mark.parametrize("size,channels", [(16, 1), (32, 3), (64, 3)])
def test_patch_discriminator_scores_patches(size, channels):
    layers = patchgan_layers(size, 3)
    assert layers == min(3, {16: 2, 32: 3, 64: 4}[size])
    logits = PatchDiscriminator(channels, 8, layers)(torch.randn(2, channels, size, size))
    assert logits.shape[:2] == (2, 1) and min(logits.shape[2:]) >= 1


@pytest.mark.parametrize("kind", ["hinge", "ns"])
def test_loss_signs(kind):
    confident = discriminator_loss(torch.full((4,), 5.0), torch.full((4,), -5.0), kind)
    fooled = discriminator_loss(torch.full((4,), -5.0), torch.full((4,), 5.0), kind)
    assert confident < 0.01 and fooled > 1.0
    if kind == "hinge":
        assert confident == 0  # both margins met
    # the generator gains by raising the discriminator's logits on its reconstructions
    assert generator_loss(torch.full((4,), 2.0), kind) < generator_loss(torch.zeros(4), kind)


def test_adaptive_weight_matches_a_hand_computation():
    torch.manual_seed(0)
    last = torch.nn.Linear(3, 2, bias=False)  # the decoder's last layer: y = W z
    z, x = torch.randn(5, 3), torch.randn(5, 2)
    y = last(z)
    rec = (y - x).pow(2).mean()
    adv = -y.mean()
    weight = adaptive_weight(rec, adv, last.weight)
    # d rec / dW = 2/n (Wz - x)^T z ; d adv / dW = -1/n 1^T z, with n = 10 outputs
    with torch.no_grad():
        g_rec = 2 / 10 * (z @ last.weight.t() - x).t() @ z
        g_adv = -1 / 10 * torch.ones(2, 5) @ z
    assert weight.item() == pytest.approx((g_rec.norm() / (g_adv.norm() + 1e-4)).item(),
                                          rel=1e-5)
    assert not weight.requires_grad


def test_lecam_pulls_logits_towards_the_other_sides_average():
    reg = LeCam(decay=0.0)  # averages = the current batch
    reg.update(torch.tensor(-1.0), torch.tensor(1.0))
    assert reg(torch.full((4,), -1.0), torch.full((4,), 1.0)).item() == 0.0  # already close
    reg.update(torch.tensor(3.0), torch.tensor(-3.0))
    apart = reg(torch.full((4,), 3.0), torch.full((4,), -3.0))
    assert apart.item() == pytest.approx(2 * 36.0) and reg.real_mean.item() == 3.0
    slow = LeCam(decay=0.9)
    slow.update(torch.tensor(10.0), torch.tensor(0.0))
    assert slow.real_mean.item() == pytest.approx(1.0)  # a moving average


def test_diff_augment_is_differentiable_and_seeded():
    images = torch.rand(4, 3, 16, 16, requires_grad=True)
    a = diff_augment(images, torch.Generator().manual_seed(1))
    b = diff_augment(images, torch.Generator().manual_seed(1))
    assert a.shape == images.shape and torch.equal(a, b) and not torch.equal(a, images)
    a.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_gan_run_resumes_exactly_with_its_discriminator(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    flat = [*TINY, "--schedule", "constant"]  # see tests/cli/test_cli.py's resume test
    with pytest.warns(UserWarning, match="--diffaug at 16 px kept the discriminator"):
        assert main(["train", *flat, "--steps", "8", "--out", str(a)]) == 0
    assert main(["train", *flat, "--steps", "4", "--out", str(b)]) == 0
    assert main(["train", "--resume", str(b), "--steps", "8"]) == 0
    for name in ("model.safetensors", "adversary.safetensors"):
        wa = load_file(a / "checkpoints" / "step-0000008" / name)
        wb = load_file(b / "checkpoints" / "step-0000008" / name)
        assert wa.keys() == wb.keys() and any(k.startswith("module.disc") for k in wa) == (
            name == "adversary.safetensors")
        for key in wa:
            assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-5), (name, key)
    log = (a / "train.jsonl").read_text()
    assert '"gan_d"' in log and '"logits_real"' in log


def test_gan_resume_without_discriminator_state_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "4", "--out", str(run)]) == 0
    (run / "checkpoints" / "step-0000004" / "adversary.safetensors").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--steps", "8"]) == 2
    err = capsys.readouterr().err
    assert "adversary" in err and err.count("\n") == 1


def test_perceptual_loss_without_weights_is_an_error(tmp_path, capsys):
    assert main(["train", "--data", "digits", "--perceptual-weight", "0.1",
                 "--out", str(tmp_path / "x")]) == 2
    assert "perceptual-weights" in capsys.readouterr().err


def test_finetune_decoder_keeps_the_codes_and_the_priors_on_them(tmp_path, capsys):
    from vqvae import encode_dataset, load_autoencoder

    base, tuned, other = tmp_path / "base", tmp_path / "tuned", tmp_path / "other"
    assert main(["train", *BASE, "--steps", "4", "--out", str(base)]) == 0
    assert main(["finetune-decoder", str(base), "--steps", "4", "--gan-weight", "0.5",
                 "--disc-channels", "8", "--out", str(tuned)]) == 0
    from vqvae.training.stage1 import finetune_config, load_run_config

    # a tenth of the base run's learning rate unless one is given
    assert load_run_config(tuned).train.lr == pytest.approx(load_run_config(base).train.lr / 10)
    assert finetune_config(base, {"lr": 5e-4}).train.lr == 5e-4
    before, after = load_autoencoder(base).state_dict(), load_autoencoder(tuned).state_dict()
    for key in before:
        if not key.startswith("decoder."):  # encoder, codebook, BatchNorm statistics
            assert torch.equal(before[key], after[key]), key
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    codes = encode_dataset(base, progress=False)
    tuned_codes = encode_dataset(tuned, progress=False)
    assert torch.equal(codes.splits["train"].codes, tuned_codes.splits["train"].codes)
    assert tuned_codes.stage1_sha256 != codes.stage1_sha256  # its own checkpoint ...
    codes_file, prior = tmp_path / "codes.safetensors", tmp_path / "prior"
    assert main(["encode", str(base), "--out", str(codes_file)]) == 0
    options = tiny.prior(batch_size=4, every=2, eval_count=None, steps=2)
    assert main(["train-prior", "--codes", str(codes_file), *options, "--out", str(prior)]) == 0
    # ... but it decodes the base model's codes: priors trained on them sample through it
    assert main(["sample", str(prior), "--decoder", str(tuned), "--n", "4",
                 "--out", str(tmp_path / "s")]) == 0
    assert main(["train", *BASE, "--steps", "2", "--seed", "1", "--out", str(other)]) == 0
    capsys.readouterr()
    assert main(["sample", str(prior), "--decoder", str(other), "--n", "4"]) == 2
    assert "another stage-1 model" in capsys.readouterr().err


def test_perceptual_loss_trains_with_weights_from_a_file(tmp_path, capsys):
    from safetensors.torch import save_file

    from vqvae.models.lpips import LPIPS

    weights = tmp_path / "lpips.safetensors"
    save_file({k: v.contiguous() for k, v in LPIPS().state_dict().items()}, str(weights))
    run = tmp_path / "run"
    assert main(["train", *BASE, "--steps", "2", "--every", "2", "--perceptual-weight", "0.5",
                 "--perceptual-weights", str(weights), "--out", str(run)]) == 0
    assert '"perceptual"' in (run / "train.jsonl").read_text()
    capsys.readouterr()
    assert main(["train", *BASE, "--perceptual-weight", "0.5", "--perceptual-weights",
                 str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
