"""Ctrl-C (SIGINT) or SIGTERM outside a training loop, also while the command still imports torch:
one line on stderr and exit 130 / 143, never a traceback, nothing half-written."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torch.utils.data._utils import ExceptionWrapper  # what re-raises a DataLoader worker's error

from vqvae import DataError, cli

from tests.e2e.test_reliability import one_line


def _run(until, *args: str, sig: int = signal.SIGINT) -> tuple[int, str]:
    """Start ``python -m vqvae ARGS``, send ``sig`` once ``until(stderr so far)`` holds; the exit
    status and the whole stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"))
    proc = subprocess.Popen([sys.executable, "-m", "vqvae", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(iter(lambda: proc.stderr.read(1), "")))
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not until("".join(err)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, f"finished before the signal: {''.join(err)}"
        proc.send_signal(sig)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=60)
    return proc.returncode, "".join(err)


@pytest.mark.parametrize("command, sig", [("train", signal.SIGINT), ("train-prior",
                                                                     signal.SIGTERM)])
def test_a_signal_while_starting_is_one_line(tmp_path, command, sig):
    start = time.monotonic()
    code, err = _run(lambda _: time.monotonic() > start + 0.8, command, "--out",
                     str(tmp_path / "run"), sig=sig)
    assert code == 128 + sig and "Traceback" not in err, err
    assert err.strip() == "vqvae: interrupted while starting"
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_encode(legacy_run, tmp_path, sig=signal.SIGINT):
    out = tmp_path / "out" / "codes.safetensors"
    code, err = _run(lambda err: "encode train:" in err and "img/s" in err, "encode",
                     str(legacy_run), "--out", str(out), "--batch-size", "1", "--device", "cpu",
                     sig=sig)
    assert code == 128 + sig and "Traceback" not in err, err
    assert err.splitlines()[-1] == f"vqvae: encode: interrupted by {sig.name}", err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []  # nor a temporary file


def test_sigterm_during_pack_and_pack_continues(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(120):
        Image.fromarray(np.full((4, 4), i % 256, np.uint8)).save(images / f"{i:04d}.png")
    out = tmp_path / "shards"
    code, err = _run(lambda _: (out / "train-000001.tar").exists(), "pack", str(images),
                     "--out", str(out), "--shard-size", "1", sig=signal.SIGTERM)
    assert code == 143 and "Traceback" not in err, err
    assert err.splitlines()[-1] == "vqvae: pack: interrupted by SIGTERM", err
    assert not list(out.glob(".*tmp*"))
    assert cli.main(["pack", str(images), "--out", str(out), "--shard-size", "1"]) == 0
    assert "packed 120 images (continued after" in capsys.readouterr().out


def test_a_dataloader_workers_error_is_its_own_message(monkeypatch, capsys):
    """A streaming worker's DataError reaches the main process wrapped with the worker's whole
    traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ...")."""
    try:
        raise DataError("none of the 4 images of a batch could be read (e.g. gone.png)")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")

    def encode(*args, **kwargs):
        wrapped.reraise()

    monkeypatch.setattr(cli, "encode_codes", encode)
    assert cli.main(["encode", "run", "--out", "codes.safetensors"]) == 2
    assert one_line(capsys) == ("vqvae: error: none of the 4 images of a batch could be read "
                                "(e.g. gone.png)")
