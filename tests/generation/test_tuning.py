"""Sampling settings chosen at the end of train-prior: the code features and the Fréchet distance
they give, the rule that keeps plain sampling within the noise, the file, and `vqvae sample`
drawing with it unless told otherwise."""

import json
from types import SimpleNamespace

import pytest
import torch

from vqvae import VQVAE
from vqvae.cli import main
from vqvae.evaluation.quality import frechet_distance
from vqvae.generation.tuning import (PLAIN, SAMPLING, code_features, codebook_axes, read_sampling,
                                     sample_config, sweep, tune_sampling)

from tests import tiny


class ScriptedPrior:
    """A stand-in prior whose draws depend on the setting: ``good`` settings draw grids like
    the held-out ones, the others skewed towards a few codes."""

    def __init__(self, held: torch.Tensor, good: dict):
        self.held, self.good = held, good
        self.settings: list = []  # each setting draws its own picks: distances differ by chance
        self.cfg = SimpleNamespace(codebook_size=16, num_classes=0)

    def eval(self):
        return self

    def generate(self, cfg, labels=None):
        setting = (cfg.temperature, cfg.top_k, cfg.top_p)
        if setting not in self.settings:
            self.settings.append(setting)
        g = torch.Generator().manual_seed(cfg.seed + 100 * self.settings.index(setting))
        pick = torch.randint(len(self.held), (cfg.n,), generator=g)
        grids = self.held[pick].clone()
        if any(getattr(cfg, k) != v for k, v in self.good.items()):
            # every other cell becomes one of three codes: a different distribution
            grids[:, ::2] = torch.randint(3, grids[:, ::2].shape, generator=g)
        return grids


@pytest.fixture
def stage1(tiny_cfg):
    model = VQVAE(tiny_cfg).eval()
    torch.nn.init.normal_(model.quantizer.codebook)  # well-spread codes
    return model


def test_features_see_a_shifted_code_distribution(stage1):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(16, (400, 2, 2), generator=g) for _ in range(2))
    axes = codebook_axes(stage1, 16)
    same = frechet_distance(code_features(stage1, a, axes), code_features(stage1, b, axes))
    skewed = b.clone()
    skewed[:, 0] = 0
    shifted = frechet_distance(code_features(stage1, a, axes),
                               code_features(stage1, skewed, axes))
    assert shifted > 10 * same


def test_the_sweep_keeps_plain_sampling_unless_another_setting_is_clearly_closer(stage1):
    g = torch.Generator().manual_seed(1)
    held, train = (torch.randint(16, (300, 2, 2), generator=g) for _ in range(2))
    truncated = sweep(ScriptedPrior(held, {"top_p": 0.95}), stage1, held, None, train, n=200)
    assert truncated.chosen == {**PLAIN, "top_p": 0.95}
    assert len(truncated.tried) == 5 and all(len(d) == 2 for _, d in truncated.tried)
    everything = sweep(ScriptedPrior(held, {}), stage1, held, None, train, n=200)
    means = [sum(d) / 2 for _, d in everything.tried]
    assert min(means) < means[0]  # one of the others is closer by chance ...
    assert everything.chosen == PLAIN  # ... within the noise: plain stays
    with pytest.raises(Exception, match=">= 16 held-out grids"):
        sweep(ScriptedPrior(held, {}), stage1, held[:8], None, train)


def test_train_prior_chooses_and_sample_uses_the_settings(tmp_path, capsys):
    run, codes, prior = tmp_path / "run", tmp_path / "codes.safetensors", tmp_path / "prior"
    assert main(["train", *tiny.stage1(sharpen=0), "--steps", "15", "--out", str(run)]) == 0
    assert main(["encode", str(run), "--out", str(codes)]) == 0
    capsys.readouterr()
    assert main(["train-prior", "--codes", str(codes), *tiny.prior(), "--steps", "10",
                 "--tune-sampling", "64", "--out", str(prior)]) == 0
    assert "sampling with temperature" in capsys.readouterr().out
    record = json.loads((prior / SAMPLING).read_text())
    assert len(record["tried"]) == 5 and record["floor"] >= 0
    chosen = read_sampling(prior)
    # the sweep on its own, reading the run's codes and stage 1, measures what training did
    again = tune_sampling(prior, n=64)
    assert [d for _, d in again.tried] == [t["distances"] for t in record["tried"]]
    assert sample_config(prior).temperature == chosen["temperature"]
    assert sample_config(prior, temperature=0.5).temperature == 0.5  # what the user says wins
    # the file decides what `vqvae sample` draws with
    (prior / SAMPLING).write_text(json.dumps({**record, "chosen": {**PLAIN, "top_k": 3}}))
    assert main(["sample", str(prior), "--n", "4", "--out", str(tmp_path / "s")]) == 0
    assert "temperature 1, top-k 3" in capsys.readouterr().out
    assert main(["sample", str(prior), "--n", "4", "--top-k", "none",
                 "--out", str(tmp_path / "s")]) == 0  # `none` turns the chosen truncation off
    assert "(temperature 1)" in capsys.readouterr().out
    (prior / SAMPLING).write_text('{"chosen": {"temperature": -1}}')
    assert main(["sample", str(prior), "--n", "4"]) == 2
    err = capsys.readouterr().err
    assert SAMPLING in err and err.count("\n") == 1
