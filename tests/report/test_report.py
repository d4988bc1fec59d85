"""`vqvae report` without a browser: the page's sections and embedded pictures, the atlas against
brute force, a 16,384-code atlas's size, and bad input (no checkpoint, a missing log, a prior
whose stage 1 is gone, a path that is no run): a page that says what is missing, or one line."""

import base64
import io
import json
import re
import shutil
from dataclasses import replace

import pytest
import torch
from PIL import Image

from tests.report.conftest import checksums, copy_legacy
from vqvae import DataConfig, VQVAE, load_autoencoder, run_config, write_report
from vqvae.cli import main
from vqvae.config import to_dict
from vqvae.data.images import to_float, to_uint8
from vqvae.report.atlas import build_atlas, codebook, sprite_pages
from vqvae.report.page import SECTIONS
from vqvae.store import checkpoint as ckpt

SECTION_IDS = ["missing", *(key for key, _ in SECTIONS)]


def atlas_data(html: str) -> dict:
    raw = re.search(r'<script type="application/json" id="atlas-data">(.*?)</script>', html,
                    re.S).group(1)
    return json.loads(raw.replace("<\\/", "</"))


def missing(html: str) -> str:
    return re.search(r'<section id="missing".*?</section>', html, re.S).group(0)


def test_the_page_has_every_section_and_embeds_everything(reported):
    run, before, page = reported
    assert page == run / "report.html"
    html = page.read_text()
    for key in SECTION_IDS:
        assert f'<section id="{key}"' in html, key
    assert "Nothing is missing" in html
    # self-contained: every image a data URI, no external script, style, link or URL
    sources = re.findall(r'\bsrc="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert not re.search(r"https?://|<link\b|@import|<script[^>]*\bsrc=", html)
    for src in sources:
        Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).verify()
    # both priors inside the stage-1 run, each with samples of its kept checkpoints
    assert "prior run prior/" in html and "prior run maskgit/" in html
    assert html.count('alt="samples at step') == 4
    # each prior's surprise map: the most surprising held-out images first, the least last
    assert html.count('alt="surprise map"') == 2
    listings = re.findall(r"Bits per image, in that order: ([\d, ]+) \(mean", html)
    assert len(listings) == 2
    for listed in listings:
        bits = [int(b) for b in listed.split(", ")]
        assert bits[0] >= bits[-1] and bits[: len(bits) // 2] == sorted(bits[: len(bits) // 2],
                                                                       reverse=True)
    assert 'alt="reconstructions at step 4"' in html and 'alt="interpolations at step 4"' in html
    assert "held-out bits/code" in html and "dead codes over the run" in html
    # nothing in the run folder changed
    assert checksums(run) == before


def test_the_atlas_data_matches_the_model(reported):
    run, _, page = reported
    data = atlas_data(page.read_text())
    model = load_autoencoder(run)
    k = model.cfg.codebook_size
    assert data["k"] == k and sorted(data["order"]) == list(range(k))
    counts = [data["counts"][c] for c in data["order"]]
    assert counts == sorted(counts, reverse=True)  # most used first
    grids = torch.frombuffer(bytearray(base64.b64decode(data["grids"])), dtype=torch.int16)
    assert torch.bincount(grids.long(), minlength=k).tolist() == data["counts"]
    # nearest codes by brute force over the whole codebook
    vectors = codebook(model)
    d = torch.cdist(vectors, vectors).fill_diagonal_(float("inf"))
    assert data["neighbours"] == d.argsort(1)[:, :len(data["neighbours"][0])].tolist()
    sheet = Image.open(io.BytesIO(base64.b64decode(data["pages"][0].split(",", 1)[1])))
    side, cols = data["side"], data["columns"]
    assert sheet.size == (cols * 2 * side, -(-k // cols) * side)


def test_atlas_tiles_are_mean_patches_and_one_code_drawings(tiny_cfg):
    model = VQVAE(tiny_cfg).eval()
    images = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8)
    atlas = build_atlas(model, images)
    with torch.no_grad():
        grids = model.encode(to_float(images)).indices  # (40, 2, 2)
    assert torch.equal(atlas.grids, grids)
    assert int(atlas.counts.sum()) == grids.numel() and atlas.patch == 4
    code = int(atlas.order[0])
    # brute force: every 4x4 patch whose grid cell holds `code`
    picked = [images[n, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4].float()
              for n, i, j in (grids == code).nonzero().tolist()]
    mean = torch.stack(picked).mean(0).round()
    side = atlas.patches.shape[-1]  # 8: each patch pixel enlarged 2x
    assert torch.equal(atlas.patches[code].float()[:, ::side // 4, ::side // 4], mean)
    with torch.no_grad():
        drawn = to_uint8(model.decode_indices(torch.full((1, 2, 2), code)))
    assert torch.equal(atlas.drawn[code], drawn[0])
    assert sprite_pages(atlas) and (atlas.entropy >= 0).all()


def test_large_grids_are_drawn_as_an_8x8_texture(tiny_cfg):
    model = VQVAE(replace(tiny_cfg, image_size=64)).eval()  # 16 x 16 grids
    atlas = build_atlas(model, torch.randint(0, 256, (2, 1, 64, 64), dtype=torch.uint8))
    assert atlas.grids.shape == (2, 16, 16) and atlas.drawn.shape[-1] == 32
    with torch.no_grad():
        drawn = to_uint8(model.decode_indices(torch.full((1, 8, 8), 5)))  # (1, 1, 32, 32)
    assert torch.equal(atlas.drawn[5], drawn[0])


def fake_run(root, codes: int, size: int = 8):
    """A run folder holding only a config and one random-init checkpoint (no logs)."""
    cfg = run_config("default", DataConfig(source="digits", size=size, channels=1),
                     {"hidden_channels": 8, "code_dim": 4, "codebook_size": codes}, {"steps": 1})
    run = root / "run"
    ckpt.write_config(run / "config.json", "vqvae-run", to_dict(cfg))
    ckpt.write_checkpoint(run, 0, VQVAE(cfg.model), "vqvae", to_dict(cfg.model))
    return run


def test_16384_codes_stay_small_and_paged(tmp_path):
    run = fake_run(tmp_path, 16384)
    html = write_report(run, device="cpu", progress=False).read_text()
    assert len(html.encode()) < 20e6
    data = atlas_data(html)
    assert data["k"] == 16384 and len(data["pages"]) == 16  # 1,024 codes a sprite sheet
    assert html.count("<img") == 2  # the checkpoint's two pictures; the atlas is drawn by script
    assert "train.jsonl is missing" in missing(html)


def test_no_checkpoint_and_a_missing_log_still_give_a_page(tmp_path):
    run = copy_legacy(tmp_path)
    shutil.rmtree(run / "checkpoints")
    (run / "train.jsonl").unlink()
    before = checksums(run)
    out = tmp_path / "elsewhere" / "page.html"
    html = write_report(run, out, device="cpu", progress=False).read_text()
    said = missing(html)
    assert "holds no checkpoint" in said and "train.jsonl is missing" in said
    assert "No atlas" in html and "No checkpoint pictures" in html
    for key in SECTION_IDS:
        assert f'<section id="{key}"' in html, key
    assert checksums(run) == before and not (run / "report.html").exists()


def test_a_prior_whose_stage1_is_gone(tmp_path):
    run = copy_legacy(tmp_path)
    prior = tmp_path / "prior"
    shutil.move(run / "prior", prior)
    shutil.rmtree(run)
    before = checksums(prior)
    html = write_report(prior, device="cpu", progress=False).read_text()
    said = missing(html)
    assert "is gone" in said and "no stage-1 run folder" in said
    assert "held-out bits/code" in html  # its own logs are still drawn
    assert checksums(prior) == before


def test_cli(reported, tmp_path, capsys):
    run, _, _ = reported
    out = tmp_path / "r.html"
    assert main(["report", str(run / "maskgit"), "--out", str(out), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == f"report: {out}"
    html = out.read_text()
    assert "prior run maskgit/" in html and "prior run prior/" not in html  # the one asked for
    assert atlas_data(html)["k"] == 16  # with its stage 1's atlas
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a run folder" in err


@pytest.mark.parametrize("argv", [["report", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 0 and "report.html" in capsys.readouterr().out


def test_a_long_log_is_thinned_with_hover_values():
    from vqvae.report.svg import MAX_MARKS, line_chart, usage_histogram

    points = [(float(step), 1.0 / step) for step in range(1, 200_001)]
    chart = line_chart("loss", {"loss": points, "empty": []}, log=True)
    assert len(chart) < 40_000 and chart.count("<circle") == MAX_MARKS
    assert "<title>loss at step 1: 1</title>" in chart  # first and last points kept
    assert "<title>loss at step 2e+05: 5e-06</title>" in chart and "empty" not in chart
    histogram = usage_histogram([0] * 1000 + list(range(1, 15_385)))
    assert histogram.count("<rect") <= 257 and "dead" in histogram


def test_an_unreadable_checkpoint_is_a_row_saying_so(tmp_path):
    run = copy_legacy(tmp_path)
    weights = run / "prior" / "checkpoints" / "step-0000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short
    html = write_report(run, device="cpu", progress=False).read_text()
    prior = html.split("<h3>prior run prior/</h3>")[-1]  # its part of the prior section
    row = re.search(r"<th>step 2</th><td>(.*?)</td>", prior, re.S).group(1)
    assert row.startswith("unreadable:") and "model.safetensors" in row
    assert 'alt="samples at step 4"' in html  # the other checkpoints still draw


def test_restarts_are_logged_and_on_the_timeline(tmp_path):
    """Codes re-seeded by --restart-after are counted per log window in train.jsonl
    (``restarts``) and drawn on the report's dead-code timeline."""
    from vqvae.cli import main
    from vqvae.store.runs import read_jsonl

    from tests import tiny

    run = tmp_path / "run"
    assert main(["train", *tiny.stage1(codebook_size=64, restart_after=2, steps=20, every=20,
                                       eval_count=None), "--out", str(run)]) == 0
    logged = [r["restarts"] for r in read_jsonl(run / "train.jsonl")]
    assert len(logged) == 2 and sum(logged) > 0
    html = write_report(run, device="cpu", progress=False).read_text()
    assert "Restarts are not recorded" not in html and ">restarts<" in html
    # what ran it, recorded at its start (hardware.jsonl)
    assert "from step 0: cpu (" in html and "1 process(es)" in html
