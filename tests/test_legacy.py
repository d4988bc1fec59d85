"""Run folders written before the package was split into sub-packages (tests/fixtures/legacy_run,
written by main at 3659d9a) still load, encode, score, sample and resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

import vqvae
from vqvae.cli import main
from vqvae.evaluation.metrics import evaluate_prior

FIXTURE = Path(__file__).parent / "fixtures" / "legacy_run"
RECORDED_ROOT = "/tmp/legacy/run"  # where it was written (its configs and keep marks say so)


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A copy of the fixture with the recorded root rewritten to the copy's place."""
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    for path in run.rglob("*.json"):
        path.write_text(path.read_text().replace(RECORDED_ROOT, str(run)))
    return run


def test_stage1_encodes_its_data_as_the_old_code_did(legacy):
    model = vqvae.load_autoencoder(legacy)
    old = vqvae.load_codes(legacy / "prior" / "codes.safetensors")
    fresh = vqvae.encode_dataset(legacy, progress=False)
    assert torch.equal(fresh.split("train").codes, old.split("train").codes)
    assert torch.equal(fresh.split("test").codes, old.split("test").codes)
    assert model.cfg.codebook_size == 16


@pytest.mark.parametrize("prior", ["prior", "maskgit"])
def test_priors_score_as_the_old_code_did(legacy, prior):
    model = vqvae.load_prior(legacy / prior)
    test = vqvae.load_codes(legacy / prior / "codes.safetensors").split("test")
    scored = evaluate_prior(model, test.codes)["bits_per_code"]
    recorded = json.loads((legacy / prior / "eval.json").read_text())["bits_per_code"]
    assert scored == pytest.approx(recorded, abs=1e-5)


def test_old_runs_resume_and_sample(legacy, tmp_path):
    assert main(["train", "--resume", str(legacy), "--steps", "6", "--device", "cpu"]) == 0
    assert json.loads((legacy / "eval.json").read_text())["step"] == 6
    for prior in ("prior", "maskgit"):
        assert main(["train-prior", "--resume", str(legacy / prior), "--steps", "6"]) == 0
        assert json.loads((legacy / prior / "eval.json").read_text())["step"] == 6
    # the stage-1 checkpoint the priors were trained on is kept from pruning and still decodes
    assert main(["sample", str(legacy / "prior"), "--n", "4", "--out",
                 str(tmp_path / "s")]) == 0
    assert (tmp_path / "s" / "samples.png").is_file()
