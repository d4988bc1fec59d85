"""Mixed precision (bf16/fp16 with loss scaling) and deterministic kernels for exact resume."""

import json
import math
import os

import pytest
import torch

from vqvae import load_autoencoder
from vqvae.store.checkpoint import STATE_META, load_prior
from vqvae.cli import main
from vqvae.config import ConfigError, TrainConfig
from vqvae.precision import CUBLAS_WORKSPACE, autocast, loss_scaler, numerics
from vqvae.store.runs import read_jsonl
from vqvae.training.stage2 import resident

from tests import tiny

TINY, PRIOR = tiny.STAGE1, tiny.PRIOR

CUDA = pytest.mark.cuda


def _flags() -> tuple:
    return (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled())


def test_numerics_sets_cuda_flags_and_restores_them(monkeypatch):
    """The flags are process-wide: set for the run, put back after it (also on error)."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = _flags()
    with pytest.raises(RuntimeError, match="inside"):
        with numerics("tf32", torch.device("cuda"), deterministic=True):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
            assert torch.are_deterministic_algorithms_enabled()
            assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
            raise RuntimeError("inside")
    assert _flags() == before
    with numerics("fp32", torch.device("cuda")):
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert not torch.are_deterministic_algorithms_enabled()
    with numerics("bf16", torch.device("cpu"), deterministic=True):
        assert _flags() == before  # a CPU needs none of it
    assert _flags() == before


def test_autocast_dtypes_and_scaler():
    x = torch.randn(4, 8)
    layer = torch.nn.Linear(8, 8)
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                             ("fp16", torch.float16)):
        with autocast(precision, x.device):
            assert layer(x).dtype == dtype, precision
    assert loss_scaler("fp16", x.device).is_enabled()
    off = loss_scaler("bf16", x.device)
    loss = layer(x).sum()
    assert not off.is_enabled() and off.scale(loss) is loss


def test_fp16_with_gan_is_refused():
    with pytest.raises(ConfigError, match="bf16"):
        TrainConfig(precision="fp16", gan_weight=0.1)
    TrainConfig(precision="fp16")  # alone it is fine


def test_fp16_stage1_resumes_exactly_with_its_loss_scale(tmp_path):
    """fp16 steps go through the loss scaler (the first ones overflow and are skipped, lowering
    the scale); its scale is saved with every checkpoint, so a resumed run equals the
    uninterrupted one."""
    a, b = tmp_path / "a", tmp_path / "b"
    fp16 = [*TINY, "--precision", "fp16", "--schedule", "constant"]  # see test_cli's resume test
    assert main(["train", *fp16, "--steps", "30", "--out", str(a)]) == 0
    assert main(["train", *fp16, "--steps", "15", "--out", str(b)]) == 0
    state = json.loads((b / "checkpoints" / "step-0000015" / STATE_META).read_text())
    assert 0 < state["loss_scaler"]["scale"] <= 65536.0
    assert main(["train", "--resume", str(b), "--steps", "30"]) == 0
    wa, wb = load_autoencoder(a).state_dict(), load_autoencoder(b).state_dict()
    for key in wa:
        assert wa[key].dtype != torch.float16, key  # weights stay fp32
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-5), key
    losses = read_jsonl(a / "train.jsonl")
    assert losses and all(math.isfinite(r["mse_x"]) for r in losses)


def test_fp16_prior_with_grad_clip(tmp_path):
    """The prior's fp16 steps clip the unscaled gradients; the run trains and resumes."""
    stage1, run = tmp_path / "stage1", tmp_path / "prior"
    assert main(["train", *TINY, "--steps", "15", "--out", str(stage1)]) == 0
    options = ["--stage1", str(stage1), *PRIOR, "--precision", "fp16", "--grad-clip", "1.0"]
    assert main(["train-prior", *options, "--steps", "10", "--out", str(run)]) == 0
    assert main(["train-prior", "--resume", str(run), "--steps", "20"]) == 0
    bits = [r["bits"] for r in read_jsonl(run / "train.jsonl")]
    assert len(bits) == 2 and all(math.isfinite(b) for b in bits)
    assert all(p.dtype == torch.float32 for p in load_prior(run).parameters())


def test_resident_codes_stay_on_the_host_without_a_gpu():
    codes = torch.randint(0, 512, (10, 4, 4))
    assert resident(codes, 512, torch.device("cpu")) is codes


@CUDA
def test_resident_codes_on_cuda():
    codes = torch.randint(0, 512, (10, 4, 4))
    on = resident(codes, 512, torch.device("cuda"))
    assert on.device.type == "cuda" and on.dtype == torch.int16
    assert torch.equal(on.long().cpu(), codes)


@CUDA
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_deterministic_resume_is_exact_on_cuda(tmp_path, precision):
    """With --deterministic a run resumed on CUDA ends with the uninterrupted run's weights, bit
    for bit (without it, atomics in convolution backward and index_add make them drift)."""
    a, b = tmp_path / "a", tmp_path / "b"
    options = [*TINY, "--device", "cuda", "--deterministic", "--precision", precision,
               "--schedule", "constant"]  # see tests/cli/test_cli.py's resume test
    assert main(["train", *options, "--steps", "30", "--out", str(a)]) == 0
    assert main(["train", *options, "--steps", "15", "--out", str(b)]) == 0
    assert main(["train", "--resume", str(b), "--steps", "30"]) == 0
    wa, wb = load_autoencoder(a).state_dict(), load_autoencoder(b).state_dict()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@CUDA
def test_prior_deterministic_resume_is_exact_on_cuda(tmp_path):
    stage1, a, b = tmp_path / "stage1", tmp_path / "a", tmp_path / "b"
    assert main(["train", *TINY, "--steps", "15", "--device", "cuda", "--out", str(stage1)]) == 0
    options = ["--stage1", str(stage1), *PRIOR, "--device", "cuda", "--deterministic",
               "--precision", "bf16"]
    assert main(["train-prior", *options, "--steps", "20", "--out", str(a)]) == 0
    assert main(["train-prior", *options, "--steps", "10", "--out", str(b)]) == 0
    assert main(["train-prior", "--resume", str(b), "--steps", "20"]) == 0
    wa, wb = load_prior(a).state_dict(), load_prior(b).state_dict()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


@CUDA
@pytest.mark.parametrize("options", [["--precision", "fp16"],
                                     ["--compile", "--compile-mode", "reduce-overhead"]])
def test_stage1_trains_on_cuda(tmp_path, options):
    """fp16 with its scaler, and the step captured in CUDA graphs by torch.compile."""
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "30", "--device", "cuda", *options,
                 "--out", str(run)]) == 0
    losses = read_jsonl(run / "train.jsonl")
    assert len(losses) == 3 and all(math.isfinite(r["mse_x"]) for r in losses)
    assert losses[-1]["mse_x"] < losses[0]["mse_x"]
