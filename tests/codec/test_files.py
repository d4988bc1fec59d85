"""Compressed files of images, through the library and the command line: decompress(compress(x))
is the stage-1 decoder's output for x's codes, in another process too; bad files and other models
give one line and write nothing; the surprise map adds up to the coded bits."""

import csv
import math
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vqvae
from vqvae.cli import main
from vqvae.codec import compress as codec
from vqvae.codec import probabilities
from vqvae.codec.container import unpack
from vqvae.generation.pipeline import Pipeline

from tests.e2e.test_reliability import one_line

KINDS = ("prior", "maskgit")  # the legacy run's autoregressive and maskgit priors


def held_out(run: Path, n: int = 40) -> torch.Tensor:
    return vqvae.load_splits(vqvae.load_run_config(run).data).test.images[:n]


def seeded_grids(n: int = 1000) -> torch.Tensor:
    """The same grids in every process: half constant-ish, half random (4x4 of 16 codes)."""
    g = torch.Generator().manual_seed(31)
    grids = torch.randint(0, 16, (n, 4, 4), generator=g)
    grids[: n // 2] = grids[: n // 2] % 3  # a few codes only: cheaper under some orders
    return grids


def _pngs(folder: Path, images: torch.Tensor) -> list[str]:
    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        paths.append(str(folder / f"digit{i:03d}.png"))
        Image.fromarray(image[0].numpy()).save(paths[-1])
    return paths


def _read_png(path: Path) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.array(image))[None]


@pytest.mark.parametrize("kind", KINDS)
def test_decompressed_images_are_the_decoders_output_for_their_codes(legacy_run, kind):
    pipe = Pipeline.from_run(legacy_run / kind, device="cpu")
    images = held_out(legacy_run)
    data = vqvae.compress(pipe, images, names=[f"x{i}.jpg" for i in range(40)], batch_size=16)
    out = vqvae.decompress(pipe, data)
    codes = pipe.encode(images)
    assert torch.equal(out.codes, codes)
    assert torch.equal(out.images, pipe.decode(codes))
    assert out.names == [f"x{i}.jpg" for i in range(40)] and out.labels is None
    bare = vqvae.compress(pipe, images, batch_size=16)  # no names
    box = unpack(bare)
    bits = float(codec.encode_grids(pipe.prior, codes, None, 16, box.header.steps).bits.sum())
    assert box.payload_bytes() <= math.ceil(1.01 * bits / 8) + 8 * len(box.streams)
    assert len(bare) - box.payload_bytes() <= 40 * 4 + 40  # the checksums and a few dozen bytes
    assert box.streams == unpack(data).streams


FRESH = """
import sys
from pathlib import Path
import torch
import vqvae
from vqvae.cli import main
from vqvae.generation.pipeline import Pipeline
from tests.codec.test_files import KINDS, seeded_grids
run, out = Path(sys.argv[1]), Path(sys.argv[2])
torch.set_num_threads(3)  # the tests' process has 1
for kind in KINDS:  # coded with 3 threads: the file records it, decoding uses as many
    pipe = Pipeline.from_run(run / kind, device="cpu")
    (out / f"{kind}.vqvc").write_bytes(vqvae.compress_codes(pipe, seeded_grids(), batch_size=64,
                                                            steps=3, threads=3))
sys.exit(main(["compress", str(run / "maskgit"), str(out / "pngs"), "--out",
               str(out / "images.vqvc"), "--device", "cpu", "--batch-size", "7"]))
"""


def test_files_compressed_in_another_process_decompress_exactly(legacy_run, tmp_path, capsys):
    images = held_out(legacy_run, 20)
    _pngs(tmp_path / "pngs", images)
    root = Path(__file__).parents[2]
    done = subprocess.run([sys.executable, "-c", FRESH, str(legacy_run), str(tmp_path)],
                          cwd=root, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for kind in KINDS:
        pipe = Pipeline.from_run(legacy_run / kind, device="cpu")
        _, grids, labels = vqvae.decompress_codes(pipe, (tmp_path / f"{kind}.vqvc").read_bytes())
        assert torch.equal(grids, seeded_grids()) and labels is None
    assert main(["decompress", str(tmp_path / "images.vqvc"), "--out", str(tmp_path / "back"),
                 "--device", "cpu"]) == 0  # the models found from the path the file records
    assert "20 images" in capsys.readouterr().out
    pipe = Pipeline.from_run(legacy_run / "maskgit", device="cpu")
    expected = pipe.decode(pipe.encode(images))
    for i in range(20):
        assert torch.equal(_read_png(tmp_path / "back" / f"digit{i:03d}.png"), expected[i])


def _corrupt(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


def test_bad_files_give_one_line_and_write_nothing(legacy_run, tmp_path, capsys, monkeypatch):
    paths = _pngs(tmp_path / "pngs", held_out(legacy_run, 5))
    good = tmp_path / "good.vqvc"
    assert main(["compress", str(legacy_run / "prior"), *paths, "--out", str(good),
                 "--device", "cpu"]) == 0
    data = good.read_bytes()
    bad = {"wrong-magic": b"PNG!" + data[4:], "newer": data[:4] + b"\x02" + data[5:],
           "truncated": data[:-9], "corrupt": _corrupt(data, len(data) - 12),
           "empty": b""}
    messages = {"wrong-magic": "not a vqvae compressed file", "newer": "format version 2",
                "truncated": "corrupt or truncated", "corrupt": "corrupt or truncated",
                "empty": "not a vqvae compressed file"}
    out = tmp_path / "out"
    for name, content in bad.items():
        (tmp_path / name).write_bytes(content)
        assert main(["decompress", str(tmp_path / name), "--out", str(out)]) == 2
        assert messages[name] in one_line(capsys), name
    assert main(["decompress", str(good), "--out", str(out), "--prior",
                 str(legacy_run / "maskgit"), "--device", "cpu"]) == 2
    assert "compressed with another prior" in one_line(capsys)
    # Every prefix and every flipped byte is refused (the file's CRC-32), never a traceback.
    for cut in range(len(data)):
        with pytest.raises(vqvae.DataError):
            unpack(data[:cut])
    for at in range(len(data)):
        with pytest.raises(vqvae.DataError):
            unpack(_corrupt(data, at))
    # Probabilities that differ from the compressing machine's: the checksums catch it.
    real = probabilities.probabilities
    monkeypatch.setattr(probabilities, "probabilities",
                        lambda logits: real(logits * (1 + 1e-3)))
    assert main(["decompress", str(good), "--out", str(out), "--device", "cpu"]) == 2
    assert "probabilities differ" in one_line(capsys)
    assert not out.exists()


def test_a_valid_crc_with_wrong_streams_fails_the_checksums(legacy_run):
    pipe = Pipeline.from_run(legacy_run / "prior", device="cpu")
    data = bytearray(vqvae.compress(pipe, held_out(legacy_run, 8), batch_size=8))
    data[-5] ^= 0x01  # the last stream byte, the file's CRC-32 recomputed
    data[-4:] = zlib.crc32(bytes(data[:-4])).to_bytes(4, "little")
    with pytest.raises(vqvae.DataError, match="checksum|do not decode"):
        vqvae.decompress(pipe, bytes(data))


def test_class_labels_are_coded(legacy_run, tmp_path):
    """A class-conditional prior (the legacy prior's weights with a class embedding added)."""
    pipe = Pipeline.from_run(legacy_run / "prior", device="cpu")
    cfg = pipe.prior.cfg.__class__(**{**pipe.prior.cfg.__dict__, "num_classes": 4})
    conditional = vqvae.build_prior(cfg)
    conditional.load_state_dict(pipe.prior.state_dict(), strict=False)
    pipe = Pipeline(conditional.eval(), pipe.stage1, pipe.run_cfg)
    images, labels = held_out(legacy_run, 12), torch.arange(12) % 4
    out = vqvae.decompress(pipe, vqvae.compress(pipe, images, labels, batch_size=5))
    assert torch.equal(out.labels, labels) and torch.equal(out.codes, pipe.encode(images))
    unlabelled = vqvae.decompress(pipe, vqvae.compress(pipe, images))
    assert unlabelled.labels is None and torch.equal(unlabelled.codes, out.codes)


def test_surprise_bits_are_the_priors_and_rank_a_data_set(legacy_run, tmp_path, capsys):
    pipe = Pipeline.from_run(legacy_run / "prior", device="cpu")
    images = held_out(legacy_run, 6)
    result = vqvae.surprise(pipe, images)
    with torch.no_grad():
        nats = pipe.prior.nll(pipe.encode(images)).view(6, 4, 4)
    assert torch.allclose(result.bits, nats.double() / math.log(2), atol=1e-4)
    paths = _pngs(tmp_path / "pngs", images)
    assert main(["surprise", str(legacy_run / "prior"), *paths, "--out", str(tmp_path / "s"),
                 "--device", "cpu"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "bits.csv")))
    assert [float(r["bits"]) for r in rows] == pytest.approx(result.per_image.tolist(), abs=0.01)
    assert (tmp_path / "s" / "digit000.surprise.png").is_file()
    assert main(["surprise", str(legacy_run / "maskgit"), "--data", "digits", "--out",
                 str(tmp_path / "d"), "--top", "4", "--device", "cpu"]) == 0
    ranking = list(csv.DictReader(open(tmp_path / "d" / "ranking.csv")))
    bits = [float(r["bits"]) for r in ranking]
    assert len(ranking) == 180 and bits == sorted(bits, reverse=True)
    assert (tmp_path / "d" / "outliers.png").is_file()
    capsys.readouterr()
    assert main(["surprise", str(legacy_run / "prior"), "--out", str(tmp_path / "e")]) == 2
    assert "not both or neither" in one_line(capsys)


def test_the_map_is_red_where_the_bits_are():
    bits = torch.zeros(1, 2, 2, dtype=torch.float64)
    bits[0, 1, 0] = 4.0  # log2 16: full red
    maps = vqvae.Surprise(torch.full((1, 1, 4, 4), 255, dtype=torch.uint8), bits, 16).maps()
    assert maps[0, :, 2:, :2].tolist() == [[[255] * 2] * 2, [[102] * 2] * 2, [[102] * 2] * 2]
    assert (maps[0, :, :2] == 255).all() and (maps[0, :, :, 2:] == 255).all()


def test_help_of_the_codec_commands(capsys):
    for command in ("compress", "decompress", "surprise"):
        with pytest.raises(SystemExit) as e:
            main([command, "--help"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--batch-size" in text and "--labels" in text and "--prior" in text and "--top" in text
