from dataclasses import replace
from pathlib import Path

import pytest
import torch

import vqvae
from vqvae.store.checkpoint import load_prior, needs, protect
from vqvae.cli import main
from vqvae.generation.codes import CodeSplit, load_codes, save_codes
from vqvae.store.runs import read_jsonl
from vqvae.training.stage2 import BEST, overfit_note

from tests import tiny
from tests.script_module import load_script

STAGE1 = tiny.stage1(eval_count=32, steps=15)
PRIOR = tiny.prior(grid=3)


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    assert main(["train", *STAGE1, "--out", str(root / "run")]) == 0
    assert main(["encode", str(root / "run"), "--out", str(root / "codes.safetensors")]) == 0
    return root


def test_help_for_stage2_commands(capsys):
    for cmd in ("encode", "train-prior", "sample"):
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
    text = capsys.readouterr().out
    assert "--top-p" in text and "--guidance" in text and "--d-model" in text


def test_codes_file(stage1):
    codes = load_codes(stage1 / "codes.safetensors")
    assert codes.grid == (2, 2) and codes.codebook_size == 16 and codes.num_classes == 10
    train, test = codes.split("train"), codes.split("test")
    assert train.codes.dtype == torch.uint8 and train.codes.shape == (1617, 2, 2)
    assert len(test) == 180 and test.labels is not None and test.labels.max() <= 9
    assert len(codes.stage1_sha256) == 64 and codes.source == "digits"


def test_encode_with_flipped_training_images(stage1, tmp_path):
    """--flip appends the codes of the mirrored training images (labels repeated); the test
    split is unchanged; the mirrored half is what the model makes of flipped pictures."""
    out = tmp_path / "flipped.safetensors"
    assert main(["encode", str(stage1 / "run"), "--flip", "--out", str(out)]) == 0
    plain, flipped = load_codes(stage1 / "codes.safetensors"), load_codes(out)
    train = flipped.split("train")
    assert train.codes.shape == (2 * 1617, 2, 2)
    assert torch.equal(train.codes[:1617], plain.split("train").codes)
    assert torch.equal(train.labels, plain.split("train").labels.repeat(2))
    assert torch.equal(flipped.split("test").codes, plain.split("test").codes)
    model = vqvae.load_autoencoder(stage1 / "run")
    images = vqvae.load_splits(vqvae.DataConfig(source="digits", size=8)).train.images[:16]
    with torch.no_grad():
        mirrored = model.encode(vqvae.to_float(images).flip(-1)).indices
    assert torch.equal(train.codes[1617:1617 + 16].long(), mirrored)
    assert not torch.equal(train.codes[1617:].long(), train.codes[:1617].long())


def test_train_prior_sample_end_to_end(stage1, tmp_path, capsys):
    run = tmp_path / "prior"
    assert main(["train-prior", "--codes", str(stage1 / "codes.safetensors"), *PRIOR,
                 "--steps", "20", "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert "bits/code" in out
    # 2x2 grids of the 1,617 training digits: a small code set, so the GPT blocks with dropout
    assert "prior: default preset: pre-norm GPT blocks, d_model 16, layers 1, heads 2, " \
        "dropout 0.1, token dropout 0.1; lr 0.002 (cosine), batch 16" in out
    for name in ("config.json", "eval.json", "metrics.jsonl", "train.jsonl", "curves.png",
                 "samples.png", "samples/prior_0000010.png",
                 "checkpoints/step-0000020/model.safetensors"):
        assert (run / name).exists(), name
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [10, 20] and 0 < metrics[-1]["bits_per_code"] < 8
    assert {"loss", "bits", "lr"} <= set(read_jsonl(run / "train.jsonl")[0])

    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed in zip(outs, (3, 3, 4)):
        assert main(["sample", str(run), "--n", "9", "--seed", str(seed), "--top-k", "8",
                     "--out", str(out)]) == 0
    assert "samples.png" in capsys.readouterr().out
    a, b, c = (load_codes(out / "samples.safetensors").split("samples").codes for out in outs)
    assert a.shape == (9, 2, 2) and torch.equal(a, b) and not torch.equal(a, c)
    assert (outs[0] / "samples.png").read_bytes() == (outs[1] / "samples.png").read_bytes()


def test_resume_matches_uninterrupted_run(stage1, tmp_path):
    codes = str(stage1 / "codes.safetensors")
    a, b = tmp_path / "a", tmp_path / "b"
    # CUDA kernels need --deterministic for this; a constant rate lets a run be extended exactly
    cpu = [*PRIOR, "--device", "cpu", "--schedule", "constant"]
    assert main(["train-prior", "--codes", codes, *cpu, "--steps", "20", "--out", str(a)]) == 0
    assert main(["train-prior", "--codes", codes, *cpu, "--steps", "10", "--out", str(b)]) == 0
    assert main(["train-prior", "--resume", str(b), "--steps", "20"]) == 0
    wa, wb = load_prior(a).state_dict(), load_prior(b).state_dict()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6), key
    assert [m["step"] for m in read_jsonl(b / "metrics.jsonl")] == [10, 20]


def test_cosine_run_stopped_early_resumes_exactly(stage1, tmp_path):
    """The default cosine schedule depends on the step and --steps only: a run stopped by its
    time budget (after step 1, still in the warm-up) and resumed ends as an uninterrupted one."""
    codes = str(stage1 / "codes.safetensors")
    a, b = tmp_path / "a", tmp_path / "b"
    cpu = [*PRIOR, "--device", "cpu", "--schedule", "cosine", "--warmup", "2", "--steps", "20"]
    assert main(["train-prior", "--codes", codes, *cpu, "--out", str(a)]) == 0
    assert main(["train-prior", "--codes", codes, *cpu, "--minutes", "1e-6", "--out", str(b)]) == 0
    assert (b / "checkpoints" / "latest").read_text().strip() == "step-0000001"
    # a generous budget: its spent share (seconds / 6000 s) stays far below step / 20
    assert main(["train-prior", "--resume", str(b), "--minutes", "100"]) == 0
    wa, wb = load_prior(a).state_dict(), load_prior(b).state_dict()
    for key in wa:
        assert torch.allclose(wa[key], wb[key], atol=1e-6), key


def test_conditional_prior_encoded_on_the_fly(stage1, tmp_path, capsys):
    run = tmp_path / "cond"
    assert main(["train-prior", "--stage1", str(stage1 / "run"), "--conditional", "--preset",
                 "seed", *PRIOR, "--steps", "10", "--out", str(run)]) == 0
    assert "null class" in capsys.readouterr().out
    assert (run / "codes.safetensors").exists()  # kept for --resume
    assert load_prior(run).cfg.num_classes == 10 and load_prior(run).cfg.variant == "seed"
    assert main(["sample", str(run), "--n", "4", "--class", "3", "--guidance", "2"]) == 0
    saved = load_codes(run / "sample" / "samples.safetensors").split("samples")
    assert saved.labels.tolist() == [3, 3, 3, 3]
    assert main(["sample", str(run), "--n", "4", "--class", "10"]) == 2
    err = capsys.readouterr().err
    assert "--class 10 is out of range" in err and "0..9" in err and err.count("\n") == 1


def test_bad_input_errors(stage1, tmp_path, capsys):
    codes = load_codes(stage1 / "codes.safetensors")
    # codes made by another model: its fingerprint does not match the stage-1 checkpoint
    foreign = replace(codes, stage1_sha256="0" * 64)
    save_codes(foreign, tmp_path / "foreign.safetensors")
    assert main(["train-prior", "--codes", str(tmp_path / "foreign.safetensors"), *PRIOR,
                 "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "made by another stage-1 model" in err and err.count("\n") == 1
    # an empty codes file
    empty = {n: CodeSplit(s.codes[:0], s.labels[:0]) for n, s in codes.splits.items()}
    save_codes(replace(codes, splits=empty), tmp_path / "empty.safetensors")
    assert main(["train-prior", "--codes", str(tmp_path / "empty.safetensors"),
                 "--out", str(tmp_path / "y")]) == 2
    assert "holds no code grids" in capsys.readouterr().err
    # not a codes file at all, and a missing one
    stage1_weights = next((stage1 / "run" / "checkpoints").glob("step-*")) / "model.safetensors"
    assert main(["train-prior", "--codes", str(stage1_weights), "--out", str(tmp_path / "z")]) == 2
    assert "not a vqvae codes file" in capsys.readouterr().err
    missing = tmp_path / "nope"
    assert main(["train-prior", "--codes", str(missing), "--out", str(tmp_path / "z")]) == 2
    assert "not found" in capsys.readouterr().err
    # unconditional codes cannot train a conditional prior; class on an unconditional prior
    unlabeled = {n: CodeSplit(s.codes) for n, s in codes.splits.items()}
    save_codes(replace(codes, splits=unlabeled, classes=None), tmp_path / "plain.safetensors")
    assert main(["train-prior", "--codes", str(tmp_path / "plain.safetensors"), "--conditional",
                 "--out", str(tmp_path / "w")]) == 2
    assert "needs class labels" in capsys.readouterr().err
    assert main(["train-prior", "--out", str(tmp_path / "v")]) == 2
    assert "either --codes" in capsys.readouterr().err
    run = tmp_path / "plain"
    assert main(["train-prior", "--codes", str(tmp_path / "plain.safetensors"), *PRIOR,
                 "--steps", "2", "--out", str(run)]) == 0
    assert main(["sample", str(run), "--n", "4", "--class", "1"]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert main(["sample", str(run), "--n", "4", "--top-p", "1.5"]) == 2
    assert "top_p" in capsys.readouterr().err
    assert main(["train-prior", "--resume", str(run), "--layers", "3"]) == 2
    assert "only" in capsys.readouterr().err


def test_a_run_folder_of_the_other_stage_is_named(stage1, tmp_path, capsys):
    assert main(["sample", str(stage1 / "run")]) == 2
    assert "is a vqvae run folder, not a prior one" in capsys.readouterr().err


def test_stage2_commands_take_checkpoint_folders(stage1, tmp_path, capsys):
    step = stage1 / "run" / "checkpoints" / "step-0000015"
    assert main(["encode", str(step), "--out", str(tmp_path / "c.safetensors")]) == 0
    codes = load_codes(tmp_path / "c.safetensors")
    assert codes.source == "digits" and len(codes.split("test")) == 180
    assert codes.stage1 == str(step.resolve())
    prior = tmp_path / "prior"
    assert main(["train-prior", "--stage1", str(step), *PRIOR, "--steps", "10",
                 "--out", str(prior)]) == 0
    prior_step = prior / "checkpoints" / "step-0000010"
    assert main(["sample", str(prior_step), "--n", "4"]) == 0
    assert (prior / "sample" / "samples.png").exists()  # beside the run, not in the step
    assert main(["sample", str(stage1 / "run"), "--n", "4"]) == 2
    assert "is a vqvae run folder, not a prior one" in capsys.readouterr().err


def test_the_seed_blocks_asked_for_on_a_small_code_set(stage1):
    """The default preset gives a small code set dropout, which the seed's blocks lack: asking
    for them drops it, and asking for both is a clear error instead of a silent no-op."""
    codes = vqvae.load_codes(stage1 / "codes.safetensors")
    assert vqvae.prior_run_config(codes).model.dropout == 0.1
    cfg = vqvae.prior_run_config(codes, model={"variant": "seed"})
    assert cfg.model.variant == "seed" and cfg.model.dropout == 0.0
    assert cfg.train.token_dropout == 0.1  # the inputs' noise is not the blocks'
    with pytest.raises(vqvae.ConfigError, match="the seed's blocks have no dropout"):
        vqvae.prior_run_config(codes, model={"variant": "seed", "dropout": 0.1})
    blocks = {"variant": "maskgit", "maskgit_blocks": "seed"}  # maskgit on them: the same
    assert vqvae.prior_run_config(codes, model={"variant": "maskgit"}).model.dropout == 0.1
    assert vqvae.prior_run_config(codes, model=blocks).model.dropout == 0.0
    with pytest.raises(vqvae.ConfigError, match="the seed's blocks have no dropout"):
        vqvae.prior_run_config(codes, model={**blocks, "dropout": 0.1})
    with pytest.raises(vqvae.ConfigError, match="--maskgit-blocks is for --variant maskgit"):
        vqvae.prior_run_config(codes, model={"maskgit_blocks": "seed"})  # not a silent no-op
    with pytest.raises(vqvae.ConfigError, match="--mask-schedule is for --variant maskgit"):
        vqvae.prior_run_config(codes, model={"mask_schedule": "linear"})


def test_train_a_prior_and_draw_samples_from_python(stage1, tmp_path):
    """What README's Python section shows: no CLI involved."""
    codes = vqvae.load_codes(stage1 / "codes.safetensors")
    cfg = vqvae.prior_run_config(codes, str(stage1 / "codes.safetensors"), "seed",
                                 conditional=True, model={"d_model": 16, "layers": 1, "heads": 2},
                                 train={"steps": 10, "every": 10, "batch_size": 16, "grid": 2})
    assert cfg.model.num_classes == 10 and cfg.train.batch_size == 16
    result = vqvae.train_prior(cfg, tmp_path / "prior", progress=False)
    assert result.step == 10 and result.pictures["samples"].exists()
    draw = vqvae.SampleConfig(n=6, label=3, guidance=2.0, top_k=8, seed=1)
    first = vqvae.sample_images(result.run_dir, draw)
    again = vqvae.sample_images(result.run_dir / "checkpoints", draw)
    assert first.images.shape == (6, 1, 8, 8) and first.images.dtype == torch.uint8
    samples = first.codes.split("samples")
    assert samples.codes.shape == (6, 2, 2) and samples.labels.tolist() == [3] * 6
    assert torch.equal(first.images, again.images) and torch.equal(samples.codes,
                                                                   again.codes.split("samples").codes)
    png, saved = vqvae.save_samples(first, tmp_path / "out")
    assert png.exists() and torch.equal(load_codes(saved).split("samples").codes, samples.codes)
    with pytest.raises(vqvae.ConfigError, match="--guidance needs --class"):
        vqvae.SampleConfig(guidance=2.0).labels(10)  # checked where the classes are known
    with pytest.raises(vqvae.ConfigError, match="temperature"):
        vqvae.SampleConfig(temperature=float("nan"))


@pytest.fixture(scope="module")
def drawn_for_every_class(stage1, tmp_path_factory):
    """A conditional prior's guided samples of every class in turn, saved as `make demo` does."""
    run = tmp_path_factory.mktemp("conditional") / "cond"
    assert main(["train-prior", "--codes", str(stage1 / "codes.safetensors"), "--conditional",
                 *PRIOR, "--steps", "10", "--out", str(run)]) == 0
    assert main(["sample", str(run), "--n", "12", "--all-classes", "--guidance", "2",
                 "--seed", "1"]) == 0
    return run


def test_all_classes_in_turn_and_loaded_again(drawn_for_every_class):
    run = drawn_for_every_class
    saved = load_codes(run / "sample" / "samples.safetensors").split("samples")
    assert saved.labels.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    # the command's knobs over the settings train-prior chose: sample_config, as `vqvae sample`
    drawn = vqvae.sample_images(run, vqvae.sample_config(run, n=12, all_classes=True,
                                                         guidance=2.0, seed=1))
    loaded = vqvae.load_samples(run / "sample")  # decoded again by the stage-1 model
    assert loaded.images.shape == (12, 1, 8, 8) and torch.equal(loaded.images, drawn.images)
    assert torch.equal(loaded.codes.split("samples").codes, saved.codes)
    # Guidance changes what is drawn (same seed, same labels).
    unguided = vqvae.sample_images(run, vqvae.SampleConfig(n=12, all_classes=True, seed=1))
    assert not torch.equal(unguided.codes.split("samples").codes, saved.codes)


def _sample_quality():
    return load_script("benchmarks/sample_quality.py")


def test_judge_a_sample_folder(drawn_for_every_class, tmp_path, capsys):
    """`make demo`'s last line: the saved samples judged by the benchmark's cached classifier."""
    folder, cache = drawn_for_every_class / "sample", tmp_path / "classifier.safetensors"
    quality = _sample_quality()
    capsys.readouterr()
    argv = ["--judge", str(folder), "--classifier-steps", "20", "--cache", str(cache)]
    quality.main(argv)
    line = capsys.readouterr().out
    assert cache.exists() and line.count("\n") == 1
    # The figures are judge()'s and accuracy()'s on the saved images, with the cached classifier
    # of the data the samples' stage-1 model trained on (digits at 8 px).
    data = vqvae.DataConfig(source="digits", size=8)
    classifier, cached = quality.classifier_for(vqvae.load_splits(data).train, data,
                                                vqvae.ClassifierConfig(steps=20), cache)
    samples = vqvae.load_samples(folder)
    result = vqvae.judge(classifier, samples.images)
    shown = quality.accuracy(classifier, samples.images, samples.codes.split("samples").labels)
    assert cached and result["n"] == 12
    assert line == (f"{folder}: {100 * result['confident']:.0f}% of 12 samples confident (>= 0.8), "
                    f"{result['coverage']}/10 classes, mean confidence {result['confidence']:.2f}, "
                    f"{100 * shown:.0f}% classified as the class they were drawn for\n")
    quality.main(argv)  # the cached classifier judges the same
    assert capsys.readouterr().out == line
    with pytest.raises(SystemExit):
        quality.main(["--judge", str(folder), "--prior", str(drawn_for_every_class)])


def test_all_classes_errors(stage1, tmp_path, capsys):
    with pytest.raises(vqvae.ConfigError, match="exclude each other"):
        vqvae.SampleConfig(label=1, all_classes=True)
    assert vqvae.SampleConfig(all_classes=True, guidance=3.0).guidance == 3.0
    run = tmp_path / "unconditional"
    assert main(["train-prior", "--codes", str(stage1 / "codes.safetensors"), *PRIOR,
                 "--steps", "2", "--every", "2", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "4", "--all-classes"]) == 2
    assert "--all-classes needs a class-conditional prior" in capsys.readouterr().err


def test_overfit_note_names_the_best_step():
    falling = [{"step": 10 * i, "bits_per_code": 5.0 - 0.1 * i} for i in range(1, 5)]
    assert overfit_note(falling) == "" and overfit_note(falling[:1]) == ""
    plateau = [*falling, {"step": 50, "bits_per_code": 4.6 * 1.015}]  # within OVERFIT_RISE
    assert overfit_note(plateau) == ""
    rising = [*falling, {"step": 50, "bits_per_code": 4.8}, {"step": 60, "bits_per_code": 5.2}]
    note = overfit_note([{"step": 5, "loss": 1.0}, *rising])  # records without the metric skipped
    assert "lowest at step 40 (4.6000)" in note and "5.2000 at step 60" in note
    assert "about 40 steps" in note and "vqvae sample" not in note
    kept = Path("run/checkpoints/step-0000040")
    assert overfit_note(rising, kept).endswith(f"vqvae sample {kept}")
    assert "vqvae sample" not in overfit_note(rising, kept.with_name("step-0000050"))


def test_a_prior_that_overfits_says_so(stage1, tmp_path):
    """Four training grids, a high rate: held-out bits/code bottom out early and climb as the
    prior learns those grids by heart; the run ends with a warning naming the best step."""
    codes = load_codes(stage1 / "codes.safetensors")
    few = {"train": CodeSplit(codes.split("train").codes[:4]),
           "test": CodeSplit(codes.split("test").codes)}
    path = tmp_path / "few.safetensors"
    save_codes(replace(codes, splits=few, classes=None), path)
    run = tmp_path / "prior"
    options = tiny.prior(d_model=32, batch_size=4, eval_count=180, grid=2, lr="1e-2",
                         schedule="constant", steps=150, device="cpu")
    with pytest.warns(UserWarning, match="the prior overfits its training codes") as caught:
        assert main(["train-prior", "--codes", str(path), *options, "--out", str(run)]) == 0
    bits = [r["bits_per_code"] for r in read_jsonl(run / "metrics.jsonl")]
    assert bits[-1] > min(bits) * 1.02  # the setup overfits
    best = read_jsonl(run / "metrics.jsonl")[bits.index(min(bits))]["step"]
    notes = [str(w.message) for w in caught if "overfits" in str(w.message)]
    assert len(notes) == 1 and f"held-out bits/code was lowest at step {best} " in notes[0]
    # That checkpoint is kept from pruning (keep 2: the last two, and it), the ones kept for
    # earlier lows were released and pruned, and it can be sampled.
    kept = run / "checkpoints" / f"step-{best:07d}"
    assert notes[0].endswith(f"vqvae sample {kept}")
    marked = [c.name for c in (run / "checkpoints").glob("step-*") if (c / "keep.json").exists()]
    assert marked == [kept.name]
    steps = sorted(c.name for c in (run / "checkpoints").glob("step-*"))
    assert steps == sorted({kept.name, "step-0000140", "step-0000150"})
    assert main(["sample", str(kept), "--n", "4", "--out", str(tmp_path / "best")]) == 0
    assert (tmp_path / "best" / "samples.png").exists()
    # A resumed run knows which checkpoint it keeps (from its marker) and goes on keeping it;
    # a stale mark (a kill between marking the new best and releasing the old) is released.
    stale = run / "checkpoints" / "step-0000001"  # older than the best: marks only move on
    stale.mkdir()
    protect(stale, BEST)
    protect(kept, "a codes file")  # another user of the same checkpoint is left alone
    with pytest.warns(UserWarning, match=f"lowest at step {best} "):
        assert main(["train-prior", "--resume", str(run), "--steps", "170"]) == 0
    marked = [c.name for c in (run / "checkpoints").glob("step-*") if needs(c, BEST)]
    assert marked == [kept.name] and not (run / "checkpoints" / "step-0000140").exists()
    assert not stale.exists()  # released, then pruned
    assert needs(kept, "a codes file")
