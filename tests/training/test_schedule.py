"""Stage 1's learning-rate schedule (--warmup, --schedule cosine): what it logs, and a cosine run
that resumes exactly (the schedule itself: tests/models/test_prior.py)."""

import warnings
from dataclasses import replace

import pytest
import torch

from vqvae import load_autoencoder
from vqvae.cli import main
from vqvae.config import resumed, run_config
from vqvae.store.runs import read_jsonl

from tests import tiny

TINY = tiny.stage1(every=10, device="cpu", lr="2e-3")


def test_a_cosine_run_anneals_to_zero_and_resumes_exactly(tmp_path):
    a, b, flat = tmp_path / "a", tmp_path / "b", tmp_path / "flat"
    cosine = [*TINY, "--schedule", "cosine", "--warmup", "2"]
    assert main(["train", *cosine, "--steps", "30", "--out", str(a)]) == 0
    assert main(["train", *cosine, "--steps", "30", "--minutes", "1e-9", "--out", str(b)]) == 0
    # the tiny time budget stopped it after step 1, inside the warm-up (which follows the step
    # alone); resumed with a budget that ends far after step 30, its cosine follows the steps
    assert (b / "checkpoints" / "latest").read_text().strip() == "step-0000001"
    assert main(["train", "--resume", str(b), "--minutes", "100"]) == 0
    wa, wb = load_autoencoder(a).state_dict(), load_autoencoder(b).state_dict()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-5), key
    rates = [r["lr"] for r in read_jsonl(a / "train.jsonl")]
    assert rates == sorted(rates, reverse=True) and rates[0] < 2e-3 and rates[-1] < 2e-3 * 0.02
    constant = [*TINY, "--schedule", "constant"]  # the default preset's is cosine
    assert main(["train", *constant, "--steps", "20", "--out", str(flat)]) == 0
    assert [r["lr"] for r in read_jsonl(flat / "train.jsonl")] == pytest.approx([2e-3, 2e-3])


def test_resuming_a_cosine_run_with_other_steps_says_so():
    cfg = run_config("default", train={"steps": 30, "schedule": "cosine"})
    with pytest.warns(UserWarning, match="changes this run's cosine schedule"):
        assert resumed(cfg, steps=60).train.steps == 60
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed(cfg, steps=30)  # the same schedule: an interrupted run goes on exactly
        resumed(replace(cfg, train=replace(cfg.train, schedule="constant")), steps=60)
    timed = replace(cfg, train=replace(cfg.train, minutes=10.0))
    with pytest.warns(UserWarning, match="when its 10 minutes are spent"):
        assert resumed(timed, minutes=20.0).train.minutes == 20.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed(timed, minutes=10.0)  # the run's own budget, what is left of it: no change
    sharp = run_config("default", train={"steps": 30, "schedule": "constant", "sharpen": 0.25})
    with pytest.warns(UserWarning, match="moves this run's --sharpen phase"):
        resumed(sharp, steps=60)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resumed(sharp, steps=30)
