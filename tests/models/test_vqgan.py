import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from vqvae import PRESETS, VQVAE, ConfigError, VQVAEConfig, default_model, load_autoencoder
from vqvae.store import checkpoint as ckpt
from vqvae.cli import main, make_parser
from vqvae.config import (from_dict, quantizer_options, run_config, seed_model, to_dict,
                          vqgan_model)
from vqvae.models.discriminator import adaptive_weight
from vqvae.data.images import to_uint8
from vqvae.evaluation.metrics import evaluate_autoencoder, psnr
from vqvae.options import given
from vqvae.models.vqgan import GroupNormResBlock, SelfAttention, Upsample

from tests.tiny import stage1 as tiny_stage1  # tiny(): a vqgan config


def tiny(size=8, channels=1, channel_mult=(1, 2), **kw):
    """A vqgan small enough for CPU tests: widths 8 x channel_mult, GroupNorm of 4 groups."""
    return VQVAEConfig(**{"image_size": size, "in_channels": channels, "architecture": "vqgan",
                          "hidden_channels": 8, "channel_mult": channel_mult,
                          "downsamples": max(1, len(channel_mult) - 1), "res_blocks": 1,
                          "attention": True, "norm_groups": 4, "codebook_size": 16,
                          "code_dim": 8, **kw})


def _count(module, kind):
    return sum(isinstance(m, kind) for m in module.modules())


@pytest.mark.parametrize("channel_mult,downsamples,res_blocks,attention,channels,size", [
    ((1, 1), 1, 1, True, 1, 8), ((1, 2), 1, 2, False, 3, 12), ((1, 2, 2), 2, 1, True, 3, 16),
    ((1, 1, 2, 4), 3, 1, True, 1, 16), ((), 2, 1, False, 1, 8), ((2, 1, 1), 2, 2, True, 3, 24)])
def test_shapes_and_layers_swept_over_configs(channel_mult, downsamples, res_blocks, attention,
                                              channels, size):
    cfg = replace(tiny(size, channels, channel_mult), downsamples=downsamples,
                  res_blocks=res_blocks, attention=attention)
    model = VQVAE(cfg)
    x = torch.rand(2, channels, size, size) * 2 - 1
    out = model(x)
    s = size // 2**downsamples
    assert cfg.latent_size == s
    assert out.reconstruction.shape == x.shape
    assert out.latents.shape == (2, cfg.code_dim, s, s)
    assert out.quantized.indices.shape == (2, s, s)
    # Levels: one stride-2 conv and one upsampling between consecutive levels.
    strided = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2)]
    assert len(strided) == downsamples == _count(model.decoder, Upsample)
    # Blocks: res_blocks per level and two in the middle; attention after each lowest-level
    # block and in the middle, in both halves.
    for half in (model.encoder, model.decoder):
        assert _count(half, GroupNormResBlock) == res_blocks * (downsamples + 1) + 2
        assert _count(half, SelfAttention) == (res_blocks + 1 if attention else 0)
    widths = cfg.level_widths
    assert model.encoder[-1].in_channels == model.decoder[0].out_channels == widths[-1]
    assert model.last_layer().shape == (channels, widths[0], 3, 3)


def test_self_attention_matches_explicit_softmax():
    attn = SelfAttention(8, groups=2)
    x = torch.randn(2, 8, 3, 5)
    q, k, v = attn.qkv(attn.norm(x)).flatten(2).chunk(3, dim=1)  # (B, C, HW) each
    weights = torch.softmax(q.transpose(1, 2) @ k / 8**0.5, dim=-1)  # (B, HW, HW)
    expected = x + attn.proj((v @ weights.transpose(1, 2)).view_as(x))
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_channels_last_gives_the_same_output():
    """Training runs channels-last (TrainConfig's default); attention reshapes by hand."""
    model = VQVAE(tiny(16, 3, (1, 2, 2))).eval()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        plain = model.reconstruct(x, quantize=False)
        model.to(memory_format=torch.channels_last)
        last = model.reconstruct(x.contiguous(memory_format=torch.channels_last), quantize=False)
    assert torch.allclose(plain, last, atol=1e-5)


def test_residual_block_shortcut_only_when_width_changes():
    same, wider = GroupNormResBlock(8, 8, groups=4), GroupNormResBlock(8, 16, groups=4)
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(same(x), x + same.body(x))
    assert isinstance(wider.shortcut, torch.nn.Conv2d)
    assert torch.allclose(wider(x), wider.shortcut(x) + wider.body(x))


@pytest.mark.parametrize("quantizer", [{}, {"cosine": True, "lookup_dim": 4},
                                       {"quantizer": "fsq", "fsq_levels": (4, 4)}])
def test_decode_indices_equals_quantized_path(quantizer):
    model = VQVAE(tiny(16, 3, (1, 2, 2), **quantizer)).eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        q = model.encode(x)
        assert torch.allclose(model.decode_indices(q.indices), model.decode(q.quantized),
                              atol=1e-6)
        assert torch.allclose(model.reconstruct(x), model(x).reconstruction, atol=1e-6)


def test_gradients_reach_every_parameter():
    model = VQVAE(tiny())
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    out = model(x)
    ((out.reconstruction - x).pow(2).mean() + out.quantized.loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not missing


def test_output_is_unsquashed_and_every_picture_clamps():
    """No tanh: the decoder can overshoot [-1, 1]; pictures (to_uint8) and the held-out
    metrics clamp, so they score what is shown."""
    model = VQVAE(tiny()).eval()
    with torch.no_grad():
        model.decoder[-1].bias.fill_(10.0)  # push every output above 1
        x = torch.rand(4, 1, 8, 8) * 2 - 1
        rec = model.reconstruct(x)
    assert rec.min() > 1
    assert torch.equal(to_uint8(rec), torch.full_like(to_uint8(rec), 255))
    images = to_uint8(x)
    metrics = evaluate_autoencoder(model, images)
    mse = (1.0 - (images.float() / 127.5 - 1)).pow(2).flatten(1).mean(1)  # vs clamped output
    assert metrics["mse"] == pytest.approx(mse.mean().item(), rel=1e-5)
    assert metrics["psnr"] == pytest.approx(psnr(mse).mean().item(), rel=1e-5)


def test_last_layer_is_the_decoders_final_weight_for_both_architectures():
    vqgan, resnet = VQVAE(tiny()), VQVAE(seed_model(16, 1))
    assert vqgan.last_layer() is vqgan.decoder[-1].weight  # conv_out
    assert resnet.last_layer() is resnet.decoder[-2].weight  # the ConvTranspose2d before tanh
    for model, size in ((vqgan, 8), (resnet, 16)):
        assert isinstance(model.last_layer(), torch.nn.Parameter)
        x = torch.rand(4, 1, size, size) * 2 - 1
        rec = model(x).reconstruction
        weight = adaptive_weight((rec - x).abs().mean(), -rec.mean(), model.last_layer())
        assert torch.isfinite(weight) and weight > 0


def test_mixed_precision_forward():
    model = VQVAE(tiny(16, 3, (1, 2, 2)))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert out.reconstruction.shape == (2, 3, 16, 16)
    assert torch.isfinite(out.reconstruction.float()).all()


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    cfg = tiny(16, 3, (1, 2, 2), cosine=True, lookup_dim=4)
    model = VQVAE(cfg)
    with torch.no_grad():
        for p in model.parameters():  # not the initial values
            p.add_(torch.randn_like(p), alpha=0.01)
    model.eval()
    x = torch.rand(4, 3, 16, 16) * 2 - 1
    ckpt.write_checkpoint(tmp_path, 1, model, ckpt.VQVAE_KIND, to_dict(cfg))
    saved = json.loads((tmp_path / "checkpoints/step-0000001/config.json").read_text())
    assert saved["config"]["channel_mult"] == [1, 2, 2]
    loaded = load_autoencoder(tmp_path)
    assert loaded.cfg == cfg
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
        assert torch.equal(loaded.encode(x).indices, model.encode(x).indices)


def test_old_config_without_the_new_fields_loads_as_resnet(tmp_path):
    cfg = seed_model(16, 1)
    new = ("architecture", "channel_mult", "attention", "norm_groups")
    old = {k: v for k, v in to_dict(cfg).items() if k not in new}
    assert from_dict(VQVAEConfig, old) == cfg and cfg.architecture == "resnet"
    model = VQVAE(cfg).eval()  # an old checkpoint: the same weights' names as before
    ckpt.save(tmp_path / "old", model, ckpt.VQVAE_KIND, old)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(load_autoencoder(tmp_path / "old").reconstruct(x), model.reconstruct(x))


@pytest.mark.parametrize("changes,words", [
    ({"architecture": "unet"}, "architecture must be one of"),
    ({"channel_mult": (1, 2)}, r"channel_mult 1,2 has 2 levels, .* downsamples is 2"),
    ({"channel_mult": (1, 0, 2)}, "channel_mult must be integers >= 1"),
    ({"hidden_channels": 6}, r"norm_groups 4 .* \(6, 12, 12\).* --norm-groups .* \(e.g. 6\)"),
    ({"res_blocks": 0}, "vqgan needs res_blocks >= 1"),
    ({"bn_eps": 1e-5}, r"'vqgan' has no use for bn_eps \(resnet only\)"),
    ({"image_size": 18}, "not divisible by 2.downsamples = 4: .* a shorter --channel-mult"),
    ({"norm_groups": 0}, "norm_groups must be >= 1"),
])
def test_bad_vqgan_configs_are_named(changes, words):
    with pytest.raises(ConfigError, match=words):
        replace(tiny(16, 1, (1, 2, 2)), **changes)


@pytest.mark.parametrize("changes,words", [
    ({"attention": True}, r"'resnet' has no use for attention \(vqgan only\)"),
    ({"channel_mult": (1, 2, 2), "norm_groups": 8}, r"channel_mult \(vqgan only\), norm_groups"),
])
def test_vqgan_options_on_resnet_are_refused(changes, words):
    with pytest.raises(ConfigError, match=words):
        replace(seed_model(16, 1), **changes)


@pytest.mark.parametrize("size,channels,mult,grid", [
    (256, 3, (1, 1, 2, 4), 32), (128, 3, (1, 1, 2, 4), 16), (64, 3, (1, 1, 2, 4), 8),
    (32, 1, (1, 1, 2), 8), (16, 1, (1, 1), 8), (8, 1, (1, 1), 4), (100, 3, (1, 1, 2), 25),
    (30, 1, (1, 1), 15),
    (96, 3, (1, 1, 2, 4), 12)])
def test_vqgan_preset_fits_the_image_size(size, channels, mult, grid):
    cfg = vqgan_model(size, channels)
    assert cfg.channel_mult == mult and cfg.downsamples == len(mult) - 1
    assert cfg.level_widths == tuple(128 * m for m in mult) and cfg.latent_size == grid
    assert cfg.attention and cfg.res_blocks == 2 and cfg.norm_groups == 32
    default = default_model(128, channels)  # the default preset's quantizer (30 px: no model)
    for name in (*quantizer_options(), "quantizer", "codebook_size", "code_dim", "beta"):
        assert getattr(cfg, name) == getattr(default, name), name
    assert PRESETS["vqgan"].model is vqgan_model and PRESETS["vqgan"].train.lr == 1e-4


def test_run_config_derives_downsamples_and_resets_across_architectures():
    def model(preset, size=128, **changes):
        return run_config(preset, replace(run_config().data, size=size), changes).model

    assert model("vqgan", channel_mult=(1, 2)).downsamples == 1  # given alone, it sets it
    with pytest.raises(ConfigError, match=r"give 3 values to --channel-mult \(e.g. 1,1,2\)"):
        model("vqgan", downsamples=2)
    with pytest.raises(ConfigError, match="--norm-groups"):
        model("vqgan", hidden_channels=16)
    assert model("vqgan", hidden_channels=16, norm_groups=16).level_widths == (16, 16, 32, 64)
    # The default preset's BatchNorm options belong to resnet: a vqgan starts from the defaults.
    as_vqgan = model("default", architecture="vqgan")
    assert as_vqgan.level_widths == (128, 128, 128) and not as_vqgan.attention
    as_resnet = model("vqgan", architecture="resnet")
    assert as_resnet.channel_mult == () and as_resnet.downsamples == 3
    assert model("vqgan", 16).latent_size == 8


def test_cli_options_parse():
    args = make_parser().parse_args(["train", "--architecture", "vqgan", "--channel-mult",
                                     "1,2,2", "--attention", "--norm-groups", "8"])
    assert given(args, "model") == {"architecture": "vqgan", "channel_mult": (1, 2, 2),
                                    "attention": True, "norm_groups": 8}
    with pytest.raises(SystemExit):
        make_parser().parse_args(["train", "--architecture", "unet"])


def test_train_preset_vqgan_runs(tmp_path, capsys):
    """``vqvae train --preset vqgan`` on small grayscale images: f2 at 16 px, an 8x8 grid."""
    run, data = tmp_path / "run", tmp_path / "images.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (40, 16, 16), dtype=np.uint8))
    options = tiny_stage1(data=data, size=16, batch_size=8, every=2, eval_count=16, steps=2,
                          norm_groups=8, res_blocks=1)
    assert main(["train", "--preset", "vqgan", *options, "--out", str(run)]) == 0
    assert "PSNR" in capsys.readouterr().out
    saved = json.loads((run / "config.json").read_text())["config"]
    assert saved["preset"] == "vqgan" and saved["train"]["lr"] == 1e-4
    model = load_autoencoder(run)
    assert model.cfg.architecture == "vqgan" and model.cfg.channel_mult == (1, 1)
    assert model.cfg.latent_size == 8 and _count(model.decoder, SelfAttention) == 2
