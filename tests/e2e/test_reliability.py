"""Fault injection: each reproduction of the reliability issue as a test. After every fault the
run is resumable, ``latest`` is finite and inside the run, nothing a prior depends on is deleted,
and the user saw one line (docs/reliability.md lists these guarantees)."""

import errno
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import vqvae.training.stage1
from vqvae.store import checkpoint as ckpt
from vqvae import load_autoencoder
from vqvae.cli import main
from vqvae.store.runs import read_jsonl

from tests import tiny

TINY = tiny.stage1(every=None, eval_count=32, grid=2)
PRIOR = tiny.prior(every=None, eval_count=32, grid=2)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("vqvae: error")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def latest(run) -> str:
    return (run / "checkpoints" / "latest").read_text().strip()


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    run = tmp_path_factory.mktemp("rel") / "s"
    assert main(["train", *TINY, "--steps", "20", "--every", "10", "--out", str(run)]) == 0
    return run


# 1. a stage-1 checkpoint that codes and a prior depend on survives resuming stage 1
def test_checkpoints_a_prior_needs_are_never_pruned(tmp_path):
    s, p, codes = tmp_path / "s", tmp_path / "p", tmp_path / "c.safetensors"
    assert main(["train", *TINY, "--steps", "40", "--every", "20", "--out", str(s)]) == 0
    assert main(["encode", str(s), "--out", str(codes)]) == 0
    assert main(["train-prior", "--codes", str(codes), *PRIOR, "--steps", "20", "--every", "10",
                 "--out", str(p)]) == 0
    assert main(["train", "--resume", str(s), "--steps", "100"]) == 0
    kept = sorted(d.name for d in (s / "checkpoints").glob("step-*"))
    assert kept == ["step-0000040", "step-0000080", "step-0000100"]  # 40: needed; 80, 100: --keep 2
    needed = json.loads((s / "checkpoints" / "step-0000040" / "keep.json").read_text())
    assert any(str(codes.resolve()) in user for user in needed["needed_by"])
    assert main(["sample", str(p), "--n", "4"]) == 0
    assert main(["train-prior", "--resume", str(p), "--steps", "30"]) == 0


def test_keep_and_keep_every(tmp_path):
    s = tmp_path / "s"
    assert main(["train", *TINY, "--steps", "50", "--every", "5", "--keep", "1",
                 "--keep-every", "20", "--out", str(s)]) == 0
    assert sorted(d.name for d in (s / "checkpoints").glob("step-*")) == [
        "step-0000020", "step-0000040", "step-0000050"]


# 2. a NaN never becomes a checkpoint, in either stage
def test_divergence_stops_before_a_nan_checkpoint(tmp_path, stage1, capsys, monkeypatch):
    s = tmp_path / "s"
    assert main(["train", *TINY, "--lr", "inf", "--steps", "30", "--every", "3",
                 "--out", str(s)]) == 1
    line = one_line(capsys)
    assert "non-finite by step 3" in line and "no checkpoint was written" in line
    assert not list(s.glob("checkpoints/step-*"))
    p = tmp_path / "p"
    assert main(["train-prior", "--stage1", str(stage1), *PRIOR, "--lr", "inf", "--steps", "30",
                 "--every", "3", "--out", str(p)]) == 1
    assert "non-finite" in one_line(capsys)
    assert not list(p.glob("checkpoints/step-*"))
    # A divergence after good checkpoints: the good one stays latest, finite, and resumes.
    good = tmp_path / "good"
    assert main(["train", *TINY, "--steps", "6", "--every", "3", "--out", str(good)]) == 0
    real, calls = vqvae.training.stage1.vqvae_losses, []

    def diverging(x, out, *options):  # the second step after the resume goes NaN
        calls.append(1)
        losses = real(x, out, *options)
        return {k: v * float("nan") for k, v in losses.items()} if len(calls) >= 2 else losses

    monkeypatch.setattr(vqvae.training.stage1, "vqvae_losses", diverging)
    assert main(["train", "--resume", str(good), "--steps", "12"]) == 1
    assert "non-finite by step 9" in one_line(capsys) and latest(good) == "step-0000006"
    weights = load_autoencoder(good).state_dict()
    assert all(torch.isfinite(v.float()).all() for v in weights.values())
    monkeypatch.setattr(vqvae.training.stage1, "vqvae_losses", real)
    assert main(["train", "--resume", str(good), "--steps", "12"]) == 0


# 3. one run folder, one writer
def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(stage1, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (stage1 / ".lock").write_text(json.dumps({"pid": holder.pid,
                                                  "host": os.uname().nodename}))
        assert main(["train", "--resume", str(stage1), "--steps", "30"]) == 2
        assert f"in use by pid {holder.pid}" in one_line(capsys)
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match="no longer running"):
        assert main(["train", "--resume", str(stage1), "--steps", "30"]) == 0
    assert not (stage1 / ".lock").exists() and latest(stage1) == "step-0000030"


# 4. bad data and bad weights are never silent
def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    folder = tmp_path / "png16"
    folder.mkdir()
    ramp = (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280
    for i in range(4):
        Image.fromarray(ramp).save(folder / f"{i}.png")
    from vqvae import DataConfig, load_splits

    images = load_splits(DataConfig(source=str(folder), size=16)).train.images
    assert abs(images.float().mean().item() - 127.5) < 2  # clipped to white, it would be ~255


def test_flipped_bytes_in_weights_are_refused(tmp_path, stage1, capsys):
    copy = tmp_path / "copy"
    step = stage1 / "checkpoints" / latest(stage1)
    copy.mkdir()
    for name in ("model.safetensors", "config.json"):
        (copy / name).write_bytes((step / name).read_bytes())
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor: still a readable file
    (copy / "model.safetensors").write_bytes(bytes(data))
    assert main(["eval", str(copy), "--data", "digits"]) == 2
    assert "is corrupt" in one_line(capsys)


def tensor_bytes(path, name) -> tuple[int, int]:
    """Where tensor ``name``'s data lies in the safetensors file ``path`` (start, end)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8:8 + size])[name]["data_offsets"]
    return 8 + size + start, 8 + size + end


def test_flipped_bytes_in_training_state_are_refused(tmp_path, stage1, capsys):
    run = tmp_path / "run"
    shutil.copytree(stage1, run)
    step = run / "checkpoints" / latest(run)
    assert json.loads((step / "state.json").read_text())["state_sha256"]
    state = step / "state.safetensors"
    data = bytearray(state.read_bytes())
    start, end = tensor_bytes(state, "rng.cpu")
    data[end - 5] ^= 0xFF  # the random state: still a readable file, the run no longer the same
    state.write_bytes(bytes(data))
    assert main(["train", "--resume", str(run), "--steps", "40"]) == 2
    line = one_line(capsys)
    assert f"{state} is corrupt: its sha256 differs from the one recorded in " \
           f"{step / 'state.json'}" in line


def test_changed_codes_are_refused(tmp_path, stage1, capsys):
    codes = tmp_path / "c.safetensors"
    assert main(["encode", str(stage1), "--out", str(codes)]) == 0
    data = bytearray(codes.read_bytes())
    start, end = tensor_bytes(codes, "train")
    for at in range(start, min(end, start + 300)):  # other ids inside the codebook: still valid
        data[at] = (data[at] + 1) % 16
    codes.write_bytes(bytes(data))
    assert main(["train-prior", "--codes", str(codes), *PRIOR, "--steps", "2",
                 "--out", str(tmp_path / "p")]) == 2
    assert f"{codes} is corrupt: the sha256 of its code grids" in one_line(capsys)


def test_encode_reads_the_runs_own_data(tmp_path):
    data = tmp_path / "x.npy"
    np.save(data, np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    s = tmp_path / "s"
    assert main(["train", *tiny.edit(TINY, data=data), "--steps", "4", "--every", "4",
                 "--out", str(s)]) == 0
    assert main(["encode", str(s / "checkpoints"), "--out", str(tmp_path / "c.safetensors")]) == 0
    from vqvae import load_codes

    codes = load_codes(tmp_path / "c.safetensors")
    assert codes.source == str(data) and len(codes.split("train")) + len(codes.split("test")) == 40


# 5. latest is only ever followed inside its run
def test_latest_outside_the_run_is_ignored(tmp_path, stage1):
    other = tmp_path / "other"
    assert main(["train", *TINY, "--steps", "2", "--every", "2", "--out", str(other)]) == 0
    pointer = stage1 / "checkpoints" / "latest"
    before = pointer.read_text()
    pointer.write_text("../../other/checkpoints/step-0000002\n")
    try:
        with pytest.warns(UserWarning, match="does not name a checkpoint of this run"):
            assert ckpt.resolve(stage1).parent == stage1 / "checkpoints"
    finally:
        pointer.write_text(before)


# 6. absurd labels are an error, not an allocation
def test_huge_labels_are_one_line(tmp_path, capsys):
    data = tmp_path / "x.npz"
    np.savez(data, images=np.zeros((10, 8, 8), np.uint8), labels=np.full(10, 10**12))
    assert main(["train", *tiny.edit(TINY, data=data), "--out", str(tmp_path / "r")]) == 2
    assert "class ids" in one_line(capsys)


# 7. runs that resume without hand-editing
@pytest.mark.parametrize("damage", ["torn log", "empty latest", "binary latest"])
def test_damaged_run_folders_resume(tmp_path, damage):
    s = tmp_path / "s"
    assert main(["train", *TINY, "--steps", "20", "--every", "10", "--out", str(s)]) == 0
    if damage == "torn log":
        with open(s / "train.jsonl", "a") as f:
            f.write('{"step": 20, "loss"')
    else:
        (s / "checkpoints" / "latest").write_bytes(b"" if damage == "empty latest"
                                                   else b"\xff\xfe\x00garbage")
    if damage == "torn log":
        assert main(["train", "--resume", str(s), "--steps", "30"]) == 0
    else:
        with pytest.warns(UserWarning, match="does not name a checkpoint of this run"):
            assert main(["train", "--resume", str(s), "--steps", "30"]) == 0
    assert latest(s) == "step-0000030"
    assert [r["step"] for r in read_jsonl(s / "train.jsonl")] == [10, 20, 30]


def test_a_run_killed_before_its_first_checkpoint_resumes_from_scratch(tmp_path):
    s = tmp_path / "s"
    assert main(["train", *TINY, "--steps", "10", "--every", "10", "--out", str(s)]) == 0
    for step in (s / "checkpoints").glob("step-*"):  # as if killed before the first save
        shutil.rmtree(step)
    (s / "checkpoints" / "latest").unlink()
    with pytest.warns(UserWarning, match="no checkpoint yet"):
        assert main(["train", "--resume", str(s), "--steps", "10"]) == 0
    assert latest(s) == "step-0000010"


# 8. one line instead of a traceback
def test_bad_outputs_and_types_are_one_line(tmp_path, stage1, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["train", *TINY, "--out", str(afile)]) == 2
    assert "is a file" in one_line(capsys)
    assert main(["encode", str(stage1), "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_line(capsys)
    assert main(["eval", str(stage1), "--out", str(tmp_path)]) == 2
    assert "is a folder" in one_line(capsys)
    bad = tmp_path / "bad"
    bad.mkdir()
    raw = json.loads((stage1 / "config.json").read_text())
    raw["config"]["model"]["codebook_size"] = "big"
    (bad / "config.json").write_text(json.dumps(raw))
    assert main(["train", "--resume", str(bad)]) == 2
    assert "codebook_size must be int, got str 'big'" in one_line(capsys)


def test_state_json_with_a_wrong_type_names_the_field(tmp_path, stage1, capsys):
    run = tmp_path / "run"
    shutil.copytree(stage1, run)
    state = run / "checkpoints" / latest(run) / "state.json"
    meta = json.loads(state.read_text())
    good = dict(meta)
    meta["step"] = "ten"
    state.write_text(json.dumps(meta))
    assert main(["train", "--resume", str(run), "--steps", "40"]) == 2
    assert "step must be an integer" in one_line(capsys)
    state.write_text(json.dumps({**good, "seconds": "ten"}))  # the run's --minutes spent
    assert main(["train", "--resume", str(run), "--steps", "40"]) == 2
    assert "seconds must be a number >= 0, got 'ten'" in one_line(capsys)


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    s = tmp_path / "s"
    assert main(["train", *TINY, "--steps", "10", "--every", "10", "--out", str(s)]) == 0
    real = ckpt.write_bytes

    def full(path, data):
        if ".tmp-step-" in str(path.parent) and path.name == "state.safetensors":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(ckpt, "write_bytes", full)
    assert main(["train", "--resume", str(s), "--steps", "20"]) == 2
    line = one_line(capsys)
    assert "the disk is full" in line and "still names the previous one" in line
    assert latest(s) == "step-0000010" and not list((s / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(ckpt, "write_bytes", real)
    assert main(["train", "--resume", str(s), "--steps", "20"]) == 0


# 9. smaller ones
def test_smaller_faults(tmp_path, stage1, capsys):
    assert main(["train", "--resume", str(stage1), "--steps", "5"]) == 2
    assert "already at step" in one_line(capsys)
    prior = tmp_path / "p"
    assert main(["train-prior", "--stage1", str(stage1), *PRIOR, "--steps", "2", "--every", "2",
                 "--out", str(prior)]) == 0
    assert main(["sample", str(prior), "--n", "4", "--batch-size", "0"]) == 2
    assert "batch_size must be >= 1" in one_line(capsys)
    assert main(["sample", str(prior), "--n", "4", "--temperature", "nan"]) == 2
    assert "temperature" in one_line(capsys)
    leftover = stage1 / "checkpoints" / ".latest.tmp12345"
    leftover.write_text("step-0000001\n")
    (stage1 / ".config.json.tmp999").write_text("{")
    more = str(int(latest(stage1)[5:]) + 2)
    assert main(["train", "--resume", str(stage1), "--steps", more]) == 0
    assert not leftover.exists() and not (stage1 / ".config.json.tmp999").exists()



@pytest.mark.parametrize("where", ["buffer", "parameter", "optimizer"])
def test_a_non_finite_buffer_parameter_or_optimizer_state_is_never_saved(tmp_path, capsys,
                                                                        monkeypatch, where):
    """The loss stays finite while something the checkpoint holds goes non-finite (as BatchNorm's
    running_var does at --lr 1e9): the run stops naming it, the good checkpoint stays latest."""
    run = tmp_path / "r"
    assert main(["train", *TINY, "--steps", "6", "--every", "3", "--out", str(run)]) == 0
    real, calls = vqvae.training.stage1.train_step, []

    def planting(net, model, opt, *args, **kwargs):
        out = real(net, model, opt, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # after step 9, the save's: its loss was finite
            with torch.no_grad():
                if where == "buffer":
                    next(b for n, b in model.named_buffers() if "running_var" in n)[0] = math.inf
                elif where == "parameter":
                    next(model.decoder.parameters()).view(-1)[0] = math.nan
                else:
                    next(iter(opt.state.values()))["exp_avg_sq"].view(-1)[0] = math.inf
        return out

    monkeypatch.setattr(vqvae.training.stage1, "train_step", planting)
    assert main(["train", "--resume", str(run), "--steps", "9"]) == 1
    line = one_line(capsys)
    named = {"buffer": "buffer encoder.", "parameter": "parameter decoder.",
             "optimizer": "optimizer state exp_avg_sq of "}[where]
    assert named in line and "non-finite by step 9" in line, line
    assert latest(run) == "step-0000006"
    monkeypatch.setattr(vqvae.training.stage1, "train_step", real)
    assert main(["train", "--resume", str(run), "--steps", "9"]) == 0


def test_a_step_folder_that_is_a_link_is_never_followed_nor_pruned(tmp_path):
    """A step folder that is a symbolic link into another run is not this run's checkpoint:
    ``latest`` naming it falls back to the newest real one (with a warning), and pruning leaves
    the link and the other run's checkpoint alone."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert main(["train", *TINY, "--steps", "6", "--every", "3", "--keep", "5",
                 "--out", str(mine)]) == 0
    assert main(["train", *TINY, "--steps", "6", "--every", "3", "--seed", "1",
                 "--out", str(other)]) == 0
    linked = mine / "checkpoints" / "step-0000099"
    linked.symlink_to(other / "checkpoints" / "step-0000006")
    (mine / "checkpoints" / "latest").write_text("step-0000099\n")
    with pytest.warns(UserWarning, match="symbolic link"):
        assert ckpt.resolve(mine) == mine / "checkpoints" / "step-0000006"
    with pytest.warns(UserWarning, match="symbolic link"):
        assert main(["train", "--resume", str(mine), "--steps", "12", "--keep", "1"]) == 0
    assert latest(mine) == "step-0000012" and linked.is_symlink()  # the link was not pruned
    assert (other / "checkpoints" / "step-0000006" / "model.safetensors").is_file()
    assert not (mine / "checkpoints" / "step-0000006").exists()  # its own were
