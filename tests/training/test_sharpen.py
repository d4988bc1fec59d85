"""--sharpen: the last share of a stage-1 run trains the decoder alone against a discriminator at a
tenth of the rate; the split follows the run's clock, keeps the codes and resumes exactly."""

import math
import shutil

import pytest
import torch
from safetensors.torch import load_file

from vqvae.cli import main
from vqvae.config import run_config
from vqvae.store.runs import read_jsonl
from vqvae.training.schedule import Phases, RunClock, Schedule

from tests import tiny

TINY = tiny.edit(tiny.STAGE1_16PX, every=5, keep=10, disc_channels=8, sharpen="0.5")


def test_the_phases_split_the_steps_and_each_anneals_its_own_rate():
    clock = RunClock(steps=8, minutes=None)
    phases = Phases(clock, share=0.25)
    assert [phases.last(s) for s in range(8)] == [False] * 6 + [True] * 2
    tc = run_config("default", train={"steps": 8, "lr": 1e-3}).train
    schedule = Schedule(tc, torch.optim.Adam([torch.zeros(1, requires_grad=True)]), clock,
                        phases, last_scale=0.1)
    rates = [schedule.set(s) for s in range(8)]
    assert rates[0] == pytest.approx(1e-3)  # the main phase's cosine over its 6 steps
    assert rates[5] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(5 / 6 * math.pi)))
    assert rates[6] == pytest.approx(1e-4) and rates[7] == pytest.approx(0.5e-4)
    timed = RunClock(steps=10**6, minutes=1.0, spent=50.0)  # 50 of 60 s spent: the last phase
    assert Phases(timed, 0.25).last(0) and not Phases(timed, 0.1).last(0)


def _weights(run, step, name="model.safetensors"):
    return load_file(run / "checkpoints" / f"step-{step:07d}" / name)


def test_the_sharpen_phase_keeps_the_codes_and_resumes_exactly(tmp_path):
    full = tmp_path / "full"
    assert main(["train", *TINY, "--steps", "20", "--out", str(full)]) == 0
    start, end = _weights(full, 10), _weights(full, 20)  # steps 10-19 are the phase
    for key in start:
        changed = not torch.equal(start[key], end[key])
        assert changed == key.startswith("decoder."), key  # BatchNorm statistics too
    assert (full / "checkpoints" / "step-0000020" / "adversary.safetensors").is_file()
    main_phase, last_phase = read_jsonl(full / "train.jsonl")  # a log line per 10 steps
    assert (main_phase["sharpening"], last_phase["sharpening"]) == (0, 1)
    assert main_phase["gan_d"] == 0 and last_phase["gan_d"] > 0
    assert 0 < last_phase["lr"] < 1e-4  # a tenth of the rate, annealing
    # the same run interrupted before the phase (step 5) and inside it (step 15)
    for stop in (5, 15):
        part = tmp_path / f"part{stop}"
        shutil.copytree(full, part)
        for later in range(stop + 5, 21, 5):
            shutil.rmtree(part / "checkpoints" / f"step-{later:07d}")
        (part / "checkpoints" / "latest").write_text(f"step-{stop:07d}\n")
        assert main(["train", "--resume", str(part)]) == 0
        for name in ("model.safetensors", "adversary.safetensors"):
            a, b = _weights(full, 20, name), _weights(part, 20, name)
            assert a.keys() == b.keys()
            for key in a:
                assert torch.allclose(a[key].float(), b[key].float(), atol=1e-6), (stop, key)


def test_sharpen_and_a_whole_run_gan_are_one_choice(tmp_path, capsys):
    assert main(["train", *TINY, "--gan-weight", "0.3", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--sharpen" in err and "choose one" in err and err.count("\n") == 1
    assert run_config("default").train.sharpen == 0  # off: it measured no sharper
