import json
import os

import pytest
import torch

from vqvae import VQVAE, CheckpointError, load_autoencoder
from vqvae.store import checkpoint as ckpt
from vqvae import fileio
from vqvae.config import to_dict


def _trained(cfg):
    model = VQVAE(cfg)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(4, 1, 8, 8) * 2 - 1
    out = model(x)
    ((out.reconstruction - x).pow(2).mean() + out.quantized.loss).backward()
    opt.step()
    return model.eval(), opt


def test_save_load_identical_outputs(tmp_path, tiny_cfg):
    model, opt = _trained(tiny_cfg)
    path = ckpt.write_checkpoint(tmp_path, 7, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt)
    assert path.name == "step-0000007" and (path / "model.safetensors").exists()
    loaded = load_autoencoder(tmp_path)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.reconstruct(x), model.reconstruct(x))
        assert torch.equal(loaded.encode(x).indices, model.encode(x).indices)
    assert loaded.cfg == tiny_cfg


def test_training_state_round_trip(tmp_path, tiny_cfg):
    model, opt = _trained(tiny_cfg)
    ckpt.write_checkpoint(tmp_path, 3, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    ckpt.write_checkpoint(tmp_path, 4, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt)
    fresh = VQVAE(tiny_cfg)
    fresh_opt = torch.optim.Adam(fresh.parameters(), 1e-3)
    torch.rand(5)  # disturb the RNG; loading must restore it
    meta = ckpt.load_training_state(ckpt.resolve(tmp_path), fresh_opt)
    assert meta["step"] == 4
    assert torch.equal(torch.rand(3), expected_next)
    a, b = opt.state_dict(), fresh_opt.state_dict()
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            assert torch.equal(value, b["state"][pid][key])


def test_interrupted_write_keeps_last_good_checkpoint(tmp_path, tiny_cfg, monkeypatch):
    model, opt = _trained(tiny_cfg)
    ckpt.write_checkpoint(tmp_path, 1, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed half-way through writing the training state

    monkeypatch.setattr(ckpt, "save_training_state", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 2, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt)
    assert ckpt.resolve(tmp_path).name == "step-0000001"
    load_autoencoder(tmp_path)  # still readable


def test_the_atomic_writer_fsyncs_the_file_before_the_rename_and_the_folder_after(
        tmp_path, monkeypatch):
    """Durability, in order: write, flush, fsync of the temporary file's descriptor, rename over
    the target, fsync of the folder. Without the fsyncs a power cut can leave an empty file."""
    calls, real_fsync, real_replace = [], os.fsync, os.replace
    folders = set()
    real_open = os.open

    def record_open(path, flags, *args, **kwargs):
        fd = real_open(path, flags, *args, **kwargs)
        if os.path.isdir(path):
            folders.add(fd)
        return fd

    def fsync(fd):
        calls.append("fsync folder" if fd in folders else "fsync file")
        real_fsync(fd)

    def replace(src, dst):
        calls.append("replace")
        real_replace(src, dst)

    def write(f):
        real_flush = f.flush
        f.write(b"data")
        calls.append("write")
        f.flush = lambda: (calls.append("flush"), real_flush())[1]

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "open", record_open)
    target = fileio.write_with(tmp_path / "out.bin", write)
    assert target.read_bytes() == b"data"
    assert [c for c in calls if c != "flush"] == ["write", "fsync file", "replace",
                                                   "fsync folder"]
    # flushed to the OS before the fsync (closing the file flushes again, harmlessly)
    assert calls.index("write") < calls.index("flush") < calls.index("fsync file")


def test_latest_names_a_step_only_after_its_folder_is_complete(tmp_path, tiny_cfg, monkeypatch):
    """``latest`` is written after the step folder is renamed into place, complete; a crash
    between the two leaves ``latest`` on the previous step (never on a missing folder)."""
    model, opt = _trained(tiny_cfg)
    root = tmp_path / "checkpoints"
    seen, real_write_bytes, real_replace = [], ckpt.write_bytes, os.replace

    def write_bytes(path, data):
        if path.name == "latest":
            folder = root / data.decode().strip()
            seen.append((folder.name, (folder / "model.safetensors").is_file()))
        return real_write_bytes(path, data)

    monkeypatch.setattr(ckpt, "write_bytes", write_bytes)
    ckpt.write_checkpoint(tmp_path, 1, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt)
    assert seen == [("step-0000001", True)]  # the folder was there, complete, when named

    def killed_at_the_rename(src, dst):
        if os.path.basename(src).startswith(".tmp-step"):
            raise KeyboardInterrupt  # killed between writing the folder and renaming it
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", killed_at_the_rename)
    with pytest.raises(KeyboardInterrupt):
        ckpt.write_checkpoint(tmp_path, 2, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt)
    assert (root / "latest").read_text().strip() == "step-0000001"


def test_keeps_only_the_last_two(tmp_path, tiny_cfg):
    model, opt = _trained(tiny_cfg)
    for step in (1, 2, 3):
        ckpt.write_checkpoint(tmp_path, step, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["latest", "step-0000002", "step-0000003"]


def test_wrong_kind_shapes_and_corrupt_files_are_clear_errors(tmp_path, tiny_cfg):
    model, _ = _trained(tiny_cfg)
    ckpt.save(tmp_path / "prior", model, "prior", to_dict(tiny_cfg))
    with pytest.raises(CheckpointError, match="'prior' checkpoint, not 'vqvae'"):
        load_autoencoder(tmp_path / "prior")
    other = dict(to_dict(tiny_cfg), codebook_size=32)
    ckpt.save(tmp_path / "other", model, ckpt.VQVAE_KIND, other)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_autoencoder(tmp_path / "other")
    good = tmp_path / "good"
    ckpt.save(good, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg))
    (good / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_autoencoder(good)
    (good / "config.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_autoencoder(good)
    with pytest.raises(CheckpointError, match="not found"):
        load_autoencoder(tmp_path / "missing")


def test_config_json_is_plain_and_tagged(tmp_path, tiny_cfg):
    model, _ = _trained(tiny_cfg)
    ckpt.save(tmp_path, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg))
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["kind"] == "vqvae" and meta["config"]["codebook_size"] == 16


def _flip_last_tensor_byte(path):
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # inside the last tensor's data, not the header: still a readable file
    path.write_bytes(bytes(data))


def test_training_state_and_companions_are_checksummed(tmp_path, tiny_cfg):
    model, opt = _trained(tiny_cfg)
    disc = torch.nn.Linear(3, 2)
    disc_opt = torch.optim.Adam(disc.parameters(), 1e-3)
    disc(torch.rand(4, 3)).sum().backward()
    disc_opt.step()
    folder = ckpt.write_checkpoint(tmp_path, 2, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt,
                                   companions={"adversary": (disc, disc_opt)})
    fresh = torch.optim.Adam(VQVAE(tiny_cfg).parameters(), 1e-3)
    ckpt.load_training_state(folder, fresh)
    ckpt.load_companion(folder, "adversary", torch.nn.Linear(3, 2),
                        torch.optim.Adam(torch.nn.Linear(3, 2).parameters(), 1e-3))
    for data, record in (("state.safetensors", "state.json"),
                         ("adversary.safetensors", "adversary.json")):
        assert json.loads((folder / record).read_text())["state_sha256"]
        _flip_last_tensor_byte(folder / data)
    with pytest.raises(CheckpointError) as error:
        ckpt.load_training_state(folder, fresh)
    assert str(error.value) == (f"{folder / 'state.safetensors'} is corrupt: its sha256 differs "
                                f"from the one recorded in {folder / 'state.json'} when it was "
                                f"written")
    other = torch.nn.Linear(3, 2)
    with pytest.raises(CheckpointError, match="adversary.safetensors is corrupt: its sha256 "
                                              "differs from the one recorded in .*adversary.json"):
        ckpt.load_companion(folder, "adversary", other, torch.optim.Adam(other.parameters()))


def test_training_state_without_a_checksum_loads(tmp_path, tiny_cfg):
    """Checkpoints written before the checksums were recorded load as they did."""
    model, opt = _trained(tiny_cfg)
    disc = torch.nn.Linear(3, 2)
    disc_opt = torch.optim.Adam(disc.parameters(), 1e-3)
    folder = ckpt.write_checkpoint(tmp_path, 2, model, ckpt.VQVAE_KIND, to_dict(tiny_cfg), opt,
                                   companions={"adversary": (disc, disc_opt)})
    for record in ("state.json", "adversary.json"):
        meta = json.loads((folder / record).read_text())
        del meta["state_sha256"]
        (folder / record).write_text(json.dumps(meta))
    assert ckpt.load_training_state(folder, torch.optim.Adam(model.parameters()))["step"] == 2
    ckpt.load_companion(folder, "adversary", disc, disc_opt)
