"""Codes files: the sha256 of their tensors, recorded when written and checked on every load."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vqvae import DataError
from vqvae.generation.codes import Codes, CodeSplit, contents_sha256, load_codes, save_codes


def _codes(split="train") -> Codes:
    grids = torch.randint(0, 16, (6, 2, 2))
    other = {"test": CodeSplit(grids[:2], torch.tensor([0, 1]))} if split == "train" else {}
    return Codes({split: CodeSplit(grids, torch.arange(6) % 2), **other}, 16, "/nowhere",
                 "0" * 64, "digits", ("a", "b"))


@pytest.mark.parametrize("split", ["train", "samples"])  # samples.safetensors: save_codes too
def test_changed_codes_are_refused_naming_the_file(tmp_path, split):
    codes = _codes(split)
    path = save_codes(codes, tmp_path / "c.safetensors")
    assert torch.equal(load_codes(path).split(split).codes, codes.split(split).codes)
    data = bytearray(path.read_bytes())
    data[-1] = (data[-1] + 1) % 16  # the last code id: another one inside the codebook
    path.write_bytes(bytes(data))
    with pytest.raises(DataError) as error:
        load_codes(path)
    assert str(error.value) == (f"{path} is corrupt: the sha256 of its code grids and labels "
                                f"differs from the one recorded in its metadata when it was "
                                f"written")


def test_the_checksum_is_of_the_contents_not_the_layout(tmp_path):
    path = save_codes(_codes(), tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    assert meta["contents_sha256"] == contents_sha256(dict(reversed(tensors.items())))
    assert meta["contents_sha256"] != contents_sha256({**tensors, "train": tensors["train"].int()})
    # the same tensors and metadata, written by another writer, still load
    save_file({k: v.clone() for k, v in tensors.items()}, str(tmp_path / "o.safetensors"), meta)
    assert load_codes(tmp_path / "o.safetensors").codebook_size == 16


def test_codes_files_without_a_checksum_load(tmp_path):
    """Files written before the checksum was recorded (the legacy fixture's) load as they did."""
    path = save_codes(_codes(), tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del meta["contents_sha256"]
    tensors["train"][0, 0, 0] = (tensors["train"][0, 0, 0] + 1) % 16
    save_file(tensors, str(path), meta)
    assert load_codes(path).split("train").codes[0, 0, 0] == tensors["train"][0, 0, 0]


def test_encode_keeps_its_checkpoint_from_a_run_pruning_meanwhile(legacy_run, tmp_path,
                                                                  monkeypatch):
    """`vqvae encode` on a run that is still training: a checkpoint saved and old ones pruned
    while it encodes never takes away the one it read (it is marked as needed first), and the
    codes name it."""
    import shutil
    from pathlib import Path

    import vqvae.generation.codes as codes_module
    from vqvae.generation.codes import encode_to_file, fingerprint
    from vqvae.store import checkpoint as ckpt

    root = legacy_run / "checkpoints"
    for mark in root.glob(f"*/{ckpt.KEEP}"):  # nothing else needs them
        mark.unlink()
    encode_set = codes_module.encode_set

    def meanwhile(*args, **kwargs):  # the run saves a new checkpoint and prunes the others
        newest = ckpt.step_folders(root)[-1]
        later = root / ckpt.step_name(ckpt.step_of(newest) + 1000)
        if not later.exists():
            shutil.copytree(newest, later, ignore=shutil.ignore_patterns(ckpt.KEEP))
            (root / ckpt.LATEST).write_text(later.name)
            ckpt._prune(root, 1, 0, later.name)
        return encode_set(*args, **kwargs)

    read = ckpt.resolve(legacy_run)
    monkeypatch.setattr(codes_module, "encode_set", meanwhile)
    codes, path = encode_to_file(legacy_run, tmp_path / "c.safetensors", device="cpu",
                                 progress=False)
    assert Path(codes.stage1) == read.resolve() and read.is_dir()
    assert load_codes(path).stage1_sha256 == fingerprint(read)
    assert ckpt.needs(read, codes_module.codes_user(path))
