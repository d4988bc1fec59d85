"""The two-stage pipeline: a prior and its decoder loaded once; encode, decode, sample and inpaint
as the run-level functions do; the stage-1 fingerprint read from the checkpoint's record."""

import hashlib
import json

import pytest
import torch

import vqvae
from vqvae.generation import codes as codes_module
from vqvae.generation.pipeline import Pipeline


def test_encode_decode_and_sample_match_the_models_and_the_commands(legacy_run):
    pipe = Pipeline.from_run(legacy_run / "prior", device="cpu")
    stage1 = vqvae.load_autoencoder(legacy_run)
    images = vqvae.load_splits(vqvae.load_run_config(legacy_run).data).test.images[:6]
    codes = pipe.encode(images)
    with torch.no_grad():
        assert torch.equal(codes, stage1.encode(vqvae.to_float(images)).indices)
        assert torch.equal(pipe.decode(codes),
                           vqvae.to_uint8(stage1.decode_indices(codes)))
    draw = vqvae.SampleConfig(n=5, top_k=4, seed=3)
    first, second = pipe.sample(draw), pipe.sample(n=5, top_k=4, seed=3)  # fields as overrides
    by_run = vqvae.sample_images(legacy_run / "prior", draw, device="cpu")
    for other in (second, by_run):
        assert torch.equal(first.images, other.images)
        assert torch.equal(first.codes.split("samples").codes, other.codes.split("samples").codes)
    assert first.codes.stage1_sha256 == pipe.run_cfg.stage1_sha256
    assert not torch.equal(first.codes.split("samples").codes,
                           pipe.sample(n=5, top_k=4, seed=4).codes.split("samples").codes)


def test_inpainting_through_the_pipeline_is_the_commands(legacy_run):
    pipe = Pipeline.from_run(legacy_run / "maskgit", device="cpu")
    image = vqvae.load_splits(vqvae.load_run_config(legacy_run).data).test.images[0]
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4] = True
    cfg = vqvae.SampleConfig(steps=3, seed=1)
    done = pipe.inpaint(image, mask, cfg)
    again = vqvae.inpaint(legacy_run / "maskgit", image, mask, cfg, device="cpu")
    assert torch.equal(done.image, again.image) and torch.equal(done.codes, again.codes)
    kept = ~done.masked_codes
    assert torch.equal(done.codes[kept], pipe.encode(image[None])[0][kept])
    with pytest.raises(vqvae.ConfigError, match="parallel-decoding prior"):
        Pipeline.from_run(legacy_run / "prior", device="cpu").inpaint(image, mask, cfg)


def test_the_stage1_fingerprint_is_read_from_the_record(legacy_run, monkeypatch):
    step = legacy_run / "checkpoints" / "step-0000004"
    recorded = json.loads((step / "config.json").read_text())["sha256"]
    assert codes_module.fingerprint(step) == recorded
    hashed, real = [], hashlib.sha256

    def counting(*args, **kwargs):
        hashed.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(hashlib, "sha256", counting)
    assert codes_module.fingerprint(step) == recorded and not hashed
    pipe = Pipeline.from_run(legacy_run / "prior", device="cpu")
    assert len(hashed) == 2  # each file checked once as it loads, the fingerprint not again
    pipe.sample(n=2)
    pipe.sample(n=2, seed=1)
    assert len(hashed) == 2  # loaded once: sampling reads and hashes nothing
    monkeypatch.undo()
    meta = json.loads((step / "config.json").read_text())  # a checkpoint that recorded none
    del meta["sha256"]
    (step / "config.json").write_text(json.dumps(meta))
    assert codes_module.fingerprint(step) == recorded  # hashed: the same weights
