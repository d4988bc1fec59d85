"""The multiscale residual quantizer (VAR's tokenizer): exact encode/decode, the layout of its
token sequences, its codebook machinery and its config checks."""

import pytest
import torch

import vqvae
from vqvae import VQVAE, ConfigError, VQVAEConfig
from vqvae.config import default_scales
from vqvae.models.quantizers.multiscale import MultiScaleQuantizer, join_scales, split_scales

SCALES = (1, 2, 3, 4)


def tiny(**changes) -> VQVAE:
    cfg = VQVAEConfig(**{**dict(image_size=16, in_channels=1, hidden_channels=8, downsamples=2,
                                res_blocks=1, codebook_size=16, code_dim=4,
                                quantizer="multiscale"), **changes})
    return VQVAE(cfg)


def test_default_scales_follow_var_and_end_at_the_grid():
    assert default_scales(8) == (1, 2, 3, 4, 6, 8)
    assert default_scales(16) == (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
    for side in (1, 2, 4, 7, 32, 64):
        scales = default_scales(side)
        assert scales[0] == 1 and scales[-1] == side and list(scales) == sorted(set(scales))
    assert tiny().quantizer.scales == (1, 2, 3, 4)  # a 4x4 grid


def test_split_and_join_are_inverse_and_row_major():
    tokens = torch.arange(2 * 30).view(2, 30)
    maps = split_scales(tokens, SCALES)
    assert [tuple(m.shape) for m in maps] == [(2, s, s) for s in SCALES]
    assert maps[1][0].tolist() == [[1, 2], [3, 4]]  # after the one token of scale 1, row-major
    assert torch.equal(join_scales(maps), tokens)
    with pytest.raises(ValueError, match="31 tokens"):
        split_scales(torch.zeros(1, 31, dtype=torch.long), SCALES)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_decode_indices_is_the_quantized_forward_path_exactly(mode):
    model = tiny(kmeans_init=True, restart_after=1)
    model.train()(torch.rand(8, 1, 16, 16) * 2 - 1)  # k-means init, BN statistics
    model.train(mode == "train")
    x = torch.rand(3, 1, 16, 16) * 2 - 1
    q = model.encode(x)
    assert q.indices.shape == (3, 30) and q.indices.dtype == torch.long
    assert int(q.indices.max()) < 16
    model.eval()  # decode with the state the forward pass left (restarts touch unused codes)
    codes = model.quantizer.indices_to_codes(q.indices)
    assert torch.equal(codes, q.quantized)
    assert torch.equal(model.decode_indices(q.indices), model.decode(q.quantized))


def test_every_scale_counts_and_the_sum_approaches_the_map():
    """Each finer scale quantizes what the coarser ones left: with refiners at identity the
    error of the partial sums falls, and changing one coarse token changes the decoded map."""
    torch.manual_seed(0)
    q = MultiScaleQuantizer(64, 4, (1, 2, 4, 8), kmeans_init=True).train()
    for refiner in q.refine:
        torch.nn.init.zeros_(refiner.conv.weight)
        torch.nn.init.zeros_(refiner.conv.bias)
        refiner.mix = 0.0
    z = torch.randn(16, 4, 8, 8)
    out = q(z)
    maps = split_scales(out.indices, q.scales)
    errors, total = [], torch.zeros_like(z)
    with torch.no_grad():
        for k, m in enumerate(maps):
            total = total + q.expand(m, k, (8, 8))
            errors.append(float((total - z).pow(2).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    changed = out.indices.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 64
    assert not torch.equal(q.indices_to_codes(changed), q.indices_to_codes(out.indices))


def test_gradients_reach_encoder_codebook_and_refiners():
    model = tiny().train()
    out = model(torch.rand(4, 1, 16, 16) * 2 - 1)
    (out.reconstruction.pow(2).mean() + out.quantized.loss).backward()
    assert model.quantizer.vq.codebook.grad.abs().sum() > 0
    assert all(r.conv.weight.grad.abs().sum() > 0 for r in model.quantizer.refine)
    assert next(model.encoder.parameters()).grad.abs().sum() > 0


def test_kmeans_init_and_restarts_use_the_shared_codebook():
    model = tiny(kmeans_init=True, restart_after=1).train()
    q = model.quantizer
    assert not bool(q.vq.initialized)
    model(torch.rand(8, 1, 16, 16) * 2 - 1)
    assert bool(q.vq.initialized)
    q.vq.codebook.data[3] = 1e6  # a code nothing is near: unused, so restarted after 1 step
    q.restarted.zero_()
    model(torch.rand(8, 1, 16, 16) * 2 - 1)
    assert int(q.restarted) >= 1 and q.vq.codebook.data[3].abs().max() < 1e5


def test_save_and_load_give_the_same_codes(tmp_path):
    model = tiny(kmeans_init=True).train()
    model(torch.rand(8, 1, 16, 16) * 2 - 1)
    model.eval()
    folder = model.save_pretrained(tmp_path / "m")
    loaded = vqvae.load_autoencoder(folder)
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    assert torch.equal(model.encode(x).indices, loaded.encode(x).indices)


@pytest.mark.parametrize("changes, words", [
    (dict(scales=(1, 2)), "must end at the code grid's side 4"),
    (dict(scales=(1, 3, 2, 4)), "must rise"),
    (dict(scales=(0, 4)), "must rise from at least 1"),
    (dict(cosine=True), "cosine"),
    (dict(lookup_dim=2), "lookup_dim"),
    (dict(estimator="rotation"), "rotation"),
    (dict(quantizer="vq", scales=(1, 4)), "--quantizer multiscale"),
])
def test_bad_configs_are_one_line_errors(changes, words):
    with pytest.raises(ConfigError, match=words) as e:
        tiny(**changes)
    assert "\n" not in str(e.value)
