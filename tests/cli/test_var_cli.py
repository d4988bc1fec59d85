"""Next-scale generation from the command line: a multiscale tokenizer, its codes, a var prior
on them (resumed exactly) and samples; and the one-line refusals around them."""

import numpy as np
import pytest
import torch

import vqvae
from vqvae.cli import main
from vqvae.generation.code_folders import npy_name
from vqvae.generation.codes import load_codes
from vqvae.store.checkpoint import load_prior
from vqvae.store.runs import read_jsonl

from tests import tiny

# 16 px digits: a 4x4 code grid, scales 1,2,3,4 (30 tokens)
STAGE1 = tiny.stage1(size=16, eval_count=32, steps=15, quantizer="multiscale", kmeans_init=True,
                     restart_after=5)
PRIOR = tiny.prior(grid=3)
TOKENS = 1 + 4 + 9 + 16


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("var")
    assert main(["train", *STAGE1, "--out", str(root / "run")]) == 0
    assert main(["encode", str(root / "run"), "--out", str(root / "codes.safetensors")]) == 0
    assert main(["train", *tiny.stage1(steps=2), "--out", str(root / "grid")]) == 0
    assert main(["encode", str(root / "grid"), "--out", str(root / "grid.safetensors")]) == 0
    return root


def test_codes_file_holds_token_sequences_and_their_scales(stage1):
    codes = load_codes(stage1 / "codes.safetensors")
    assert codes.scales == (1, 2, 3, 4) and codes.grid == (4, 4)
    train = codes.split("train").codes
    assert train.shape == (1617, TOKENS) and train.dtype == torch.uint8
    # the library decodes them as the tokenizer quantizes: the codes are its own
    model = vqvae.load_autoencoder(stage1 / "run")
    images = vqvae.load_splits(vqvae.DataConfig(source="digits", size=16)).train.images[:4]
    with torch.no_grad():
        q = model.encode(images.float() / 127.5 - 1)
        assert torch.equal(q.indices, train[:4].long())
        assert torch.equal(model.decode_indices(q.indices), model.decode(q.quantized))
    assert load_codes(stage1 / "grid.safetensors").scales is None  # grids stay as they were


def test_npy_codes_hold_each_image_s_sequence_and_the_index_its_scales(stage1, tmp_path):
    assert main(["encode", str(stage1 / "run"), "--format", "npy", "--out",
                 str(tmp_path / "npy")]) == 0
    index = vqvae.read_code_folder(tmp_path / "npy")
    assert index["scales"] == [1, 2, 3, 4] and index["grid"] == [4, 4]
    train = load_codes(stage1 / "codes.safetensors").split("train")
    first = np.load(tmp_path / "npy" / "train" / npy_name(train.keys[0]))
    assert first.shape == (TOKENS,) and first.tolist() == train.codes[0].tolist()


def test_var_prior_end_to_end_and_exact_resume(stage1, tmp_path, capsys):
    codes = str(stage1 / "codes.safetensors")
    a, b = tmp_path / "a", tmp_path / "b"
    cpu = [*PRIOR, "--device", "cpu", "--schedule", "constant"]
    # no --variant: multiscale codes get a var prior
    assert main(["train-prior", "--codes", codes, *cpu, "--steps", "20", "--out", str(a)]) == 0
    assert "var" in capsys.readouterr().out
    assert main(["train-prior", "--codes", codes, *cpu, "--variant", "var", "--steps", "10",
                 "--out", str(b)]) == 0
    assert main(["train-prior", "--resume", str(b), "--steps", "20"]) == 0
    pa, pb = load_prior(a), load_prior(b)
    assert type(pa).__name__ == "VARPrior" and pa.cfg.scales == (1, 2, 3, 4)
    wa, wb = pa.state_dict(), pb.state_dict()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6), key
    assert [m["step"] for m in read_jsonl(b / "metrics.jsonl")] == [10, 20]
    assert 0 < read_jsonl(b / "metrics.jsonl")[-1]["bits_per_code"] < 4  # log2(16) = uniform
    assert (a / "sampling.json").exists()  # settings chosen from its token maps' features
    assert main(["sample", str(a), "--n", "4", "--top-k", "8"]) == 0
    saved = load_codes(a / "sample" / "samples.safetensors")
    assert saved.scales == (1, 2, 3, 4) and saved.split("samples").codes.shape == (4, TOKENS)
    assert (a / "sample" / "samples.png").stat().st_size > 0
    samples = vqvae.sample_images(a, vqvae.SampleConfig(n=2, seed=1), device="cpu")
    assert samples.images.shape == (2, 1, 16, 16) and samples.images.dtype == torch.uint8


@pytest.mark.parametrize("which, variant, words", [
    ("codes", "gpt", "train --variant var on them"),
    ("codes", "maskgit", "train --variant var on them"),
    ("grid", "var", "--quantizer multiscale")])
def test_mismatched_prior_and_codes_are_refused(stage1, tmp_path, capsys, which, variant, words):
    codes = stage1 / ("codes.safetensors" if which == "codes" else "grid.safetensors")
    assert main(["train-prior", "--codes", str(codes), *PRIOR, "--variant", variant,
                 "--steps", "1", "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_codec_and_inpainting_refuse_a_var_prior(stage1, tmp_path, capsys):
    run = tmp_path / "p"
    assert main(["train-prior", "--codes", str(stage1 / "codes.safetensors"), *PRIOR,
                 "--steps", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["surprise", str(run), "--data", "digits", "--out", str(tmp_path / "s")]) == 2
    assert "not supported by it yet" in capsys.readouterr().err
    with pytest.raises(vqvae.DataError, match="multiscale token maps"):
        vqvae.compress(run, torch.zeros(1, 1, 16, 16, dtype=torch.uint8), device="cpu")
    with pytest.raises(vqvae.ConfigError, match="maskgit"):
        vqvae.Pipeline.from_run(run, "cpu").inpaint(torch.zeros(1, 16, 16, dtype=torch.uint8),
                                                    torch.ones(16, 16, dtype=torch.bool))


def test_a_finetuned_decoder_keeps_the_token_maps(stage1, tmp_path):
    """finetune-decoder (here with the GAN) freezes the multiscale quantizer: the fine-tuned
    model encodes the same token maps, and a var prior's samples decode through it."""
    ft = tmp_path / "ft"
    assert main(["finetune-decoder", str(stage1 / "run"), "--steps", "3", "--every", "3",
                 "--eval-count", "16", "--gan-weight", "0.1", "--disc-channels", "8",
                 "--out", str(ft)]) == 0
    before, after = vqvae.load_autoencoder(stage1 / "run"), vqvae.load_autoencoder(ft)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(before.encode(x).indices, after.encode(x).indices)
        assert not torch.equal(before.decode_indices(before.encode(x).indices),
                               after.decode_indices(before.encode(x).indices))
    prior = tmp_path / "p"
    assert main(["train-prior", "--codes", str(stage1 / "codes.safetensors"), *PRIOR,
                 "--steps", "1", "--out", str(prior)]) == 0
    assert main(["sample", str(prior), "--n", "2", "--decoder", str(ft), "--out",
                 str(tmp_path / "s")]) == 0


def test_multiscale_tokenizer_resumes_exactly(tmp_path):
    """Its shared codebook's k-means flag and restart counters are state: a run stopped and
    resumed ends as an uninterrupted one (constant rate, no --sharpen phase)."""
    a, b = tmp_path / "a", tmp_path / "b"
    cpu = [*tiny.edit(STAGE1, restart_after=3, codebook_size=64, steps=None, every=4),
           "--device", "cpu", "--schedule", "constant", "--sharpen", "0"]
    assert main(["train", *cpu, "--steps", "8", "--out", str(a)]) == 0
    assert main(["train", *cpu, "--steps", "4", "--out", str(b)]) == 0
    assert main(["train", "--resume", str(b), "--steps", "8"]) == 0
    wa, wb = vqvae.load_autoencoder(a).state_dict(), vqvae.load_autoencoder(b).state_dict()
    assert "quantizer.vq.unused_steps" in wa and bool(wa["quantizer.vq.initialized"])
    for key in wa:
        assert torch.allclose(wa[key].float(), wb[key].float(), atol=1e-5), key
