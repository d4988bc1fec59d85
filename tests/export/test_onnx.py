"""ONNX export (`vqvae export --format onnx`): every architecture x quantizer exports, runs under
onnxruntime with any batch size and matches PyTorch; bad input is one line and leaves nothing."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from vqvae import VQVAE, check_onnx, default_model, export_run, seed_model, to_float, vqgan_model
from vqvae.cli import main
from vqvae.errors import CheckpointError, ConfigError, DataError
from vqvae.export import onnx as onnx_export
from vqvae.export.onnx import synthetic_images
from vqvae.generation.codes import fingerprint

ort = pytest.importorskip("onnxruntime")

# Tiny models of each preset's architecture, their quantizer options off but k-means init (fitted
# codes spread the ids over the codebook); a case turns its options on.
PLAIN = dict(codebook_size=16, kmeans_init=True, restart_after=0, cosine=False, lookup_dim=None)
ARCHITECTURES = {
    "default": replace(default_model(16, 3), hidden_channels=8, code_dim=4, res_blocks=1,
                       **PLAIN),
    "seed": replace(seed_model(16, 1), hidden_channels=8, code_dim=8, **PLAIN),
    "vqgan": replace(vqgan_model(16, 3), hidden_channels=8, norm_groups=4, res_blocks=1,
                     code_dim=4, **PLAIN),
    # vqgan with the options of a diffusers VQModel (docs/export.md)
    "vqmodel": replace(vqgan_model(16, 3), hidden_channels=8, norm_groups=4, res_blocks=1,
                       code_dim=4, downsample_padding="asymmetric", decoder_res_blocks=2,
                       middle_attention_only=True, latent_channels=6, **PLAIN),
}
QUANTIZERS = {
    "vq": {},
    "ema": {"quantizer": "ema"},
    "fsq": {"quantizer": "fsq", "fsq_levels": (4, 4), "kmeans_init": False},
    "cosine": {"cosine": True},
    "lookup_dim": {"quantizer": "ema", "lookup_dim": 3, "cosine": True, "restart_after": 5},
}


def saved(tmp_path: Path, cfg) -> tuple[VQVAE, Path]:
    """A model fitted to images as training would (BatchNorm statistics, k-means codes, one EMA
    update), saved as a checkpoint folder: its ids vary with the input, so that a graph that
    reads its input wrongly gives other ids."""
    model = VQVAE(cfg)
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.momentum = None  # running statistics = this one batch's
    with torch.no_grad():
        model.train()(to_float(synthetic_images(64, cfg.in_channels, cfg.image_size, seed=1)))
    model.eval().save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def onnx_run(path: Path, name: str, array: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {name: array.numpy()})[0])


CASES = [(a, q) for a in ARCHITECTURES if a != "vqmodel" for q in QUANTIZERS] + [("vqmodel", "vq")]


@pytest.mark.parametrize(("architecture", "quantizer"), CASES)
def test_export_runs_under_onnxruntime_as_in_pytorch(tmp_path, architecture, quantizer):
    cfg = replace(ARCHITECTURES[architecture], **QUANTIZERS[quantizer])
    model, checkpoint = saved(tmp_path, cfg)
    lines = []
    out = export_run(checkpoint, "onnx", tmp_path / "onnx", report=lines.append)
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx",
                                                     "preprocessing.json"]
    assert lines[0].startswith("parity on 64 synthetic images")
    side, grid = cfg.image_size, cfg.latent_size
    for batch in (1, 5):  # the batch dimension is dynamic in both graphs
        images = synthetic_images(batch, cfg.in_channels, side, seed=2)
        ids = onnx_run(out / "encoder.onnx", "images", images)
        assert ids.dtype == torch.int64 and ids.shape == (batch, grid, grid)
        with torch.no_grad():
            expected = model.encode(to_float(images)).indices
            assert torch.equal(ids, expected)
            assert batch == 1 or expected.unique().numel() >= 4  # ids that depend on the input
            decoded = onnx_run(out / "decoder.onnx", "codes", ids)
            assert decoded.shape == (batch, cfg.in_channels, side, side)
            assert (decoded - model.decode_indices(ids)).abs().max() <= 1e-4
    facts = json.loads((out / "preprocessing.json").read_text())
    assert facts["model"]["grid"] == [grid, grid]
    assert facts["model"]["codebook_size"] == 16
    assert facts["encoder"]["input"]["dtype"] == "uint8"
    assert facts["encoder"]["input"]["shape"] == ["batch", cfg.in_channels, side, side]
    assert facts["checkpoint"]["sha256"] == fingerprint(checkpoint)
    assert facts["parity"]["same_codes"] == facts["parity"]["codes"] == 64 * grid * grid
    assert facts["parity"]["ties"] == 0


def test_cli_exports_a_trained_run_checked_on_held_out_images(legacy_run, tmp_path, capsys):
    assert main(["export", str(legacy_run), "--format", "onnx", "--out",
                 str(tmp_path / "onnx")]) == 0
    out = capsys.readouterr().out
    assert "parity on 64 held-out images of digits: 1024/1024 code ids identical" in out
    assert f"wrote {tmp_path / 'onnx' / 'encoder.onnx'}" in out
    assert f"exported {legacy_run} as onnx" in out
    parity = check_onnx(legacy_run, tmp_path / "onnx", n=8)
    assert parity.ok and parity.images == 8


def test_parity_catches_a_graph_of_other_weights(tmp_path, tiny_cfg):
    _, first = saved(tmp_path / "a", tiny_cfg)
    _, second = saved(tmp_path / "b", tiny_cfg)  # the same config, other random weights
    export_run(first, "onnx", tmp_path / "onnx")
    assert check_onnx(first, tmp_path / "onnx").ok
    other = check_onnx(second, tmp_path / "onnx")
    assert not other.ok and other.max_pixel_diff > 1e-2
    _, larger = saved(tmp_path / "c", replace(tiny_cfg, image_size=16))
    with pytest.raises(CheckpointError, match="cannot run .*encoder.onnx on images of shape"):
        check_onnx(larger, tmp_path / "onnx")
    with pytest.raises(CheckpointError, match="cannot load .*missing/encoder.onnx"):
        check_onnx(first, tmp_path / "missing")


def test_a_tie_is_an_id_a_tiny_move_of_the_latents_gives(tiny_cfg):
    model = VQVAE(tiny_cfg).eval()
    with torch.no_grad():
        codebook = model.quantizer.codebook
        codebook[1] = codebook[0] + 1e-7  # two codes equally near anything, within rounding
        z = codebook[0].view(1, -1, 1, 1).repeat(1, 1, 2, 2) + 1e-3  # (1, D, 2, 2)
        ids = model.quantizer(z).indices  # 0 or 1 everywhere
        assert set(ids.unique().tolist()) <= {0, 1}
        other = 1 - ids  # the tie broken the other way
        other[0, 0, 0] = 5  # and one id that is simply wrong
        assert onnx_export._ties(model, z, ids, other) == 3
        assert onnx_export._ties(model, z, ids, ids) == 0


def test_a_failed_export_leaves_nothing(tmp_path, tiny_cfg, monkeypatch):
    _, checkpoint = saved(tmp_path, tiny_cfg)
    out = tmp_path / "onnx"
    monkeypatch.setattr(onnx_export, "MAX_PIXEL_DIFF", -1.0)  # no export can pass parity
    with pytest.raises(ConfigError, match="does not match PyTorch"):
        export_run(checkpoint, "onnx", out)
    monkeypatch.setattr(onnx_export, "LOOKUPS", {})  # a quantizer the exporter does not know
    with pytest.raises(ConfigError, match="no code lookup for the 'vq' quantizer"):
        export_run(checkpoint, "onnx", out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no DIR, no temporary folder


def test_bad_input_is_one_line(tmp_path, tiny_cfg, capsys):
    _, checkpoint = saved(tmp_path, tiny_cfg)
    (tmp_path / "file").write_text("mine")
    cases = {"not found": [str(tmp_path / "missing"), "--format", "onnx"],
             "unknown export format 'tflite' (choose from onnx, diffusers)": [
                 str(checkpoint), "--format", "tflite"],
             "is a file": [str(checkpoint), "--format", "onnx", "--out", str(tmp_path / "file")],
             "'nope' is not a valid torch device": [str(checkpoint), "--format", "onnx",
                                                    "--device", "nope"]}
    for message, argv in cases.items():
        if "--out" not in argv:
            argv = [*argv, "--out", str(tmp_path / "onnx")]
        assert main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert (tmp_path / "file").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "file"]
    for error, call in ((CheckpointError, lambda: export_run(tmp_path / "missing", "onnx",
                                                             tmp_path / "x")),
                        (DataError, lambda: export_run(checkpoint, "onnx", tmp_path / "file"))):
        with pytest.raises(error):
            call()


def test_re_export_replaces_the_files(tmp_path, tiny_cfg):
    _, checkpoint = saved(tmp_path, tiny_cfg)
    out = export_run(checkpoint, "onnx", tmp_path / "onnx")
    (out / "notes.txt").write_text("kept")
    first = (out / "encoder.onnx").read_bytes()
    export_run(checkpoint, "onnx", out)
    assert (out / "notes.txt").read_text() == "kept"
    assert (out / "encoder.onnx").read_bytes() == first
    assert sorted(p.name for p in out.iterdir()) == ["decoder.onnx", "encoder.onnx", "notes.txt",
                                                     "preprocessing.json"]


def test_export_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    assert e.value.code == 0
    assert "--format" in capsys.readouterr().out
