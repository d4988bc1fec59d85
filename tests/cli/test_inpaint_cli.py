"""`vqvae inpaint` refuses masks that would redraw something else than what was drawn: another
size than the image, nothing white, a negative ring (one line, exit 2)."""

import numpy as np
import pytest
import torch
from PIL import Image

import vqvae
from vqvae.cli import main

from tests.e2e.test_reliability import one_line


def _png(path, array):
    Image.fromarray(np.asarray(array, np.uint8)).save(path)
    return str(path)


@pytest.fixture
def files(tmp_path):
    image = _png(tmp_path / "digit.png", np.arange(64).reshape(8, 8) * 4)
    mask = np.zeros((8, 8))
    mask[:4, :4] = 255
    return tmp_path, image, _png(tmp_path / "mask.png", mask)


def _inpaint(run, image, mask, *more):
    return main(["inpaint", str(run / "maskgit"), "--image", image, "--mask", mask,
                 "--steps", "2", "--device", "cpu", *more])


def test_a_normal_inpaint_writes_its_result(legacy_run, files, capsys):
    tmp_path, image, mask = files
    assert _inpaint(legacy_run, image, mask) == 0
    assert "inpainted:" in capsys.readouterr().out
    with Image.open(tmp_path / "digit.inpainted.png") as result:
        assert result.size == (8, 8)


@pytest.mark.parametrize("shape", [(8, 16), (16, 16), (4, 4)])
def test_a_mask_of_another_size_is_refused_naming_both(legacy_run, files, capsys, shape):
    tmp_path, image, _ = files
    mask = _png(tmp_path / "other.png", np.full(shape, 255))
    assert _inpaint(legacy_run, image, mask) == 2
    line = one_line(capsys)
    assert f"is {shape[1]}x{shape[0]} but image" in line and "is 8x8" in line, line
    assert not (tmp_path / "digit.inpainted.png").exists()


@pytest.mark.parametrize("value", [0, 127])
def test_a_mask_without_white_is_refused(legacy_run, files, capsys, value):
    tmp_path, image, _ = files
    mask = _png(tmp_path / "blank.png", np.full((8, 8), value))
    assert _inpaint(legacy_run, image, mask) == 2
    assert "has no white pixel" in one_line(capsys)
    assert not (tmp_path / "digit.inpainted.png").exists()


def test_a_negative_ring_is_refused(legacy_run, files, capsys):
    _, image, mask = files
    assert _inpaint(legacy_run, image, mask, "--ring", "-1") == 2
    assert "--ring must be at least 0" in one_line(capsys)


def test_the_library_refuses_an_empty_mask(legacy_run):
    pipe = vqvae.Pipeline.from_run(legacy_run / "maskgit", device="cpu")
    image = torch.zeros(1, 8, 8, dtype=torch.uint8)
    with pytest.raises(vqvae.ConfigError, match="mask is empty"):
        pipe.inpaint(image, torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(vqvae.ConfigError, match="--ring"):
        pipe.inpaint(image, torch.ones(8, 8, dtype=torch.bool), ring=-2)
