"""diffusers' VQModel folders both ways (store/diffusers.py): a VQModel saved by diffusers loads as
a VQVAE with the same latents, code ids and images; our vqgan exported loads in diffusers with the
same; what VQModel cannot express, and broken folders, are one line each; and a VQModel folder
goes through the CLI as a stage-1 model (encode, train-prior, sample, finetune-decoder)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import vqvae
from vqvae import VQVAE, CheckpointError, ConfigError, VQVAEConfig
from vqvae.cli import main
from vqvae.store.diffusers import (WEIGHTS_FILE, export_diffusers, from_diffusers, to_diffusers,
                                   weight_table)

from tests import tiny

diffusers = pytest.importorskip("diffusers")

DOWN, UP = "DownEncoderBlock2D", "UpDecoderBlock2D"
TOL = 1e-4


def vqmodel(attention="middle", **changes) -> "diffusers.VQModel":
    """A tiny VQModel with random weights (GroupNorm affines too, so that nothing is an
    identity): attention in the ``middle`` block, also at the ``lowest`` level, or ``none``."""
    levels = len(changes.get("block_out_channels", (32, 64)))
    down, up = [DOWN] * levels, [UP] * levels
    if attention == "lowest":
        down[-1], up[0] = "AttnDownEncoderBlock2D", "AttnUpDecoderBlock2D"
    settings = dict(block_out_channels=(32, 64), down_block_types=tuple(down),
                    up_block_types=tuple(up), layers_per_block=1, norm_num_groups=8,
                    sample_size=16, latent_channels=4, num_vq_embeddings=32,
                    mid_block_add_attention=attention != "none")
    model = diffusers.VQModel(**{**settings, **changes}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def their_outputs(model, x: torch.Tensor, ids: torch.Tensor):
    """diffusers' latents, code ids, reconstruction and decoding of ``ids``."""
    with torch.no_grad():
        latents = model.encode(x).latents
        _, _, (_, _, indices) = model.quantize(latents)
        reconstruction = model.decode(latents).sample
        b, h, w = ids.shape
        codes = model.quantize.get_codebook_entry(ids.reshape(-1), (b, h, w, latents.shape[1]))
        decoded = model.decoder(model.post_quant_conv(codes))
    return latents, indices.reshape(x.shape[0], *latents.shape[2:]), reconstruction, decoded


def assert_same(ours: VQVAE, theirs, size: int = 16, channels: int = 3) -> None:
    x = torch.rand(4, channels, size, size) * 2 - 1
    side = size // 2 ** ours.cfg.downsamples
    ids = torch.randint(0, ours.cfg.codebook_size, (2, side, side))
    latents, indices, reconstruction, decoded = their_outputs(theirs, x, ids)
    with torch.no_grad():
        assert (ours.encode_latents(x) - latents).abs().max() < TOL
        assert torch.equal(ours.encode(x).indices, indices)
        assert (ours.reconstruct(x) - reconstruction).abs().max() < TOL
        assert (ours.decode_indices(ids) - decoded).abs().max() < TOL


@pytest.mark.parametrize("attention", ["middle", "lowest", "none"])
def test_a_vqmodel_folder_loads_with_the_same_outputs(tmp_path, attention):
    theirs = vqmodel(attention)
    theirs.save_pretrained(tmp_path)
    ours = vqvae.from_pretrained(tmp_path)
    assert isinstance(ours, VQVAE) and not ours.training
    cfg = ours.cfg
    assert (cfg.architecture, cfg.level_widths, cfg.decoder_blocks, cfg.latent_channels) == (
        "vqgan", (32, 64), 2, 4)
    assert cfg.attention == (attention != "none")
    assert cfg.middle_attention_only == (attention == "middle")
    assert_same(ours, theirs)
    assert vqvae.load_autoencoder(tmp_path).cfg == cfg  # every stage-1 loader takes it


def test_a_sharded_vqmodel_folder_loads_and_every_shard_is_fingerprinted(tmp_path):
    import safetensors.torch as st

    from vqvae.generation.codes import fingerprint

    theirs, one, shards = vqmodel(), tmp_path / "one", tmp_path / "shards"
    theirs.save_pretrained(one)
    theirs.save_pretrained(shards, max_shard_size="40KB")
    parts = sorted(shards.glob("diffusion_pytorch_model-*.safetensors"))
    assert len(parts) > 1 and (shards / f"{WEIGHTS_FILE}.index.json").is_file()
    whole = vqvae.from_pretrained(one).state_dict()
    assert all(torch.equal(v, whole[k]) for k, v in vqvae.from_pretrained(shards)
               .state_dict().items())
    before = fingerprint(shards)
    tensors = st.load_file(parts[-1])
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1  # another model in the last shard: another fingerprint
    st.save_file(tensors, parts[-1])
    assert fingerprint(shards) != before


def tiny_vqgan(**changes) -> VQVAEConfig:
    settings = dict(image_size=16, in_channels=3, architecture="vqgan", hidden_channels=16,
                    channel_mult=(1, 2), downsamples=1, res_blocks=1, norm_groups=8,
                    codebook_size=32, code_dim=4, downsample_padding="asymmetric",
                    decoder_res_blocks=2, attention=True, weight_init="torch")
    return VQVAEConfig(**{**settings, **changes})


@pytest.mark.parametrize("changes", [{}, {"middle_attention_only": True},
                                     {"attention": False, "latent_channels": 6},
                                     {"quantizer": "ema", "in_channels": 1}])
def test_an_exported_vqgan_loads_in_diffusers_with_the_same_outputs(tmp_path, changes):
    ours = VQVAE(tiny_vqgan(**changes)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    out = export_diffusers(ours, tmp_path / "vq")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", WEIGHTS_FILE]
    theirs = diffusers.VQModel.from_pretrained(out).eval()
    assert_same(ours, theirs, channels=ours.cfg.in_channels)
    back = vqvae.from_pretrained(out)  # and back: the same model (plus identity quant convs)
    x = torch.rand(2, ours.cfg.in_channels, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(back.encode(x).indices, ours.encode(x).indices)
        assert (back.reconstruct(x) - ours.reconstruct(x)).abs().max() < TOL
    export_diffusers(back, out)  # over an earlier export: replaced
    assert diffusers.VQModel.from_pretrained(out).config.latent_channels == (
        ours.cfg.latent_channels or 4)


@pytest.mark.parametrize("attention", ["middle", "lowest"])
def test_the_weight_table_names_every_tensor_of_both_models(attention):
    theirs = vqmodel(attention, layers_per_block=2, block_out_channels=(8, 8, 16),
                     norm_num_groups=4)
    cfg = tiny_vqgan(res_blocks=2, decoder_res_blocks=3, hidden_channels=8, channel_mult=(1, 1, 2),
                     downsamples=2, norm_groups=4, latent_channels=4,
                     middle_attention_only=attention == "middle")
    ours = VQVAE(cfg).state_dict()
    table = weight_table(cfg)
    assert {e.ours for e in table} == set(ours)
    assert {n for e in table for n in e.theirs} == set(theirs.state_dict())
    mapped = to_diffusers(cfg, ours)
    assert all(mapped[k].shape == v.shape for k, v in theirs.state_dict().items())
    back = from_diffusers(cfg, mapped, Path("x"))
    assert all(torch.equal(back[k], v) for k, v in ours.items())


@pytest.mark.parametrize("changes, part", [
    ({"quantizer": "fsq", "fsq_levels": (8, 4)}, "no FSQ quantizer"),
    ({"cosine": True}, "not cosine"),
    ({"lookup_dim": 2}, "lookup_dim"),
    ({"downsample_padding": "symmetric"}, "downsample_padding symmetric"),
    ({"decoder_res_blocks": None}, "residual blocks per level"),
])
def test_what_vqmodel_cannot_express_is_one_line(tmp_path, changes, part):
    with pytest.raises(ConfigError, match=part) as e:
        export_diffusers(VQVAE(tiny_vqgan(**changes)), tmp_path / "vq")
    assert "\n" not in str(e.value) and not (tmp_path / "vq").exists()
    assert list(tmp_path.iterdir()) == []
    resnet = VQVAE(VQVAEConfig(image_size=8, in_channels=1, hidden_channels=8, code_dim=4))
    with pytest.raises(ConfigError, match="no resnet architecture"):
        export_diffusers(resnet, tmp_path / "vq")


def broken(folder: Path, problem: str) -> None:
    """Break a saved VQModel folder in one way."""
    config = json.loads((folder / "config.json").read_text())
    weights = folder / WEIGHTS_FILE
    if problem == "pickle only":
        weights.rename(folder / "diffusion_pytorch_model.bin")
    elif problem == "no weights":
        weights.unlink()
    elif problem == "AutoencoderKL":
        config["_class_name"] = "AutoencoderKL"
    elif problem == "spatial":
        config["norm_type"] = "spatial"
    elif problem == "a string for a number":
        config["block_out_channels"] = [32, "64"]
    elif problem in ("missing", "shape"):
        import safetensors.torch as st
        tensors = st.load_file(weights)
        if problem == "missing":
            del tensors["decoder.conv_out.bias"]
        else:
            tensors["quantize.embedding.weight"] = torch.zeros(16, 4)
        st.save_file(tensors, weights)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("problem, says", [
    ("pickle only", "holds only diffusion_pytorch_model.bin, a pickle"),
    ("no weights", f"holds no {WEIGHTS_FILE}"),
    ("AutoencoderKL", "'AutoencoderKL', not a VQModel"),
    ("spatial", "norm_type 'spatial'"),
    ("a string for a number", r"block_out_channels must be a list of positive integers, got "
                              r"\[32, '64'\]"),
    ("missing", "holds no tensor decoder.conv_out.bias"),
    ("shape", r"quantize.embedding.weight has shape \(16, 4\), but its config.json makes it "
              r"\(32, 4\)"),
])
def test_a_folder_vqvae_cannot_read_is_one_line(tmp_path, problem, says):
    vqmodel().save_pretrained(tmp_path)
    broken(tmp_path, problem)
    with pytest.raises(CheckpointError, match=says) as e:
        vqvae.from_pretrained(tmp_path)
    assert "\n" not in str(e.value) and str(tmp_path) in str(e.value)


def test_defaults_keep_the_vqgan_architecture():
    """The new fields at their defaults build today's vqgan: symmetric stride-2 convs, as many
    decoder blocks as encoder blocks, attention at the lowest level too, no quant convs."""
    cfg = VQVAEConfig(image_size=16, in_channels=1, architecture="vqgan", hidden_channels=8,
                      downsamples=1, res_blocks=1, norm_groups=4, code_dim=4, attention=True)
    model = VQVAE(cfg)
    kinds = [type(m).__name__ for m in model.encoder]
    assert kinds == ["Conv2d", "GroupNormResBlock", "Conv2d", "GroupNormResBlock",
                     "SelfAttention", "GroupNormResBlock", "SelfAttention", "GroupNormResBlock",
                     "GroupNorm", "SiLU", "Conv2d"]
    assert model.encoder[2].padding == (1, 1)
    assert [type(m).__name__ for m in model.decoder].count("GroupNormResBlock") == 2 + 2 * 1


def test_a_vqmodel_folder_through_the_cli(tmp_path, capsys):
    """A VQModel folder is a stage-1 model for every command: encode, train a prior on its codes
    and sample through it; fine-tune its decoder (its encoder and codebook stay as they were)."""
    folder, codes = tmp_path / "vq", tmp_path / "codes.safetensors"
    vqmodel(in_channels=1, out_channels=1, block_out_channels=(8, 16), norm_num_groups=4,
            sample_size=8, num_vq_embeddings=16).save_pretrained(folder)
    assert main(["encode", str(folder), "--out", str(codes)]) == 2
    assert "--data" in capsys.readouterr().err  # outside a run folder: name the data
    assert main(["encode", str(folder), "--data", "digits", "--out", str(codes)]) == 0
    found = vqvae.load_codes(codes)
    assert found.grid == (4, 4) and found.codebook_size == 16
    prior = tmp_path / "prior"
    assert main(["train-prior", "--codes", str(codes), *tiny.prior(steps=2, every=2,
                                                                 eval_count=None),
                 "--out", str(prior)]) == 0
    assert main(["sample", str(prior), "--n", "4"]) == 0
    assert (prior / "sample" / "samples.png").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", WEIGHTS_FILE]  # untouched
    tuned = tmp_path / "tuned"
    assert main(["finetune-decoder", str(folder), "--data", "digits", "--steps", "1",
                 "--batch-size", "4", "--eval-count", "16", "--out", str(tuned)]) == 0
    before, after = vqvae.from_pretrained(folder).state_dict(), vqvae.load_autoencoder(tuned)
    assert all(torch.equal(v, after.state_dict()[k]) for k, v in before.items()
               if not k.startswith("decoder."))
    assert main(["sample", str(prior), "--n", "4", "--decoder", str(tuned)]) == 0
    shutil.rmtree(folder)  # the prior names the folder it decodes with
    assert main(["sample", str(prior), "--n", "4"]) == 2
