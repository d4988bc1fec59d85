"""A real process killed or stopped mid-run: the last checkpoint stays readable and resumes."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vqvae import load_autoencoder
from vqvae.cli import main

from tests import tiny

TINY = tiny.stage1(every=None, eval_count=32, grid=2)


def _start(run: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    return subprocess.Popen([sys.executable, "-m", "vqvae", "train", *TINY, "--steps", "100000",
                             "--every", "3", "--out", str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoints(run: Path, proc: subprocess.Popen, count: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        steps = list((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else []
        latest = run / "checkpoints" / "latest"
        if latest.exists() and int(latest.read_text().split("-")[1]) >= 3 * count:
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint {count} in time (exit {proc.poll()}): {steps}")


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_or_stopped_run_keeps_a_readable_checkpoint_and_resumes(tmp_path, sig):
    run = tmp_path / "run"
    proc = _start(run)
    try:
        _wait_for_checkpoints(run, proc, 3)
        time.sleep(0.13)  # land somewhere inside a step or a checkpoint write
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        _, stderr = proc.communicate(timeout=60)  # reaps the process and closes its pipe
    if sig == signal.SIGTERM:  # graceful: checkpoint first, then exit 128 + 15, not 0
        assert proc.returncode == 143, stderr
    model = load_autoencoder(run)  # whatever moment it died at, the latest checkpoint loads
    step = int((run / "checkpoints" / "latest").read_text().split("-")[1])
    assert step >= 9 and model.cfg.codebook_size == 16
    resume = ["train", "--resume", str(run), "--steps", str(step + 3), "--minutes", "10"]
    if sig == signal.SIGKILL:  # the killed process could not release its lock: taken over
        with pytest.warns(UserWarning, match="no longer running"):
            assert main(resume) == 0
    else:
        assert main(resume) == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step + 3:07d}"
    assert not list((run / "checkpoints").glob(".tmp-*"))  # a crash's leftovers are cleaned
    assert not (run / ".lock").exists()  # released at the end
