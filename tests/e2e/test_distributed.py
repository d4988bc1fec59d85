"""Data parallelism on the CPU with gloo, 2 processes: identical ranks, the same training as one
process with the global batch, checkpoints that resume in one process, torchrun end to end.

The processes are started here (torch.multiprocessing / torchrun) with a time limit and killed on
any failure.
"""

import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import vqvae.training.loop
import vqvae.training.schedule
import vqvae.training.stage1
from vqvae import load_autoencoder
from vqvae.cli import main
from vqvae.store.runs import read_jsonl

from tests import tiny

WORLD, BATCH, STEPS = 2, 8, 20  # per-rank batch; the 1-process reference uses WORLD * BATCH
LIMIT_S = 120  # per group of processes; a healthy run takes a few seconds
# 2 x B vs 1 x 2B: only the order of floating-point sums differs (gradients, BatchNorm statistics,
# cluster sums), so the per-step loss terms agree to a relative EARLY_TOL over the first EARLY
# steps (measured: 5e-5; with unsynchronised BatchNorm they differ by 1-3% from step 1). Later, a
# near-tie in a nearest-code search may flip one assignment and the runs drift apart slowly:
# RUN_TOL over the whole run (measured: 0.4%). Those figures are the seed's MSE at a constant rate:
# with the default preset's L1 + cosine the ema runs drifted 4.5% apart by step 20 (measured), so
# these runs keep MSE; the data-parallel machinery tested is the same.
EARLY, EARLY_TOL, RUN_TOL = 5, 2e-4, 1e-2
# No --batch-size: each run names its own (BATCH per rank, WORLD * BATCH in one process).
TINY = tiny.stage1(codebook_size=32, batch_size=None, every=10, steps=STEPS, kmeans_init="true",
                   restart_after=3, device="cpu", recon_loss="mse", schedule="constant")
PRIOR = tiny.prior(d_model=32, batch_size=8, eval_count=None, grid=2, device="cpu")
QUANTIZERS = ("vq", "ema")
RUNS, RESUMED = (*QUANTIZERS, "vq-resume"), 5  # vq-resume: the vq run resumed by 2 ranks
# In this configuration 1-6 codes are restarted at every step from step 4 on (counted by hand),
# so the per-step comparison also covers restart candidates drawn from both ranks' vectors.


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, ports: list[int], out: str) -> None:
    """One rank: `vqvae train` through the CLI for each quantizer (LOG_EVERY = 1 for per-step
    losses), then a copy of the vq run resumed for RESUMED more steps; after each, this rank's
    weights and buffers to a file."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    vqvae.training.loop.LOG_EVERY = 1
    trained = {}
    real = vqvae.training.stage1.data_parallel

    def keep(model, runtime):  # the unwrapped model this rank trains
        trained["model"] = model
        return real(model, runtime)

    vqvae.training.stage1.data_parallel = keep
    out = Path(out)
    copied = out / "vq-resume" / ".copied"
    for name, port in zip(RUNS, ports):
        os.environ["MASTER_PORT"] = str(port)
        if name in QUANTIZERS:
            argv = [*TINY, "--quantizer", name, "--batch-size", str(BATCH),
                    "--out", str(out / name)]
        else:  # rank 0 copies the finished vq run, the other ranks wait for the copy
            if rank == 0:
                shutil.copytree(out / "vq", out / name)
                copied.touch()
            deadline = time.monotonic() + 60
            while not copied.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            argv = ["--resume", str(out / name), "--steps", str(STEPS + RESUMED)]
        code = main(["train", *argv])
        assert code == 0, f"rank {rank}: vqvae train {name} exited with {code}"
        state = {k: v.detach().contiguous() for k, v in trained["model"].state_dict().items()}
        save_file(state, str(out / f"{name}-rank{rank}.safetensors"))


def _spawn(worker, *args) -> None:
    """``worker(rank, *args)`` in WORLD processes, killed on a failure or after LIMIT_S."""
    ctx = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + LIMIT_S
    try:
        while not ctx.join(timeout=1):  # raises if a rank failed
            if time.monotonic() > deadline:
                raise TimeoutError(f"{WORLD} ranks did not finish in {LIMIT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """Both quantizers trained by 2 ranks of batch BATCH (started once for the module)."""
    out = tmp_path_factory.mktemp("ddp")
    _spawn(_worker, [_free_port() for _ in RUNS], str(out))
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process with the global batch WORLD * BATCH, per-step logs."""
    out = tmp_path_factory.mktemp("single")
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(vqvae.training.loop, "LOG_EVERY", 1)
        for quantizer in QUANTIZERS:
            assert main(["train", *TINY, "--quantizer", quantizer, "--batch-size",
                         str(WORLD * BATCH), "--out", str(out / quantizer)]) == 0
    return out


@pytest.mark.parametrize("run", RUNS)
def test_ranks_hold_bit_identical_weights_and_buffers(two_ranks, run):
    ranks = [load_file(str(two_ranks / f"{run}-rank{r}.safetensors")) for r in range(WORLD)]
    assert "quantizer.codebook" in ranks[0] and "encoder.1.running_var" in ranks[0]
    assert bool(ranks[0]["quantizer.initialized"])  # k-means ran
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), key


@pytest.mark.parametrize("quantizer", QUANTIZERS)
def test_two_ranks_train_like_one_process_with_the_global_batch(two_ranks, one_process,
                                                                quantizer):
    two, one = read_jsonl(two_ranks / quantizer / "train.jsonl"), read_jsonl(
        one_process / quantizer / "train.jsonl")
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(1, STEPS + 1))
    gaps = [max(abs(a[k] - b[k]) / abs(b[k]) for k in ("mse_x", "mse_e", "mse_z"))
            for a, b in zip(two, one)]  # per step: the largest relative difference
    assert max(gaps[:EARLY]) <= EARLY_TOL, gaps
    assert max(gaps) <= RUN_TOL, gaps
    held_out = [json.loads((d / quantizer / "eval.json").read_text())
                for d in (two_ranks, one_process)]
    assert held_out[0]["images"] == held_out[1]["images"] == 180  # sharded, then summed
    for key in ("psnr", "usage", "perplexity"):
        assert held_out[0][key] == pytest.approx(held_out[1][key], rel=RUN_TOL), key


def test_checkpoint_of_two_ranks_resumes_in_one_process(two_ranks, tmp_path, monkeypatch):
    model = load_autoencoder(two_ranks / "vq")  # a plain process, plain BatchNorm2d
    assert not any(k.startswith("module.") for k in model.state_dict())
    state = json.loads((two_ranks / "vq/checkpoints/step-0000020/state.json").read_text())
    assert state["world_size"] == WORLD and state["global_batch"] == WORLD * BATCH
    # One process with the same global batch continues the same data order from the same
    # checkpoint: its steps 21-25 are those of the 2 ranks that resumed it.
    monkeypatch.setattr(vqvae.training.loop, "LOG_EVERY", 1)
    run = tmp_path / "vq"
    shutil.copytree(two_ranks / "vq", run)
    assert main(["train", "--resume", str(run), "--steps", str(STEPS + RESUMED), "--batch-size",
                 str(WORLD * BATCH)]) == 0
    one, two = (read_jsonl(d / "train.jsonl")[STEPS:] for d in (run, two_ranks / "vq-resume"))
    assert [r["step"] for r in one] == [r["step"] for r in two] == list(range(21, 26))
    for a, b in zip(two, one):
        for k in ("mse_x", "mse_e", "mse_z"):
            assert a[k] == pytest.approx(b[k], rel=EARLY_TOL), (a["step"], k)
    # Another global batch is allowed, with a warning that says so.
    with pytest.warns(UserWarning, match="global batch changes from 16"):
        assert main(["train", "--resume", str(run), "--steps", str(STEPS + RESUMED + 2),
                     "--batch-size", str(BATCH)]) == 0


def _torchrun(*argv: str) -> str:
    """``torchrun --standalone --nproc_per_node 2 -m vqvae ARGV``, killed (whole process group)
    on timeout or failure."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(vqvae.__file__).parents[1]),
                                          os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", "-m", "vqvae", *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LIMIT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-3000:]
    return out


def test_torchrun_sharpen_phase_freezes_the_codes_on_every_rank(tmp_path):
    """--sharpen under 2 ranks: the data-parallel wrapper is rebuilt when the encoder and
    quantizer freeze (DDP would wait for their gradients otherwise); only the decoder moves."""
    run = tmp_path / "sharp"
    out = _torchrun("train", *tiny.edit(TINY, steps=20, batch_size=BATCH, disc_channels=8,
                                        sharpen="0.5", out=str(run)))
    assert out.count("trained the decoder alone") == 1, out[-3000:]  # rank 0's summary
    start, end = (load_file(run / "checkpoints" / f"step-{s:07d}" / "model.safetensors")
                  for s in (10, 20))
    moved = {key.split(".")[0] for key in start if not torch.equal(start[key], end[key])}
    assert moved == {"decoder"}
    assert [r["sharpening"] for r in read_jsonl(run / "train.jsonl")][-1] == 1


def test_torchrun_trains_the_prior(two_ranks, tmp_path):
    prior = tmp_path / "prior"
    out = _torchrun("train-prior", "--stage1", str(two_ranks / "vq"), "--out", str(prior),
                    *tiny.edit(PRIOR, steps=6, every=3))
    assert out.count("trained the prior to step 6") == 1  # rank 0 alone prints
    assert [m["step"] for m in read_jsonl(prior / "metrics.jsonl")] == [3, 6]
    result = json.loads((prior / "eval.json").read_text())
    assert result["grids"] == 180 and result["bits_per_code"] > 0
    assert (prior / "checkpoints/step-0000006/model.safetensors").exists()
    # Resuming with another --steps changes the cosine schedule: one warning, from rank 0 (the
    # config is read before the process group exists, on every rank).
    out = _torchrun("train-prior", "--resume", str(prior), "--steps", "8")
    assert out.count("--steps 8 changes this run's cosine schedule") == 1, out[-3000:]
    assert out.count("trained the prior to step 8") == 1



BUDGET = 0.02  # minutes of a timed prior run: 1.2 s of training
SKEW = 3.0  # rank 1's clock runs this many times as fast as rank 0's


def _timed_worker(rank: int, ports: list[int], stage1: str, out: str) -> None:
    """One rank of a ``train-prior --minutes`` run whose rank 1 reads its clock SKEW x fast, then
    of its resume with twice the budget; after each, this rank's weights to a file."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    if rank == 1:
        elapsed = vqvae.training.schedule.RunClock.elapsed
        vqvae.training.schedule.RunClock.elapsed = lambda self: (
            self.spent + SKEW * (elapsed(self) - self.spent))
    trained = {}
    stage2 = importlib.import_module("vqvae.training.stage2")  # the package exports a function
    real = stage2.data_parallel                              # of the same name

    def keep(module, runtime):  # PriorLoss, whose .prior this rank trains
        trained["prior"] = module.prior
        return real(module, runtime)

    stage2.data_parallel = keep
    run = str(Path(out) / "prior")
    first = ["--stage1", stage1, "--out", run,
             *tiny.edit(PRIOR, steps=1000000, every=100000, schedule="cosine")]
    for name, port, argv in (("first", ports[0], first),
                             ("resumed", ports[1], ["--resume", run])):
        os.environ["MASTER_PORT"] = str(port)
        code = main(["train-prior", *argv, "--minutes", str(BUDGET if name == "first" else
                                                              2 * BUDGET)])
        assert code == 0, f"rank {rank}: train-prior {name} exited with {code}"
        state = {k: v.detach().contiguous() for k, v in trained["prior"].state_dict().items()}
        save_file(state, str(Path(out) / f"{name}-rank{rank}.safetensors"))
        if rank == 0:
            last = sorted((Path(run) / "checkpoints").glob("step-*"))[-1]
            shutil.copy(last / "state.json", Path(out) / f"{name}-state.json")


def test_a_minutes_budget_stops_all_ranks_together_on_the_fastest_clock(two_ranks, tmp_path):
    """--minutes with 2 ranks whose clocks disagree (rank 1's runs SKEW x fast): each rank
    must stop at the step the others stop at (one that stopped alone would leave the other
    waiting in a collective until the time limit) and set the same cosine rate from the same
    agreed seconds, so their weights stay bit-identical; the checkpoint records the run's
    seconds, and the resumed run goes on from them to its new budget."""
    _spawn(_timed_worker, [_free_port(), _free_port()], str(two_ranks / "vq"), str(tmp_path))
    states = []
    for name in ("first", "resumed"):
        ranks = [load_file(str(tmp_path / f"{name}-rank{r}.safetensors")) for r in range(WORLD)]
        for key in ranks[0]:
            assert torch.equal(ranks[0][key], ranks[1][key]), (name, key)
        states.append(json.loads((tmp_path / f"{name}-state.json").read_text()))
    first, second = states  # the seconds are the fast clock's: the budget ends by it
    assert first["step"] > 1 and 60 * BUDGET <= first["seconds"] < 60 * BUDGET + LIMIT_S / 2
    assert second["step"] > first["step"] and second["seconds"] >= 2 * 60 * BUDGET
