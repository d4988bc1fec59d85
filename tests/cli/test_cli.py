import json
import math
import subprocess
import sys

import pytest
import torch
from PIL import Image

from vqvae import load_autoencoder
from vqvae.cli import main, make_parser
from vqvae.config import run_config
from vqvae.options import given
from vqvae.store.runs import read_jsonl

from tests import tiny

TINY = tiny.STAGE1


def test_help_for_every_command(capsys):
    for argv in ([], ["train"], ["reconstruct"], ["interpolate"], ["eval"]):
        with pytest.raises(SystemExit) as e:
            main([*argv, "--help"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--codebook-size" in text and "--resume" in text and "--minutes" in text


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "vqvae", "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "train" in out and "interpolate" in out


def test_train_resume_reconstruct_interpolate_eval(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "30", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "PSNR" in out and "sample_ae_2" in out
    for name in ("config.json", "eval.json", "metrics.jsonl", "train.jsonl", "curves.png",
                 "sample_ae_1.png", "sample_ae_2.png", "sample_inter.png",
                 "checkpoints/step-0000030/model.safetensors",
                 "checkpoints/step-0000030/config.json", "samples/sample_ae_1_0000015.png"):
        assert (run / name).exists(), name
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [15, 30]
    assert {"psnr", "mse", "usage", "perplexity", "dead_codes"} <= set(metrics[0])
    losses = read_jsonl(run / "train.jsonl")
    assert {"mse_x", "mse_e", "mse_z", "loss"} <= set(losses[0])
    with Image.open(run / "sample_ae_1.png") as img:
        assert img.size[0] == img.size[1] > 8 * 8

    # resume: continues from step 30 to 45, logs keep one line per step
    assert main(["train", "--resume", str(run), "--steps", "45"]) == 0
    assert "step 45" in capsys.readouterr().out
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl")] == [15, 30, 45]
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-0000045"

    assert main(["reconstruct", str(run), "--n", "4", "--out", str(tmp_path / "rec")]) == 0
    assert (tmp_path / "rec" / "sample_ae_1.png").exists()
    assert main(["interpolate", str(run), "--n", "5"]) == 0
    with Image.open(run / "interpolate" / "sample_inter.png") as img:
        assert img.size[0] == img.size[1]  # 5 pairs x 5 steps
    assert main(["eval", str(run), "--split", "test"]) == 0
    result = json.loads((run / "eval_test.json").read_text())
    assert result["images"] == 180 and 0 < result["usage"] <= 100 and result["psnr"] > 5


def test_resume_matches_uninterrupted_run(tmp_path):
    """On the CPU, bit-exact kernels: no option needed (CUDA: tests/test_precision.py). The
    shorter run stands for an interrupted one at a constant rate: resumed to more --steps, a
    cosine schedule anneals differently (the cosine's own exact resume:
    tests/training/test_schedule.py)."""
    a, b = tmp_path / "a", tmp_path / "b"
    cpu = [*TINY, "--device", "cpu", "--schedule", "constant"]
    assert main(["train", *cpu, "--steps", "30", "--out", str(a)]) == 0
    assert main(["train", *cpu, "--steps", "15", "--out", str(b)]) == 0
    assert main(["train", "--resume", str(b), "--steps", "30"]) == 0
    # Same data order, optimizer state and RNG: the resumed weights equal the uninterrupted ones.
    wa, wb = load_autoencoder(a).state_dict(), load_autoencoder(b).state_dict()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-5), key
    ma, mb = read_jsonl(a / "metrics.jsonl")[-1], read_jsonl(b / "metrics.jsonl")[-1]
    assert ma["step"] == mb["step"] == 30 and ma["psnr"] == pytest.approx(mb["psnr"], abs=1e-3)


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["train", *TINY, "--size", "10", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "not divisible" in err and err.count("\n") == 1
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "y")]) == 2
    assert "not found" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "z")]) == 2
    assert "no images found" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "no checkpoint in" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    assert main(["train", *TINY, "--out", str(tmp_path / "taken")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"
    with pytest.raises(SystemExit):
        main(["train", "--no-such-option", "1"])
    with pytest.raises(SystemExit):
        main(["train", "--quantizer", "nope"])


def test_resume_refuses_changed_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "15", "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--codebook-size", "8"]) == 2
    assert "only" in capsys.readouterr().err


def test_minutes_budget_stops_early_with_a_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "100000", "--minutes", "0.0001",
                 "--out", str(run)]) == 0
    step = int((run / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert 1 <= step < 100000
    assert f"step {step}" in capsys.readouterr().out
    # the budget is the run's, over all its invocations (saved in the checkpoint): spent, so a
    # plain resume says so and changes nothing; a larger budget trains on
    state = run / "checkpoints" / f"step-{step:07d}" / "state.json"
    spent = json.loads(state.read_text())["seconds"]
    assert spent >= 0.006
    assert main(["train", "--resume", str(run)]) == 2
    assert "spent its --minutes 0.0001 budget" in capsys.readouterr().err
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step:07d}"
    assert main(["train", "--resume", str(run), "--steps", str(step + 2), "--minutes", "10"]) == 0
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{step + 2:07d}"
    later = run / "checkpoints" / f"step-{step + 2:07d}" / "state.json"
    assert json.loads(later.read_text())["seconds"] > spent


def test_commands_take_a_checkpoint_folder(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "15", "--out", str(run)]) == 0
    step = run / "checkpoints" / "step-0000015"
    for folder in (step, run / "checkpoints"):
        assert main(["eval", str(folder), "--out", str(tmp_path / "e.json")]) == 0
        assert json.loads((tmp_path / "e.json").read_text())["images"] == 180  # the run's data
    assert main(["reconstruct", str(step), "--n", "4"]) == 0
    assert (run / "reconstruct" / "sample_ae_2.png").exists()  # beside the run, not in the step
    assert main(["interpolate", str(step), "--n", "3"]) == 0
    assert (run / "interpolate" / "sample_inter.png").exists()
    # A checkpoint copied out of its run folder has no data of its own: --data names it.
    alone = tmp_path / "alone"
    alone.mkdir()
    for name in ("model.safetensors", "config.json"):
        (alone / name).write_bytes((step / name).read_bytes())
    capsys.readouterr()
    assert main(["eval", str(alone)]) == 2
    err = capsys.readouterr().err
    assert "outside a run folder" in err and "--data" in err and err.count("\n") == 1
    assert main(["eval", str(alone), "--data", "digits"]) == 0
    assert (alone / "eval_test.json").exists()


def test_cli_quantizer_options():
    args = make_parser().parse_args(["train", "--out", "x", "--quantizer", "fsq",
                                     "--fsq-levels", "5,4,3"])
    model = run_config(args.preset, model=given(args, "model")).model
    assert model.fsq_levels == (5, 4, 3) and model.codebook_size == 60
    args = make_parser().parse_args(["train", "--out", "x", "--quantizer", "ema", "--cosine",
                                     "true", "--kmeans-init", "false", "--lookup-dim", "8"])
    model = run_config(args.preset, model=given(args, "model")).model
    assert model.cosine is True and model.kmeans_init is False and model.lookup_dim == 8
    with pytest.raises(SystemExit):
        make_parser().parse_args(["train", "--cosine", "maybe"])
    # a bool option alone means true
    args = make_parser().parse_args(["train", "--out", "x", "--tensorboard", "--cosine"])
    assert given(args, "train")["tensorboard"] is True and given(args, "model")["cosine"] is True
    # `none` unsets a field that may be None (the default preset looks codes up in 8 dimensions)
    args = make_parser().parse_args(["train", "--out", "x", "--lookup-dim", "none"])
    assert run_config(args.preset, model=given(args, "model")).model.lookup_dim is None
    assert run_config(args.preset).model.lookup_dim == 8


def test_tensorboard_run_and_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    assert main(["train", *TINY, "--steps", "20", "--every", "10", "--tensorboard",
                 "--out", str(run)]) == 0
    assert main(["train", "--resume", str(run), "--steps", "30"]) == 0  # the run keeps it on
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("train/mse_x")] == [10, 20, 30]
    assert [e.step for e in events.Scalars("test/psnr")] == [10, 20, 30]
    assert {"pictures/sample_ae_2", "pictures/code_usage"} <= set(events.Tags()["images"])


def test_bf16_training_of_both_stages(tmp_path):
    run, prior = tmp_path / "run", tmp_path / "prior"
    assert main(["train", *TINY, "--steps", "15", "--precision", "bf16", "--out", str(run)]) == 0
    options = tiny.prior(eval_count=None, steps=10, precision="bf16")
    assert main(["train-prior", "--stage1", str(run), *options, "--out", str(prior)]) == 0
    for folder in (run, prior):
        assert json.loads((folder / "config.json").read_text())["config"]["train"][
            "precision"] == "bf16"
        losses = read_jsonl(folder / "train.jsonl")
        assert losses and all(math.isfinite(r["loss"]) for r in losses)
    weights = load_autoencoder(run).state_dict()
    assert all(v.dtype in (torch.float32, torch.int64, torch.bool) for v in weights.values())


def test_a_data_set_smaller_than_the_grids_trains(tmp_path):
    """20 images (18 train, 2 held out) for the 32 that the 8x8 reconstruction grids show: the
    grid repeats them instead of failing at the first checkpoint."""
    import numpy as np

    data = tmp_path / "few.npz"
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 256, (20, 8, 8), dtype=np.uint8))
    options = tiny.stage1(data=data, batch_size=4, steps=2, every=2)
    assert main(["train", *options, "--out", str(tmp_path / "run")]) == 0
    grid = Image.open(tmp_path / "run" / "sample_ae_2.png")
    assert grid.size == Image.open(tmp_path / "run" / "sample_ae_1.png").size
