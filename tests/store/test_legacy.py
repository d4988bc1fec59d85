"""Run folders written before the package was split into sub-packages (tests/fixtures/legacy_run,
written by main at 3659d9a) still load, encode, score, sample and resume."""

import json

import pytest
import torch
from safetensors import safe_open

import vqvae
from vqvae.cli import main
from vqvae.evaluation.metrics import evaluate_prior


def test_stage1_encodes_its_data_as_the_old_code_did(legacy_run):
    model = vqvae.load_autoencoder(legacy_run)
    old = vqvae.load_codes(legacy_run / "prior" / "codes.safetensors")
    fresh = vqvae.encode_dataset(legacy_run, progress=False)
    assert torch.equal(fresh.split("train").codes, old.split("train").codes)
    assert torch.equal(fresh.split("test").codes, old.split("test").codes)
    assert model.cfg.codebook_size == 16


@pytest.mark.parametrize("prior", ["prior", "maskgit"])
def test_priors_score_as_the_old_code_did(legacy_run, prior):
    model = vqvae.load_prior(legacy_run / prior)
    test = vqvae.load_codes(legacy_run / prior / "codes.safetensors").split("test")
    scored = evaluate_prior(model, test.codes)["bits_per_code"]
    recorded = json.loads((legacy_run / prior / "eval.json").read_text())["bits_per_code"]
    assert scored == pytest.approx(recorded, abs=1e-5)


def test_old_runs_resume_and_sample(legacy_run, tmp_path):
    # written before state.json and codes files recorded the sha256 of their tensors
    state = legacy_run / "checkpoints" / "step-0000004" / "state.json"
    assert "state_sha256" not in json.loads(state.read_text())
    with safe_open(str(legacy_run / "prior" / "codes.safetensors"), framework="pt") as f:
        assert "contents_sha256" not in f.metadata()
    assert main(["train", "--resume", str(legacy_run), "--steps", "6", "--device", "cpu"]) == 0
    assert json.loads((legacy_run / "eval.json").read_text())["step"] == 6
    for prior in ("prior", "maskgit"):
        assert main(["train-prior", "--resume", str(legacy_run / prior), "--steps", "6"]) == 0
        assert json.loads((legacy_run / prior / "eval.json").read_text())["step"] == 6
    # the stage-1 checkpoint the priors were trained on is kept from pruning and still decodes
    assert main(["sample", str(legacy_run / "prior"), "--n", "4", "--out",
                 str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.png").is_file()
