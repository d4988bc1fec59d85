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
