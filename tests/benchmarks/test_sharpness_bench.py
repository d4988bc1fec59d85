"""The sharpness benchmarks' own logic: which runs a command line asks for, and that held-out
natural-image tiles never share a pixel with the training tiles."""

import pytest
import torch
import torch.nn.functional as F

from tests.script_module import load_script

sharpness = load_script("benchmarks/sharpness.py")
natural = load_script("benchmarks/natural_images.py")


def test_spec_is_a_name_and_shell_split_options():
    assert sharpness.parse_spec("gan w0.5=--gan-weight 0.5 --diffaug") == (
        "gan w0.5", ("--gan-weight", "0.5", "--diffaug"))
    with pytest.raises(SystemExit):
        sharpness.parse_spec("--gan-weight 0.5")


def test_mse_rows_come_first_and_keep_the_fine_tunes_start():
    args = sharpness.parse_args(["--steps", "1200", "--finetune-from", "800", "--mse-steps", "2000",
                                 "--variant", "g=--gan-weight 1", "--finetune", "f=--gan-weight 1"])
    arms = sharpness.arms(args)
    assert [(a.name, a.kind) for a in arms] == [("mse @ 1200", "mse"), ("mse @ 2000", "mse"),
                                                ("f", "finetune"), ("g", "scratch")]
    assert sharpness.mse_stops(args) == [800, 1200, 2000]
    with pytest.raises(SystemExit):
        sharpness.parse_args(["--steps", "800", "--finetune-from", "800", "--finetune", "f="])


def test_held_out_tiles_come_from_the_strip_never_trained_on():
    photo = torch.zeros(3, 200, 400, dtype=torch.uint8)
    photo[:, :, 280:] = 255  # the held-out strip (holdout 0.3 of 400 px)
    train = natural.training_tiles(photo, 280, 20, torch.Generator().manual_seed(0))
    held = natural.held_out_tiles(photo, 280, 64)
    assert len(train) == 20 and all(t.shape == (3, natural.STORED, natural.STORED) for t in train)
    assert all(int(t.max()) == 0 for t in train)
    assert held and all(t.shape == (3, 64, 64) and int(t.min()) == 255 for t in held)


def test_gradient_ratio_is_one_for_the_originals_and_lower_when_blurred():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    blurred = F.avg_pool2d(images.float(), 3, 1, 1).to(torch.uint8)
    assert natural.gradient_ratio(images, images) == pytest.approx(1.0)
    assert natural.gradient_ratio(blurred, images) < 0.5


def test_natural_gan_arms_are_named_and_fine_tune_the_same_checkpoint(tmp_path):
    args = natural.parse_args(["--root", str(tmp_path), "--steps", "30", "--finetune-from", "20",
                               "--gan", "w0.3=--gan-weight 0.3", "--gan", "w1=--gan-weight 1",
                               "--control", "--lr 1e-4"])
    runs = natural.arms(args, tmp_path / "tiles" / "train")
    assert list(runs) == ["mse", "mse-ft", "w0.3", "w1"]
    start = str(tmp_path / "mse" / "checkpoints" / "step-0000020")
    for name in ("mse-ft", "w0.3", "w1"):
        options, steps = runs[name]
        assert options[:2] == ["finetune-decoder", start] and steps == 10
    assert runs["w1"][0][-2:] == ["--gan-weight", "1"]
    bare = natural.parse_args(["--gan", "--gan-weight 0.2"])  # no name: the arm called 'gan'
    assert natural.gan_arms(bare.gan) == {"gan": ["--gan-weight", "0.2"]}
    assert natural.gan_arms(None) == {"gan": natural.GAN.split()}
    with pytest.raises(SystemExit, match="taken"):
        natural.gan_arms(["mse=--gan-weight 1"])
    with pytest.raises(SystemExit, match="taken"):
        natural.gan_arms(["w 1=--gan-weight 1", "w-1=--gan-weight 2"])  # one folder


def test_grid_peak_is_one_for_the_originals_and_flags_a_stride_periodic_pattern():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 32, 32), generator=gen).float()
    images = torch.nn.functional.avg_pool2d(images, 3, 1, 1)  # some spatial correlation
    assert natural.grid_peak(images.byte(), images.byte(), 4) == pytest.approx(1.0)
    phase = torch.zeros(32, 32)
    phase[::4, ::4] = 40.0  # one bright pixel in every 4x4 cell: a stride-4 pattern
    patterned = (images * 0.8 + phase).clamp(0, 255).byte()
    assert natural.grid_peak(patterned, images.byte(), 4) > 3
    shifted = images.roll(5, -1).byte()  # the same content elsewhere: no added periodicity
    assert natural.grid_peak(shifted, images.byte(), 4) == pytest.approx(1.0)


def test_a_presets_row_reads_the_last_checkpoint(tmp_path):
    import json

    from vqvae.cli import main

    presets = load_script("benchmarks/presets.py")
    run = tmp_path / "seed"
    assert main(["train", "--preset", "seed", "--data", "digits", "--size", "16", "--steps", "3",
                 "--every", "3", "--batch-size", "8", "--device", "cpu", "--out", str(run)]) == 0
    state = json.loads((run / "checkpoints" / "step-0000003" / "state.json").read_text())
    cells = [c.strip() for c in presets.row("seed", run, {"psnr": 20.0, "ssim": 0.5, "fd": 3.0})
             .strip("|").split("|")]
    assert cells[:2] == ["seed", "resnet"] and cells[2].endswith("M")
    assert cells[3:6] == ["4x4 x 64", "3", f"{state['seconds']:.0f}"]
    assert cells[6:] == ["20.00", "0.5000", "3.00"]
