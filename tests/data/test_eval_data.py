"""Your own validation set: --eval-data SOURCE as the held-out set, a folder with train/ and
val/ (or test/) inside understood as such (not as two classes), `vqvae eval --data` on every
image of another source; the held-out metrics name the set."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae import DataConfig, DataError, load_splits, load_trained
from vqvae.data.sources import load_whole
from vqvae.cli import main
from vqvae.generation.codes import load_codes

from tests import tiny


def _images(root, n, value, classes=("cat", "dog"), size=(12, 12, 3)):
    for i in range(n):
        folder = root / classes[i % len(classes)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full(size, value + i, dtype=np.uint8)).save(folder / f"{i:03d}.png")
    return root


def test_a_train_val_folder_is_a_training_set_and_its_held_out_set(tmp_path):
    _images(tmp_path / "set" / "train", 20, 0)
    _images(tmp_path / "set" / "val", 6, 100, classes=("dog",))
    splits = load_splits(DataConfig(source=str(tmp_path / "set"), size=8))
    assert len(splits.train) == 20 and len(splits.test) == 6  # nothing of train/ held out
    assert splits.train.classes == ("cat", "dog")  # not ("train", "val")
    assert splits.test.classes == ("cat", "dog") and set(splits.test.labels.tolist()) == {1}
    assert int(splits.test.images.min()) >= 100 and int(splits.train.images.max()) < 100
    assert "val" in splits.held_out


def test_eval_data_replaces_the_held_out_share(tmp_path):
    _images(tmp_path / "val", 5, 200, classes=("",))  # no class folders
    digits = load_splits(DataConfig(source="digits", size=8, channels=3,
                                    eval_source=str(tmp_path / "val")))
    assert len(digits.train) == 1797 and len(digits.test) == 5  # every digit trains
    assert digits.test.labels is None
    with pytest.raises(DataError, match="3 channel.*1.*pass --channels"):
        load_splits(DataConfig(source="digits", size=8, eval_source=str(tmp_path / "val")))
    _images(tmp_path / "more", 4, 50, classes=("cat", "cow"))
    _images(tmp_path / "pets", 8, 0, classes=("cat", "dog"))
    with pytest.raises(DataError, match="has classes the training set lacks: cow"):
        load_splits(DataConfig(source=str(tmp_path / "pets"), size=8,
                               eval_source=str(tmp_path / "more")))


def test_train_with_eval_data_then_eval_and_encode_name_the_set(tmp_path, capsys):
    _images(tmp_path / "set" / "train", 24, 0)
    _images(tmp_path / "set" / "test", 8, 120)
    run = tmp_path / "run"
    options = tiny.stage1(data=str(tmp_path / "set"), hidden_channels=8, code_dim=4,
                          batch_size=8, every=10, eval_count=None, steps=10)
    assert main(["train", *options, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"held out: 8 images, {tmp_path / 'set' / 'test'}" in out
    assert "held-out (8 images" in out
    assert main(["eval", str(run)]) == 0
    assert "the test split of the run's data" in capsys.readouterr().out
    assert json.loads((run / "eval_test.json").read_text())["images"] == 8
    _images(tmp_path / "other", 11, 60, classes=("a",))
    assert main(["eval", str(run), "--data", str(tmp_path / "other"),
                 "--out", str(tmp_path / "o.json")]) == 0
    assert f"every image of {tmp_path / 'other'}" in capsys.readouterr().out
    assert json.loads((tmp_path / "o.json").read_text())["images"] == 11
    assert main(["encode", str(run), "--out", str(tmp_path / "c.safetensors")]) == 0
    codes = load_codes(tmp_path / "c.safetensors")
    assert len(codes.split("train").codes) == 24 and len(codes.split("test").codes) == 8


def test_codes_record_which_image_each_grid_came_from(tmp_path, legacy_run):
    """Each grid's key (a folder's relative path, an array's index; mirrored copies marked) and
    label are in the codes file, so codes join back to the data; files without keys say so."""
    from vqvae.generation.codes import encode_to_file

    _images(tmp_path / "set" / "train", 10, 0)
    _images(tmp_path / "set" / "val", 4, 100)
    codes, path = encode_to_file(legacy_run, tmp_path / "c.safetensors", device="cpu",
                                 source=str(tmp_path / "set"), progress=False, flip=True)
    loaded = load_codes(path)
    train, test = loaded.keys("train"), loaded.keys("test")
    assert test == ("cat/000.png", "cat/002.png", "dog/001.png", "dog/003.png")
    assert train[:2] == ("cat/000.png", "cat/002.png") and train[10] == "cat/000.png#flipped"
    assert loaded.split("test").labels.tolist() == [0, 0, 1, 1]
    digits, _ = encode_to_file(legacy_run, tmp_path / "d.safetensors", device="cpu",
                               progress=False)
    held = digits.keys("test")
    assert not set(held) & set(digits.keys("train"))  # indices into the one array, disjoint
    model, splits = load_trained(legacy_run)
    whole = load_whole(DataConfig(source="digits", size=model.cfg.image_size))
    assert len(whole) == 1797 and len(held) == len(splits.test)
    for j in (0, len(held) - 1):  # the key names the very image that was encoded
        assert torch.equal(whole.images[int(held[j])], splits.test.images[j])
    with pytest.raises(DataError, match="do not record which image"):
        load_codes(legacy_run / "prior" / "codes.safetensors").keys("train")


def test_encode_format_npy_writes_one_file_per_image_in_a_mirrored_tree(tmp_path, legacy_run):
    _images(tmp_path / "set" / "train", 6, 0)
    _images(tmp_path / "set" / "val", 3, 100)
    out = tmp_path / "npy"
    assert main(["encode", str(legacy_run), "--data", str(tmp_path / "set"), "--out", str(out),
                 "--format", "npy", "--flip"]) == 0
    index = json.loads((out / "codes.json").read_text())
    assert [row[0] for row in index["splits"]["test"]] == ["cat/000.png", "cat/002.png",
                                                          "dog/001.png"]
    assert [row[1] for row in index["splits"]["test"]] == [0, 0, 1]
    assert main(["encode", str(legacy_run), "--data", str(tmp_path / "set"),
                 "--out", str(tmp_path / "c.safetensors")]) == 0
    codes = load_codes(tmp_path / "c.safetensors")
    for name, shape in (("train", (2, 4, 4)), ("test", (4, 4))):
        for j, key in enumerate(codes.keys(name)):
            array = np.load(out / name / key.replace(".png", ".npy"))
            assert array.shape == shape
            first = array[0] if name == "train" else array
            assert np.array_equal(first, codes.split(name).codes[j].numpy())
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("mine")
    assert main(["encode", str(legacy_run), "--out", str(tmp_path / "busy"),
                 "--format", "npy"]) == 2
