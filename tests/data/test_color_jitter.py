"""Colour jitter (``--color-jitter``): hue and saturation change, luma kept; the same batches
streamed or in memory, never on held-out images, exact on resume, refused on grey images."""

from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae import DataConfig, load_autoencoder, load_splits
from vqvae.cli import main
from vqvae.config.data import RGB_JITTER
from vqvae.data.augment import _YIQ, color_jitter, jitter_matrix
from vqvae.data.loader import train_batches

from tests import tiny


def _luma(image: torch.Tensor) -> torch.Tensor:
    return torch.einsum("j,jhw->hw", _YIQ[0].float(), image.float())


def test_jitter_turns_hue_and_keeps_luma_and_greys():
    gen = torch.Generator().manual_seed(0)
    image = torch.randint(60, 200, (3, 32, 32), generator=gen, dtype=torch.int64).to(torch.uint8)
    assert torch.allclose(jitter_matrix(0.0, gen), torch.eye(3), atol=1e-6)
    out = color_jitter(image, 1.0, gen)
    inside = ((out > 0) & (out < 255)).all(0)  # pixels the RGB cube did not clip
    assert inside.float().mean() > 0.5
    assert (_luma(out) - _luma(image))[inside].abs().max() <= 1.0  # rounding only
    assert (out.float() - image.float()).abs().mean() > 5  # the colours moved
    grey = torch.full((3, 8, 8), 77, dtype=torch.uint8)
    assert torch.equal(color_jitter(grey, 1.0, gen), grey)
    mono = torch.randint(0, 256, (1, 8, 8), dtype=torch.uint8)
    assert torch.equal(color_jitter(mono, 1.0, gen), mono)


def test_draws_span_the_whole_hue_circle():
    gen = torch.Generator().manual_seed(1)
    red = torch.tensor([200.0, 40.0, 40.0], dtype=torch.float64)
    chroma = [(_YIQ @ (jitter_matrix(1.0, gen).double() @ red))[1:] for _ in range(400)]
    angles = torch.stack([torch.atan2(c[1], c[0]) for c in chroma])
    quarters = torch.histc(angles, bins=4, min=-np.pi, max=np.pi)
    assert (quarters > 50).all(), quarters  # red turned to every quarter of the circle


def _folder(root, n=24):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (12, 12, 3)).astype(np.uint8)).save(
            root / f"{i:03d}.png")
    return root


def _batches(train, cfg, start=0, steps=4):
    return [b.images for b in islice(train_batches(train, cfg, 6, seed=3, start=start), steps)]


@pytest.mark.parametrize("flip", [True, False])  # False: the batch is jittered in one product
def test_stream_and_memory_jitter_alike_and_held_out_never(tmp_path, flip):
    folder = str(_folder(tmp_path / "img"))
    memory_cfg = DataConfig(source=folder, size=8, cache="memory", flip=flip, color_jitter=0.5)
    stream_cfg = DataConfig(source=folder, size=8, cache="stream", workers=2, flip=flip,
                            color_jitter=0.5)
    memory, stream = load_splits(memory_cfg), load_splits(stream_cfg)
    jittered = _batches(memory.train, memory_cfg)
    for a, b in zip(jittered, _batches(stream.train, stream_cfg)):
        assert torch.equal(a, b)
    flipped = _batches(memory.train, DataConfig(source=folder, size=8, cache="memory", flip=flip))
    assert not any(torch.equal(a, b) for a, b in zip(jittered, flipped))
    plain = load_splits(DataConfig(source=folder, size=8, cache="memory"))
    assert torch.equal(memory.test.images, plain.test.images)


def test_a_resumed_jittered_run_is_exact(tmp_path):
    folder = _folder(tmp_path / "img")
    options = tiny.stage1(data=folder, hidden_channels=8, code_dim=4, batch_size=4, every=4,
                          eval_count=None, cache="memory", workers=0, color_jitter=0.5,
                          device="cpu", schedule="constant")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *options, "--steps", "8", "--out", str(a)]) == 0
    assert main(["train", *options, "--steps", "4", "--out", str(b)]) == 0
    assert main(["train", "--resume", str(b), "--steps", "8"]) == 0
    wa, wb = load_autoencoder(a).state_dict(), load_autoencoder(b).state_dict()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-5), key


def test_grey_data_refuses_colour_jitter_in_one_line(tmp_path, capsys):
    assert main(["train", *tiny.stage1(color_jitter=0.5), "--steps", "2",
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "--color-jitter" in err and "1 channel" in err and err.count("\n") == 1


@pytest.mark.parametrize("value", ["-0.1", "1.5"])
def test_a_strength_outside_0_1_is_refused(tmp_path, capsys, value):
    assert main(["train", *tiny.stage1(color_jitter=value), "--steps", "2",
                 "--out", str(tmp_path / "x")]) == 2
    assert "color_jitter must be in [0, 1]" in capsys.readouterr().err


def test_rgb_runs_jitter_by_default_grey_runs_do_not(tmp_path):
    from vqvae.store.runs import read_run_config

    folder = _folder(tmp_path / "img")
    rgb, grey = tmp_path / "rgb", tmp_path / "grey"
    options = tiny.stage1(hidden_channels=8, code_dim=4, batch_size=4, every=2, eval_count=None,
                          device="cpu")
    assert main(["train", *tiny.edit(options, data=folder), "--steps", "2",
                 "--out", str(rgb)]) == 0
    assert main(["train", *options, "--steps", "2", "--out", str(grey)]) == 0
    assert read_run_config(rgb, "vqvae").data.color_jitter == RGB_JITTER > 0
    assert read_run_config(grey, "vqvae").data.color_jitter == 0.0


def test_a_run_saved_before_colour_jitter_resumes_without_it(tmp_path):
    """Its config file has no color_jitter: it trained without, and a resume must not add it."""
    import json

    from vqvae.store.runs import RUN_CONFIG, read_run_config

    folder = _folder(tmp_path / "img")
    run = tmp_path / "old"
    options = tiny.stage1(data=folder, hidden_channels=8, code_dim=4, batch_size=4, every=2,
                          eval_count=None, device="cpu", schedule="constant")
    for out, steps in ((tmp_path / "whole", "4"), (run, "2")):  # both as old code trained
        assert main(["train", *options, "--color-jitter", "0", "--steps", steps,
                     "--out", str(out)]) == 0
    meta = json.loads((run / RUN_CONFIG).read_text())
    assert meta["config"]["data"].pop("color_jitter") == 0.0  # as written before the field
    (run / RUN_CONFIG).write_text(json.dumps(meta))
    assert read_run_config(run, "vqvae").data.color_jitter == 0.0
    assert main(["train", "--resume", str(run), "--steps", "4"]) == 0
    wa, wb = load_autoencoder(tmp_path / "whole").state_dict(), load_autoencoder(run).state_dict()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-5), key


@pytest.mark.cuda
def test_jittered_in_memory_batches_stay_on_cuda_and_equal_the_host_ones(tmp_path):
    folder = str(_folder(tmp_path / "img"))
    cfg = DataConfig(source=folder, size=8, cache="memory", color_jitter=0.5)
    train = load_splits(cfg).train
    host = _batches(train, cfg)
    cuda = [b.images for b in islice(train_batches(train, cfg, 6, seed=3, start=0,
                                                   device=torch.device("cuda")), 4)]
    for c, h in zip(cuda, host):  # the same draws; a rounding may differ by one level
        assert c.device.type == "cuda" and (c.cpu().int() - h.int()).abs().max() <= 1
