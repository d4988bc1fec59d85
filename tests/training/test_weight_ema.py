"""--weight-ema: the weights' moving average, kept beside the raw weights in every checkpoint,
exact on resume, and what evaluation, encoding and sampling use."""

import json

import torch
from safetensors.torch import load_file
from torch import nn

from vqvae import load_autoencoder, load_prior
from vqvae.cli import main
from vqvae.models.ema import WeightEMA

from tests import tiny


def test_the_average_follows_the_hand_computed_update():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = WeightEMA(model, decay=0.9)
    start = model[0].weight.detach().clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(3.0)
    ema.update(model, step=100)  # d = min(0.9, 101 / 110) = 0.9
    assert torch.allclose(ema.average[0].weight, 0.9 * start + 0.1 * (start + 1.0))
    assert torch.equal(ema.average[1].running_mean, torch.full((2,), 3.0))  # copied
    ema.update(model, step=0)  # early: d = 1 / 10, nearly the weights themselves
    assert torch.allclose(ema.average[0].weight,
                          0.1 * (0.9 * start + 0.1 * (start + 1)) + 0.9 * (start + 1))
    raw = model[0].weight.detach().clone()
    with ema.applied(model):
        assert torch.equal(model[0].weight, ema.average[0].weight)
    assert torch.equal(model[0].weight, raw)


def _ema(checkpoint):
    return {k: v for k, v in load_file(str(checkpoint / "ema.safetensors")).items()}


def test_stage_1_and_2_keep_an_exact_average_that_evaluation_and_sampling_use(tmp_path, capsys):
    options = tiny.stage1(every=10, eval_count=None, weight_ema="0.9", schedule="constant")
    full, part = tmp_path / "full", tmp_path / "part"
    assert main(["train", *options, "--steps", "20", "--out", str(full)]) == 0
    assert main(["train", *options, "--steps", "10", "--out", str(part)]) == 0
    assert main(["train", "--resume", str(part), "--steps", "20"]) == 0
    a, b = (run / "checkpoints" / "step-0000020" for run in (full, part))
    ema_a, ema_b = _ema(a), _ema(b)
    assert ema_a.keys() == ema_b.keys() and all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    raw = load_file(str(a / "model.safetensors"))
    loaded = load_autoencoder(full).state_dict()
    assert any(not torch.equal(raw[k], ema_a["module." + k]) for k in raw)  # not the raw ones
    assert all(torch.equal(loaded[k], ema_a["module." + k]) for k in raw)  # the average
    final = json.loads((full / "eval.json").read_text())
    capsys.readouterr()
    assert main(["eval", str(full), "--out", str(tmp_path / "e.json")]) == 0
    # the run's final metrics are the average's, as `vqvae eval` (which loads it) measures them
    assert abs(json.loads((tmp_path / "e.json").read_text())["psnr"] - final["psnr"]) < 1e-4
    codes = tmp_path / "codes.safetensors"
    assert main(["encode", str(full), "--out", str(codes)]) == 0
    prior = tmp_path / "prior"
    assert main(["train-prior", "--codes", str(codes), *tiny.prior(weight_ema="0.9"),
                 "--steps", "10", "--out", str(prior)]) == 0
    step = prior / "checkpoints" / "step-0000010"
    assert (step / "ema.safetensors").is_file()
    averaged = _ema(step)
    assert all(torch.equal(v, averaged["module." + k])
               for k, v in load_prior(prior).state_dict().items())
    assert main(["sample", str(prior), "--n", "4"]) == 0
