"""`vqvae export`'s other format: diffusers' VQModel folder, through the same command."""

import json
from dataclasses import replace

import torch

from vqvae import VQVAE, load_autoencoder, vqgan_model
from vqvae.cli import main
from vqvae.generation.codes import fingerprint

VQMODEL = replace(vqgan_model(16, 3), hidden_channels=8, norm_groups=4, res_blocks=1, code_dim=4,
                  codebook_size=16, kmeans_init=False, restart_after=0, cosine=False,
                  lookup_dim=None, downsample_padding="asymmetric", decoder_res_blocks=2)


def test_export_diffusers_writes_a_vqmodel_folder_that_loads_back(tmp_path, capsys):
    model = VQVAE(VQMODEL).eval()
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "vqmodel"
    assert main(["export", str(tmp_path / "ckpt"), "--format", "diffusers", "--out",
                 str(out)]) == 0
    assert f"wrote {out / 'config.json'}" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json",
                                                     "diffusion_pytorch_model.safetensors"]
    back = load_autoencoder(out)
    ids = torch.randint(0, 16, (2, 8, 8))
    with torch.no_grad():
        assert (back.decode_indices(ids) - model.decode_indices(ids)).abs().max() < 1e-5
    # and a VQModel folder is a stage-1 model like any other: it exports to ONNX
    assert main(["export", str(out), "--format", "onnx", "--out", str(tmp_path / "onnx")]) == 0
    facts = json.loads((tmp_path / "onnx" / "preprocessing.json").read_text())
    assert facts["checkpoint"]["sha256"] == fingerprint(out)
    assert facts["parity"]["same_codes"] == facts["parity"]["codes"]


def test_a_model_vqmodel_cannot_express_is_one_line_and_leaves_nothing(tmp_path, capsys):
    VQVAE(replace(VQMODEL, cosine=True)).save_pretrained(tmp_path / "ckpt")
    assert main(["export", str(tmp_path / "ckpt"), "--format", "diffusers", "--out",
                 str(tmp_path / "vqmodel")]) == 2
    err = capsys.readouterr().err
    assert "cosine" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
