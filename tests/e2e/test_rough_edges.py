"""Issue 28 item 8, the rough edges: each fault is one line naming the path, nothing is left
half-written and no temporary file stays behind (docs/reliability.md)."""

import errno
import json
import os
import socket
import subprocess

import numpy as np
import pytest
from PIL import Image

import vqvae.generation.codes
import vqvae.store.runs
import vqvae.training.stage1
from vqvae.cli import main
from vqvae.errors import DataError

from tests import tiny
from tests.e2e.test_reliability import one_line

TINY = tiny.stage1(every=None, eval_count=32, steps=2, device="cpu")


def _temporary(folder):
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def _images(folder, n=6):
    folder.mkdir()
    for i in range(n):
        Image.fromarray(np.full((4, 4), 10 * i, np.uint8)).save(folder / f"{i:04d}.png")
    return folder


def _disk_full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # no filename, as write/fsync raise


# 1. encode --out FOLDER is refused before anything is encoded
def test_encode_to_a_folder_is_refused_before_encoding(legacy_run, tmp_path, monkeypatch,
                                                       capsys):
    def never(*args, **kwargs):
        raise AssertionError("encoded before checking --out")

    monkeypatch.setattr(vqvae.generation.codes, "encode_dataset", never)
    folder = tmp_path / "codes"
    folder.mkdir()
    assert main(["encode", str(legacy_run), "--out", str(folder), "--device", "cpu"]) == 2
    line = one_line(capsys)
    assert f"{folder} is a folder: name the codes file" in line, line
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["encode", str(legacy_run), "--out", str(blocker / "c.safetensors"),
                 "--device", "cpu"]) == 2
    assert f"{blocker} is a file" in one_line(capsys)


# 2. inpaint --out FOLDER is refused up front, naming it, with no temporary file left
def test_inpaint_to_a_folder_is_refused_naming_it(legacy_run, tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.fromarray((np.arange(64).reshape(8, 8) * 4).astype(np.uint8)).save(image)
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    folder = tmp_path / "result"
    folder.mkdir()
    assert main(["inpaint", str(legacy_run / "maskgit"), "--image", str(image), "--mask",
                 str(tmp_path / "mask.png"), "--steps", "2", "--device", "cpu", "--out",
                 str(folder)]) == 2
    line = one_line(capsys)
    assert f"{folder} is a folder" in line and ".tmp" not in line, line
    assert not _temporary(tmp_path) and not list(folder.iterdir())
    assert not (tmp_path / "result.compare.png").exists()


def test_a_failed_atomic_write_names_the_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    from vqvae import fileio

    monkeypatch.setattr(fileio.os, "fsync", _disk_full)
    with pytest.raises(OSError) as caught:
        fileio.write_bytes(tmp_path / "a.bin", b"x")
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(tmp_path / "a.bin")
    assert not list(tmp_path.iterdir())


# 3. a full disk names the file: a log line, encode's codes, pack's shards
def test_a_full_disk_names_the_file(legacy_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "codes.safetensors"
    with monkeypatch.context() as m:
        m.setattr(os, "fsync", _disk_full)
        assert main(["encode", str(legacy_run), "--out", str(out), "--device", "cpu"]) == 1
        assert one_line(capsys) == f"vqvae: error: the disk is full: {out}"
        assert not _temporary(tmp_path)
        shards = tmp_path / "shards"
        assert main(["pack", str(_images(tmp_path / "images")), "--out", str(shards)]) == 1
        line = one_line(capsys)
        assert line.startswith(f"vqvae: error: the disk is full: {shards}/"), line
        assert not _temporary(shards)

    class FullFile:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        write = _disk_full

    def full_log(path, *args, **kwargs):  # the run's config and command line still fit
        return FullFile() if str(path).endswith("train.jsonl") else open(path, *args, **kwargs)

    monkeypatch.setattr(vqvae.store.runs, "open", full_log, raising=False)
    run = tmp_path / "new"
    assert main(["train", *TINY, "--out", str(run)]) == 1
    assert one_line(capsys) == f"vqvae: error: the disk is full: {run / 'train.jsonl'}"


# 4. a killed pack's temporary files are removed by the re-run
def test_pack_removes_a_killed_packs_temporary_files(tmp_path, capsys):
    images, out = _images(tmp_path / "images"), tmp_path / "shards"
    assert main(["pack", str(images), "--out", str(out), "--shard-size", "2"]) == 0
    stale = [out / ".train-000001.tar.tmp99999999", out / ".train-000002.tar.idx.json.tmp7",
             out / ".shards.json.tmp99999999"]
    for path in stale:
        path.write_bytes(b"half a shard")
    (out / ".notes.tmp1").write_text("not pack's")
    assert main(["pack", str(images), "--out", str(out), "--shard-size", "2"]) == 0
    assert "all packed before" in capsys.readouterr().out
    assert not any(p.exists() for p in stale) and (out / ".notes.tmp1").exists()


# 5. a lock held by a live process that may not be vqvae says how to clear it
def test_a_live_lock_names_its_process_and_how_to_clear_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run)]) == 0
    holder = subprocess.Popen(["sleep", "60"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        assert main(["train", "--resume", str(run), "--steps", "4"]) == 2
        line = one_line(capsys)
        assert f"in use by pid {holder.pid}" in line and "sleep 60" in line, line
        assert f"may not be vqvae: wait for it to finish, or delete {run / '.lock'} if no " \
               f"vqvae run uses this folder" in line, line
    finally:
        holder.kill()
        holder.wait()


# 6. a run whose start failed leaves a folder the same --out reuses
def test_a_failed_start_does_not_block_the_same_out(tmp_path, monkeypatch, capsys):
    def no_data(*args, **kwargs):
        raise DataError("the stream's first batch could not be read")

    run = tmp_path / "run"
    with monkeypatch.context() as m:
        m.setattr(vqvae.training.stage1, "train_batches", no_data)
        assert main(["train", *TINY, "--out", str(run)]) == 2
        assert "first batch" in one_line(capsys)
    assert (run / "config.json").is_file()
    with pytest.warns(UserWarning, match="start failed before its first step: it is reused"):
        assert main(["train", *TINY, "--out", str(run)]) == 0
    assert (run / "checkpoints" / "latest").is_file()
    assert (run / "command.txt").read_text().count("\n") == 1
    # a folder that trained is still refused
    assert main(["train", *TINY, "--out", str(run)]) == 2
    assert "already exists and is not empty" in one_line(capsys)
