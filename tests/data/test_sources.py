import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae import DataConfig, DataError, load_splits, to_float, to_uint8
from vqvae.data.sources import BatchStream, SkippedImagesWarning, read_idx


def _png(path, size=(20, 12), mode="RGB", value=128):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 0, 255 - value)).save(path)


def test_digits_default_split_is_deterministic():
    a, b = load_splits(DataConfig()), load_splits(DataConfig())
    assert a.train.images.shape[1:] == (1, 16, 16) and a.train.images.dtype == torch.uint8
    assert len(a.train) + len(a.test) == 1797 and len(a.test) == 180
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    other = load_splits(DataConfig(split_seed=1))
    assert not torch.equal(other.test.images, a.test.images)


def test_image_folder_recursive_mixed_formats_and_corrupt_files(tmp_path):
    _png(tmp_path / "a" / "x.png")
    _png(tmp_path / "a" / "deeper" / "y.jpg", mode="RGB")
    _png(tmp_path / "b" / "g.png", mode="L", value=200)
    Image.new("RGB", (9, 9)).save(tmp_path / "b" / "w.webp")
    Image.new("RGB", (9, 9)).save(tmp_path / "b" / "z.bmp")
    (tmp_path / "b" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "b" / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored")
    with pytest.warns(SkippedImagesWarning, match="skipped 2 unreadable image"):
        splits = load_splits(DataConfig(source=str(tmp_path), size=8, holdout=0.2))
    assert len(splits.train) + len(splits.test) == 5
    assert splits.train.images.shape[1:] == (3, 8, 8)


def test_folder_labels_from_subfolders_and_grayscale_option(tmp_path):
    for cls in ("cat", "dog"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", value=40 * i)
    splits = load_splits(DataConfig(source=str(tmp_path), size=6, channels=1, holdout=0.3))
    assert splits.train.classes == ("cat", "dog")
    assert splits.train.images.shape[1] == 1
    labels = torch.cat([splits.train.labels, splits.test.labels])
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]


def test_resize_and_centre_crop(tmp_path):
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 255  # white centre third of a wide image
    Image.fromarray(img).save(tmp_path / "wide.png")
    Image.fromarray(img).save(tmp_path / "wide2.png")
    splits = load_splits(DataConfig(source=str(tmp_path), size=10, holdout=0.5))
    out = splits.train.images[0]
    assert out.shape == (3, 10, 10)
    assert out[:, :, 2:8].min() > 200  # the crop is the white centre


def test_empty_folder_and_missing_source_errors(tmp_path):
    with pytest.raises(DataError, match="no images found"):
        load_splits(DataConfig(source=str(tmp_path)))
    with pytest.raises(DataError, match="not found"):
        load_splits(DataConfig(source=str(tmp_path / "nope")))
    (tmp_path / "bad.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="at least 2"):
        load_splits(DataConfig(source=str(tmp_path)))
    (tmp_path / "bad2.png").write_bytes(b"garbage")
    with pytest.warns(SkippedImagesWarning), pytest.raises(DataError, match="could be read"):
        load_splits(DataConfig(source=str(tmp_path)))


def _write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open if gz else open)(path, "wb") as f:  # closed: the gzip trailer is written
        f.write(data)


def test_idx_directory_uses_its_test_split(tmp_path):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (12, 28, 28)), True)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(12) % 3, True)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", rng.integers(0, 255, (5, 28, 28)))
    splits = load_splits(DataConfig(source=str(tmp_path), size=32))
    assert splits.train.images.shape == (12, 1, 32, 32) and splits.test.images.shape[0] == 5
    assert splits.train.labels.tolist() == (np.arange(12) % 3).tolist()


def test_truncated_idx_is_a_clear_error(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte"
    _write_idx(path, np.zeros((4, 5, 5)))
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(path)
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="magic"):
        read_idx(path)


@pytest.mark.parametrize("layout", ["nhw", "nhwc", "nchw", "float", "npz"])
def test_array_files(tmp_path, layout):
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 8, 8, 3)).astype(np.uint8)
    array = {"nhw": base[..., 0], "nhwc": base, "nchw": base.transpose(0, 3, 1, 2),
             "float": base / 255.0, "npz": base}[layout]
    path = tmp_path / ("a.npz" if layout == "npz" else "a.npy")
    if layout == "npz":
        np.savez(path, images=array, labels=np.arange(6) % 2)
    else:
        np.save(path, array)
    splits = load_splits(DataConfig(source=str(path), size=8, holdout=0.5))
    images = torch.cat([splits.train.images, splits.test.images])
    assert images.shape == (6, 1 if layout == "nhw" else 3, 8, 8)
    if layout == "npz":
        assert splits.train.labels is not None


def test_bad_arrays_are_named(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4)))
    with pytest.raises(DataError, match="expected images shaped"):
        load_splits(DataConfig(source=str(tmp_path / "a.npy")))
    np.save(tmp_path / "b.npy", np.full((3, 4, 4), 7.0))
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        load_splits(DataConfig(source=str(tmp_path / "b.npy")))
    (tmp_path / "c.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="cannot read"):
        load_splits(DataConfig(source=str(tmp_path / "c.npy")))


def test_float_conversion_round_trips():
    x = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    f = to_float(x)
    assert f.min() == -1 and f.max() == 1
    assert torch.equal(to_uint8(f), x)


def test_batch_stream_is_a_pure_function_of_step_and_shards_by_rank():
    stream = BatchStream(10, 4, seed=3)
    first_epochs = torch.cat([stream.indices(s) for s in range(5)])  # 20 = two epochs
    assert sorted(first_epochs[:10].tolist()) == list(range(10))
    assert sorted(first_epochs[10:20].tolist()) == list(range(10))
    assert torch.equal(BatchStream(10, 4, seed=3).indices(3), stream.indices(3))  # resume
    r0, r1 = BatchStream(10, 2, 3, rank=0, world_size=2), BatchStream(10, 2, 3, 1, 2)
    together = torch.cat([torch.cat([r0.indices(s), r1.indices(s)]) for s in range(5)])
    assert torch.equal(together, first_epochs)  # two ranks of 2 == one process of 4


def test_folder_decoding_in_chunks_keeps_order_and_labels(tmp_path, monkeypatch):
    from vqvae.data import files

    for cls in ("a", "b"):
        for i in range(3):
            _png(tmp_path / cls / f"{i}.png", value=30 * i + (100 if cls == "b" else 0))
    whole = load_splits(DataConfig(source=str(tmp_path), size=4, holdout=0.5))
    monkeypatch.setattr(files, "DECODE_CHUNK", 2)  # 6 images in 3 chunks
    chunked = load_splits(DataConfig(source=str(tmp_path), size=4, holdout=0.5))
    assert torch.equal(whole.train.images, chunked.train.images)
    assert torch.equal(whole.test.labels, chunked.test.labels)


def test_batch_order_is_reshuffled_every_epoch_and_the_same_on_resume():
    """Each epoch is a new permutation (not the first one again), and the same (seed, epoch)
    gives the same order in a fresh stream: what a resumed run sees."""
    n = 32
    stream = BatchStream(n, n, seed=5)  # one batch = one epoch
    epochs = [stream.indices(e) for e in range(4)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(n))
    assert len({tuple(order.tolist()) for order in epochs}) == 4  # every epoch its own order
    resumed = BatchStream(n, n, seed=5)
    assert torch.equal(resumed.indices(2), epochs[2]) and torch.equal(resumed.indices(1),
                                                                      epochs[1])
    assert not torch.equal(BatchStream(n, n, seed=6).indices(1), epochs[1])  # the seed counts
