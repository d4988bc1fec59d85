from dataclasses import replace

import pytest
import torch
from torch import nn

from vqvae import VQVAE, ConfigError, VQVAEConfig, default_model, seed_model
from vqvae.models.autoencoder import ResidualBlock


@pytest.mark.parametrize("downsamples,res_blocks,code_dim,channels,size", [
    (1, 0, 8, 1, 8), (2, 1, 8, 3, 16), (2, 3, 4, 1, 8), (3, 2, 12, 3, 16), (2, 0, 8, 1, 12)])
def test_shapes_swept_over_configs(downsamples, res_blocks, code_dim, channels, size):
    cfg = VQVAEConfig(image_size=size, in_channels=channels, hidden_channels=8,
                      downsamples=downsamples, res_blocks=res_blocks, codebook_size=16,
                      code_dim=code_dim)
    model = VQVAE(cfg)
    x = torch.rand(2, channels, size, size) * 2 - 1
    out = model(x)
    latent = size // 2**downsamples
    assert out.reconstruction.shape == x.shape
    assert out.latents.shape == (2, code_dim, latent, latent)
    assert out.quantized.indices.shape == (2, latent, latent)
    assert out.reconstruction.abs().max() <= 1


def test_decode_indices_equals_quantized_path(tiny_cfg):
    model = VQVAE(tiny_cfg).eval()
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        q = model.encode(x)
        assert torch.allclose(model.decode_indices(q.indices), model.decode(q.quantized))
        assert torch.allclose(model.reconstruct(x), model.decode_indices(q.indices))
        assert torch.allclose(model.reconstruct(x, quantize=False),
                              model.decode(model.encode_latents(x)))


def test_gradients_reach_encoder_through_quantizer(tiny_cfg):
    model = VQVAE(tiny_cfg)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    out = model(x)
    nn.functional.mse_loss(out.reconstruction, x).backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0


def _types(seq):
    return [type(m).__name__ for m in seq]


def test_seed_preset_structure_matches_digest():
    cfg = seed_model(128, 3)
    assert (cfg.hidden_channels, cfg.code_dim, cfg.codebook_size, cfg.beta) == (128, 128, 64, 0.25)
    assert cfg.res_blocks == 3  # int(log2(128) - 4)
    assert seed_model(32, 1).res_blocks == 1 and seed_model(16, 1).res_blocks == 0
    model = VQVAE(cfg)
    # Encoder: Conv-BN-ReLU-Conv-BN, then res blocks each followed by BN except the last.
    assert _types(model.encoder) == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d",
                                     "ResidualBlock", "BatchNorm2d", "ResidualBlock",
                                     "BatchNorm2d", "ResidualBlock"]
    conv = model.encoder[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride) == (3, 128, (4, 4),
                                                                                    (2, 2))
    # Decoder: (BN, block) x 3 -> ConvT(z_dim) -> BN -> ReLU -> ConvT(3) -> tanh.
    assert _types(model.decoder) == ["BatchNorm2d", "ResidualBlock"] * 3 + [
        "ConvTranspose2d", "BatchNorm2d", "ReLU", "ConvTranspose2d", "Tanh"]
    assert model.decoder[-2].out_channels == 3 and model.decoder[-2].kernel_size == (4, 4)
    # Residual block: ReLU -> Conv3x3 -> BN -> ReLU -> Conv1x1, added to the input.
    block = model.encoder[5]
    assert _types(block.body) == ["ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Conv2d"]
    assert block.body[1].kernel_size == (3, 3) and block.body[4].kernel_size == (1, 1)
    # Keras' BatchNorm defaults (momentum 0.99 -> 0.01 in PyTorch's convention, eps 1e-3)
    bn = model.encoder[1]
    assert bn.momentum == pytest.approx(0.01) and bn.eps == pytest.approx(1e-3)
    assert model.quantizer.codebook.shape == (64, 128)
    x = torch.rand(2, 3, 128, 128) * 2 - 1
    assert model.encode_latents(x).shape == (2, 128, 32, 32)


def test_residual_block_is_identity_plus_branch():
    block = ResidualBlock(4)
    x = torch.randn(2, 4, 5, 5)
    assert torch.allclose(block(x), x + block.body(x))


def test_default_preset_differs_only_where_documented():
    seed, default = seed_model(32, 1), default_model(32, 1)
    assert replace(default, res_blocks=seed.res_blocks, weight_init="keras", bn_momentum=0.01,
                   bn_eps=1e-3, codebook_size=64, kmeans_init=False, restart_after=0,
                   cosine=False, lookup_dim=None) == seed


@pytest.mark.parametrize("field,value,words", [
    ("image_size", 30, "not divisible"), ("codebook_size", 1, "codebook_size"),
    ("beta", -1.0, "beta"), ("quantizer", "nope", "quantizer"), ("in_channels", 2, "in_channels"),
    ("res_blocks", -1, "res_blocks"), ("upsample", "bilinear", "upsample")])
def test_bad_config_values_are_named(field, value, words):
    with pytest.raises(ConfigError, match=words):
        replace(VQVAEConfig(), **{field: value})


@pytest.mark.parametrize("quantizer", ["vq", "ema", "fsq"])
def test_training_forward_is_one_graph_after_initialisation(quantizer):
    """torch.compile (and a CUDA graph under reduce-overhead) sees the whole training forward as
    one graph once k-means init is done: no host sync or data-dependent shape in the lookup,
    the EMA statistics or the dead-code restarts (a graph break would split the captured step)."""
    import torch._dynamo as dynamo

    extra = ({"codebook_size": 16, "fsq_levels": (4, 4), "kmeans_init": False,
              "restart_after": 0, "cosine": False, "lookup_dim": None}
             if quantizer == "fsq" else {})
    cfg = replace(default_model(16, 1), hidden_channels=16, quantizer=quantizer, **extra)
    model = VQVAE(cfg).train()
    x = torch.randn(4, 1, 16, 16)
    model(x)  # the first training step initialises the codebook (data-dependent, eager)
    explained = dynamo.explain(model)(x)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, [
        b.reason for b in explained.break_reasons]


def test_loaded_codebook_is_not_initialised_again():
    """The host-side memo of ``initialized`` is re-read after a load: a loaded, initialised
    model skips k-means; a fresh state dict (initialized = False) runs it again."""
    cfg = replace(default_model(16, 1), hidden_channels=16)
    trained = VQVAE(cfg).train()
    trained(torch.randn(4, 1, 16, 16))
    fresh = VQVAE(cfg).train()
    untouched = {k: v.clone() for k, v in fresh.state_dict().items()}
    fresh(torch.randn(4, 1, 16, 16))  # initialises, remembers it
    fresh.load_state_dict(trained.state_dict())
    fresh.eval()(torch.randn(4, 1, 16, 16))
    codebook = fresh.quantizer.codebook.detach().clone()
    fresh.train()(torch.randn(4, 1, 16, 16))
    assert bool(fresh.quantizer.initialized)
    fresh.load_state_dict(untouched)
    assert not fresh.quantizer._initialized_seen and not bool(fresh.quantizer.initialized)
    fresh.train()(torch.randn(4, 1, 16, 16))
    assert bool(fresh.quantizer.initialized) and not torch.equal(fresh.quantizer.codebook,
                                                                 codebook)


@pytest.mark.parametrize("upsample,periodic", [("transpose", True), ("nearest", False)])
def test_nearest_upsampling_has_no_stride_periodic_pattern(upsample, periodic):
    """A constant latent grid decodes to a constant interior through nearest-neighbour
    upsampling; a transposed conv's even and odd output pixels use different kernel taps."""
    torch.manual_seed(0)
    cfg = VQVAEConfig(image_size=32, in_channels=3, hidden_channels=8, downsamples=2,
                      res_blocks=1, codebook_size=16, code_dim=8, upsample=upsample)
    model = VQVAE(cfg).eval()
    with torch.no_grad():
        out = model.decode(torch.ones(1, 8, 8, 8))
    assert out.shape == (1, 3, 32, 32)
    interior = out[..., 8:-8, 8:-8]  # beyond the reach of the zero padding
    spread = float(interior.std(dim=(-2, -1)).max())
    assert (spread > 1e-3) if periodic else (spread < 1e-6)
