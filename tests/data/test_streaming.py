"""Streamed folders and tar shards: the same batches as memory, exact resume with workers,
disjoint rank slices, corrupt files skipped and counted, `pack` -> shards -> train."""

import socket
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from vqvae import DataConfig, DataError, ImageSet, load_autoencoder, load_splits
from vqvae.cli import main
from vqvae.generation.codes import load_codes
from vqvae.data.files import FileSet
from vqvae.data.loader import train_batches
from vqvae.data.shards import (INDEX_SUFFIX, MANIFEST, epoch_plan, expand_pattern, index_shards,
                          pack, shard_groups, shard_paths)
from vqvae.data.sources import cache_mode
from vqvae.store.runs import read_jsonl

from tests import tiny

N = 40  # images per folder; pixel value 5 * i + 2 identifies image i after any centre resize


def _folder(root, n=N, noise=False, corrupt=0):
    """n PNGs in two class folders; constant images (value = identity) unless ``noise``."""
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = "cat" if i % 2 else "dog"
        (root / cls).mkdir(parents=True, exist_ok=True)
        pixels = (rng.integers(0, 256, (20, 28, 3)) if noise
                  else np.full((20, 28, 3), 5 * i + 2)).astype(np.uint8)
        Image.fromarray(pixels).save(root / cls / f"{i:03d}.png")
    for i in range(corrupt):
        (root / "dog" / f"bad{i}.png").write_bytes(b"\x89PNG not really")
    return root


def _ids(images):
    """The identities of constant test images (B, C, S, S) -> sorted list."""
    return sorted(((images[:, 0, 0, 0].int() - 2) // 5).tolist())


def _batches(train, data, start, steps, rank=0, world=1):
    batches = train_batches(train, data, 8, seed=3, start=start, rank=rank, world_size=world)
    return [b.images for b in islice(batches, steps)]


def _shards(tmp_path, folder, shard_size=6):
    pack(folder, tmp_path / "shards", shard_size, progress=False)
    return str(tmp_path / "shards")


def test_stream_and_memory_give_the_same_batches(tmp_path):
    folder = _folder(tmp_path / "img")
    memory = load_splits(DataConfig(source=str(folder), size=8, cache="memory"))
    assert isinstance(memory.train, ImageSet)
    for workers in (0, 2):
        cfg = DataConfig(source=str(folder), size=8, cache="stream", workers=workers)
        stream = load_splits(cfg)
        assert isinstance(stream.train, FileSet)
        assert torch.equal(stream.test.take(torch.arange(len(stream.test))), memory.test.images)
        for a, b in zip(_batches(memory.train, cfg, 0, 7), _batches(stream.train, cfg, 0, 7)):
            assert torch.equal(a, b)  # 7 x 8 images: past the end of the 36-image epoch


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_resume_mid_epoch_with_two_workers_continues_exactly(tmp_path, kind):
    folder = _folder(tmp_path / "img", noise=True)
    source = str(folder) if kind == "folder" else _shards(tmp_path, folder)
    cfg = DataConfig(source=source, size=8, cache="stream", workers=2, crop="random", flip=True)
    train = load_splits(cfg).train
    whole = _batches(train, cfg, 0, 12)
    for start in (3, 5):  # an odd start: each worker takes over the other's reader
        for a, b in zip(whole[start:], _batches(train, cfg, start, 12 - start)):
            assert torch.equal(a, b)
    plain = _batches(train, DataConfig(source=source, size=8, cache="stream", workers=2), 0, 1)
    assert not torch.equal(plain[0], whole[0])  # augmentation did something


def test_shard_readers_split_every_epoch_disjointly():
    groups = shard_groups(np.repeat(np.arange(5), [3, 4, 2, 5, 1]).astype(np.int32))
    for readers in (1, 2, 4, 5, 8):  # fewer and more readers than shards
        for epoch in (0, 1):
            plans = [np.concatenate(epoch_plan(groups, 7, epoch, r, readers))
                     for r in range(readers)]
            everything = np.concatenate(plans)
            assert sorted(everything.tolist()) == list(range(15))
    first = [np.concatenate(epoch_plan(groups, 7, e, 0, 2)).tolist() for e in (0, 1)]
    assert first[0] != first[1]  # a new order every epoch


def _rank_ids(rank, world, port, source, steps, queue):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=world)
    cfg = DataConfig(source=source, size=8, cache="stream", workers=0)
    train = load_splits(cfg).train
    ids = [i for b in _batches(train, cfg, 0, steps, rank=torch.distributed.get_rank(),
                               world=torch.distributed.get_world_size()) for i in _ids(b)]
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, ids)
    if rank == 0:
        queue.put(gathered)
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_two_gloo_ranks_read_disjoint_slices(tmp_path, kind):
    folder = _folder(tmp_path / "img")
    source = str(folder) if kind == "folder" else _shards(tmp_path, folder, shard_size=5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    steps = 2 if kind == "folder" else 1  # shards: within each rank's first epoch
    procs = [ctx.Process(target=_rank_ids, args=(r, 2, port, source, steps, queue))
             for r in range(2)]
    for p in procs:
        p.start()
    gathered = queue.get(timeout=120)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    train = _ids(load_splits(DataConfig(source=source, size=8, cache="memory")).train.images)
    a, b = gathered
    assert len(a) == len(b) == 8 * steps and not set(a) & set(b)
    assert set(a) | set(b) <= set(train)
    if kind == "folder":  # 32 of the 36 train images: a slice of one epoch's permutation each
        assert len(set(a) | set(b)) == 32


@pytest.mark.parametrize("kind", ["folder", "shards"])
def test_corrupt_images_in_a_stream_are_skipped_and_counted(tmp_path, kind):
    folder = _folder(tmp_path / "img", corrupt=3)
    source = str(folder) if kind == "folder" else _shards(tmp_path, folder)
    cfg = DataConfig(source=source, size=8, cache="stream", workers=2, holdout=0.05)
    train = load_splits(cfg).train
    batches = list(islice(train_batches(train, cfg, 8, 0, 0), 15))  # 3 epochs
    assert all(b.images.shape == (8, 3, 8, 8) for b in batches)
    corrupt_in_train = sum(isinstance(train.decode(i), str) for i in range(len(train)))
    skipped = sum(b.skipped for b in batches)  # 120 draws: 2-3 epochs of the ~41 train files
    assert corrupt_in_train and 2 * corrupt_in_train <= skipped <= 3 * corrupt_in_train
    readable = [b.images.shape[0] for b in train.batches(16, workers=2)]
    assert sum(readable) == len(train) - corrupt_in_train


def test_pack_then_train_keeps_the_labels(tmp_path):
    folder = _folder(tmp_path / "img")
    source = _shards(tmp_path, folder)
    shards = load_splits(DataConfig(source=source, size=8, cache="memory"))
    assert shards.train.classes == ("cat", "dog")
    for split in (shards.train, shards.test):  # odd images are cats (class 0)
        ids = ((split.images[:, 0, 0, 0].int() - 2) // 5).tolist()
        assert split.labels.tolist() == [1 - i % 2 for i in ids]
    assert len(shards.train) + len(shards.test) == N
    run, codes = tmp_path / "run", tmp_path / "codes.safetensors"
    pattern = f"{source}/train-{{000000..000006}}.tar"
    options = tiny.stage1(data=pattern, hidden_channels=8, code_dim=4, batch_size=4, every=2,
                          eval_count=None, steps=4, cache="stream")
    assert main(["train", *options, "--out", str(run)]) == 0
    assert main(["encode", str(run), "--out", str(codes)]) == 0
    loaded = load_codes(codes)
    assert loaded.classes == ("cat", "dog") and len(loaded.splits["train"]) == len(shards.train)


def test_pack_resumes_after_an_interruption_and_refuses_a_changed_folder(tmp_path):
    folder = _folder(tmp_path / "img")
    clean = tmp_path / "clean"
    pack(folder, clean, 6, progress=False)
    from vqvae.store.checkpoint import write_bytes

    calls = []

    def dying(path, data):
        calls.append(path.name)
        if len(calls) == 8:  # (index, shard, manifest) x 2, shard 2's index, then shard 2 dies
            raise OSError("disk full")
        write_bytes(path, data)

    broken = tmp_path / "broken"
    with pytest.raises(OSError):
        pack(folder, broken, 6, progress=False, write=dying)
    done = pack(folder, broken, 6, progress=False)
    assert done.resumed_from == 12 and done.shards == 7
    for shard in sorted(clean.glob("*.tar*")):  # shards and their indexes
        assert (broken / shard.name).read_bytes() == shard.read_bytes()
    assert (broken / MANIFEST).read_text() == (clean / MANIFEST).read_text()
    _folder(tmp_path / "img", n=N + 1)
    with pytest.raises(DataError, match="different listing"):
        pack(folder, broken, 6, progress=False)


def test_the_index_beside_packed_shards_equals_reading_their_headers(tmp_path):
    """pack writes each shard's sample index beside it; a run reads that instead of every member
    header, with the same result. A missing, damaged or stale index (the shard was rewritten)
    falls back to reading the headers."""
    shards = Path(_shards(tmp_path, _folder(tmp_path / "img")))
    paths = shard_paths(str(shards))
    indexes = sorted(shards.glob("*.tar" + INDEX_SUFFIX))
    assert len(indexes) == len(paths) == 7
    fast = index_shards(paths, progress=False)
    for index in indexes:
        index.rename(index.with_suffix(".moved"))
    scanned = index_shards(paths, progress=False)
    for a, b in ((fast.keys, scanned.keys), (fast.labels, scanned.labels),
                 (fast.files.offsets, scanned.files.offsets),
                 (fast.files.names, scanned.files.names)):
        assert np.array_equal(a, b)
    indexes[0].write_text("{not json")
    indexes[1].with_suffix(".moved").rename(indexes[1])
    with open(paths[1], "ab") as f:  # the shard changed after its index was written
        f.write(b"\0" * 512)
    with pytest.warns(UserWarning, match=f"{indexes[0].name} is corrupt"):  # the damaged one
        assert np.array_equal(index_shards(paths, progress=False).keys, scanned.keys)


def test_cache_auto_picks_memory_for_small_sets(tmp_path, monkeypatch):
    from vqvae.data import sources as data

    assert isinstance(load_splits(DataConfig()).train, ImageSet)  # digits
    folder = _folder(tmp_path / "img")
    assert isinstance(load_splits(DataConfig(source=str(folder), size=8)).train, ImageSet)
    monkeypatch.setattr(data, "MEMORY_MAX_IMAGES", 10)
    assert isinstance(load_splits(DataConfig(source=str(folder), size=8)).train, FileSet)
    assert cache_mode(DataConfig(size=64, cache="auto"), 10**9, 3) == "stream"  # 12 TB
    with pytest.raises(DataError, match="held in memory"):
        load_splits(DataConfig(cache="stream"))


def test_held_out_images_are_never_augmented(tmp_path):
    folder = _folder(tmp_path / "img", noise=True)
    plain = load_splits(DataConfig(source=str(folder), size=8, cache="stream"))
    augmented = load_splits(DataConfig(source=str(folder), size=8, cache="stream",
                                       crop="random", flip=True))
    every = torch.arange(len(plain.test))
    assert torch.equal(plain.test.take(every), augmented.test.take(every))


def test_shard_patterns_expand_like_webdataset(tmp_path):
    assert expand_pattern("a-{000..002}.tar") == ["a-000.tar", "a-001.tar", "a-002.tar"]
    assert expand_pattern("{x,y}-{8..10}") == ["x-8", "x-9", "x-10", "y-8", "y-9", "y-10"]
    with pytest.raises(DataError, match="bad shard range"):
        expand_pattern("a-{3..1}.tar")
    with pytest.raises(DataError, match="not found"):
        load_splits(DataConfig(source=str(tmp_path / "s-{0..3}.tar")))


def test_cli_resume_of_a_streamed_augmented_run_is_exact(tmp_path):
    folder = _folder(tmp_path / "img", noise=True)
    # constant: see tests/cli/test_cli.py's resume test
    options = tiny.stage1(data=folder, hidden_channels=8, code_dim=4, batch_size=4, every=4,
                          eval_count=None, cache="stream", workers=2, crop="random", flip=True,
                          device="cpu", schedule="constant")
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", *options, "--steps", "8", "--out", str(a)]) == 0
    assert main(["train", *options, "--steps", "4", "--out", str(b)]) == 0  # mid-epoch (36 / 4)
    assert main(["train", "--resume", str(b), "--steps", "8"]) == 0
    wa, wb = load_autoencoder(a).state_dict(), load_autoencoder(b).state_dict()
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-5), key


@pytest.mark.cuda
def test_in_memory_batches_live_on_cuda_and_equal_the_host_ones():
    data = DataConfig(source="digits", size=8)
    train = load_splits(data).train
    host = [b.images for b in islice(train_batches(train, data, 8, 0, 0), 3)]
    cuda = [b.images for b in islice(train_batches(train, data, 8, 0, 0,
                                                   device=torch.device("cuda")), 3)]
    assert all(c.device.type == "cuda" and torch.equal(c.cpu(), h) for c, h in zip(cuda, host))


def test_unreadable_images_replaced_while_training_are_said_on_the_console(tmp_path, capsys):
    """A streamed run that met unreadable files says how many were replaced when it ends (and
    logs them in train.jsonl), instead of only counting them in the log."""
    folder = _folder(tmp_path / "img", corrupt=3)
    run = tmp_path / "run"
    options = tiny.stage1(data=str(folder), hidden_channels=8, code_dim=4, batch_size=8,
                          every=10, eval_count=None, steps=20, cache="stream", holdout="0.05",
                          max_unreadable="0.3")
    assert main(["train", *options, "--out", str(run)]) == 0
    out = capsys.readouterr().out
    logged = max(r.get("skipped_images", 0) for r in read_jsonl(run / "train.jsonl"))
    assert logged > 0
    assert f"{int(logged)} training image(s) could not be read and were replaced" in out


def test_packed_shards_manifest_and_indexes_carry_checksums_the_readers_check(tmp_path):
    """An index edited so that it still parses (an offset changed) is not trusted: a warning
    names it and the shard's headers are read; a changed manifest is refused in one line; a
    finished shard changed before a resumed pack is refused."""
    folder = _folder(tmp_path / "img")
    shards = Path(_shards(tmp_path, folder))
    paths = shard_paths(str(shards))
    truth = index_shards(paths, progress=False)
    index = paths[0].with_name(paths[0].name + INDEX_SUFFIX)
    text = index.read_text()
    first = str(truth.files.offsets[0])
    index.write_text(text.replace(f"[{first},", f"[{int(first) + 512},", 1))
    assert index.read_text() != text
    with pytest.warns(UserWarning, match=f"{index.name} is corrupt"):
        read = index_shards(paths, progress=False)
    assert np.array_equal(read.files.offsets, truth.files.offsets)
    index.write_text(text)
    manifest = shards / MANIFEST
    original = manifest.read_text()
    manifest.write_text(original.replace('"cat"', '"cow"'))
    with pytest.raises(DataError, match=f"{MANIFEST} is corrupt"):
        load_splits(DataConfig(source=str(shards / "train-{000000..000006}.tar"), size=8))
    manifest.write_text(original)
    with open(paths[2], "r+b") as f:  # a finished shard's bytes changed
        f.seek(700)
        f.write(b"X")
    with pytest.raises(DataError, match=f"{paths[2].name} is corrupt"):
        pack(folder, shards, 6, progress=False)


def test_a_run_whose_files_go_missing_stops_after_a_checkpoint(tmp_path, capsys, monkeypatch):
    """Past --max-unreadable (5%) of a log window's training images unreadable, or of the
    held-out set, the run saves and stops with one line naming the cause, instead of training
    on duplicates; the checkpoint is there to resume from."""
    folder = _folder(tmp_path / "img", corrupt=6)  # 6 of 46 files: 13%
    options = tiny.stage1(data=str(folder), hidden_channels=8, code_dim=4, batch_size=8,
                          every=50, eval_count=None, steps=100, cache="stream", holdout="0.05")
    assert main(["train", *options, "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "of the training images of the last steps could not be read" in err
    assert "step 10 is saved" in err and "Traceback" not in err
    assert (tmp_path / "a" / "checkpoints" / "step-0000010").is_dir()

    import vqvae.training.stage1 as stage1

    def held_out_deleted(cfg):  # half the held-out files vanish once the run has listed them
        splits = load_splits(cfg)
        for i in range(1, len(splits.test), 2):
            Path(splits.test.files.paths[i].decode()).unlink()
        return splits

    clean = _folder(tmp_path / "clean")
    monkeypatch.setattr(stage1, "load_splits", held_out_deleted)
    options = tiny.edit(options, data=str(clean), holdout="0.2", steps=20, every=10)
    assert main(["train", *options, "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "held-out images could be read" in err and "step 10 is saved" in err
