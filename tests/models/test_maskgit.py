import math

import numpy as np
import pytest
import torch
from PIL import Image

from vqvae import DataConfig, SampleConfig, load_autoencoder, load_splits, to_float
from vqvae.store.checkpoint import PRIOR_KIND, load_prior, write_checkpoint
from vqvae.generation.inpaint import code_mask
from vqvae.generation.pipeline import inpaint
from vqvae.cli import main
from vqvae.generation.codes import load_codes
from vqvae.config import ConfigError, PriorConfig, default_prior, from_dict, to_dict
from vqvae.models.maskgit import MaskGITPrior, masked_count, masked_fraction
from vqvae.models.prior import build_prior
from vqvae.store.runs import read_jsonl
from vqvae.models.transformer import SeedStack

from tests.tiny import prior as tiny_prior, stage1 as tiny_stage1  # tiny(): a MaskGITPrior


def tiny(num_classes: int = 0, k: int = 16, h: int = 3, w: int = 4) -> MaskGITPrior:
    cfg = PriorConfig(codebook_size=k, height=h, width=w, num_classes=num_classes,
                      variant="maskgit", d_model=32, layers=2, heads=4, dropout=0.0)
    return build_prior(cfg)


def test_schedule_endpoints():
    assert masked_fraction(torch.tensor(0.0)) == pytest.approx(1.0)
    assert masked_fraction(torch.tensor(1.0)) == pytest.approx(0.0, abs=1e-7)
    assert masked_count(64, 0.0) == 64 and masked_count(64, 1.0) == 0
    counts = [masked_count(64, t / 8) for t in range(9)]
    assert counts == sorted(counts, reverse=True)  # decoding only ever unmasks
    assert masked_count(64, 0.5) == math.floor(64 * math.cos(math.pi / 4))


@pytest.mark.parametrize("schedule, mean", [("cosine", 2 / math.pi), ("linear", 0.5)])
def test_training_masks_follow_the_mask_schedule(schedule, mean):
    assert masked_fraction(torch.tensor(0.0), schedule) == pytest.approx(1.0)
    assert masked_fraction(torch.tensor(1.0), schedule) == pytest.approx(0.0, abs=1e-7)
    assert masked_fraction(torch.tensor(0.5), schedule) == pytest.approx(
        0.5 if schedule == "linear" else math.cos(math.pi / 4))
    cfg = PriorConfig(codebook_size=16, height=8, width=8, variant="maskgit", d_model=32,
                      layers=1, heads=4, dropout=0.0, mask_schedule=schedule)
    mask = build_prior(cfg).random_mask((20000, 64), torch.device("cpu"),
                                        torch.Generator().manual_seed(0))
    # the share of codes masked over many grids: E[ceil(64 f(r)) / 64], r ~ U(0, 1)
    assert float(mask.float().mean()) == pytest.approx(mean + 0.5 / 64, abs=0.01)
    with pytest.raises(ConfigError, match="mask_schedule must be one of"):
        PriorConfig(variant="maskgit", mask_schedule="uniform")
    saved_before = {k: v for k, v in to_dict(cfg).items() if k != "mask_schedule"}
    assert from_dict(PriorConfig, saved_before, "prior").mask_schedule == "cosine"


def test_the_loss_counts_only_masked_codes():
    prior = tiny()
    codes = torch.randint(0, 16, (64, 3, 4))
    nats, weights = prior.loss_terms(codes, generator=torch.Generator().manual_seed(0))
    assert nats.shape == weights.shape == (64, 12)
    assert torch.all(nats[weights == 0] == 0) and torch.all(nats[weights == 1] > 0)
    per_row = weights.sum(1)
    assert per_row.min() >= 1 and per_row.max() <= 12 and per_row.std() > 0  # r ~ U(0, 1)
    # the masked inputs are the mask token: the loss does not see the codes it predicts
    torch.manual_seed(1)
    mask = prior.random_mask((64, 12), codes.device, torch.Generator().manual_seed(0))
    assert torch.equal(mask.float(), weights)
    other = codes.flatten(1).masked_fill(mask, 0).view_as(codes)  # change only masked codes
    logits = prior(codes.flatten(1).masked_fill(mask, prior.mask_token))
    logits_other = prior(other.flatten(1).masked_fill(mask, prior.mask_token))
    assert torch.equal(logits, logits_other)


@pytest.mark.parametrize("steps", [1, 3, 12])
def test_decoding_fills_every_code_and_keeps_the_given_ones(steps):
    prior = tiny()
    start = torch.full((5, 12), prior.mask_token)
    start[:, :4] = torch.arange(4)  # the first row of each grid is given
    start[0] = torch.arange(12) % 16  # one grid fully given
    out = prior.fill(start.clone(), steps=steps, generator=torch.Generator().manual_seed(0))
    assert (out != prior.mask_token).all() and out.max() < 16
    assert torch.equal(out[:, :4], start[:, :4]) and torch.equal(out[0], start[0])


def test_generate_is_seeded_conditional_and_guided():
    prior = tiny(num_classes=3)
    draw = dict(steps=4, generator=None, batch_size=4)
    a = prior.generate(n=6, labels=1, **{**draw, "generator": torch.Generator().manual_seed(7)})
    b = prior.generate(n=6, labels=1, **{**draw, "generator": torch.Generator().manual_seed(7)})
    c = prior.generate(n=6, labels=1, **{**draw, "generator": torch.Generator().manual_seed(8)})
    assert a.shape == (6, 3, 4) and torch.equal(a, b) and not torch.equal(a, c)
    g = prior.generate(n=6, labels=torch.tensor([0, 1, 2, 0, 1, 2]), guidance=3.0, top_k=5,
                       temperature=0.5, steps=2, generator=torch.Generator().manual_seed(0))
    assert g.shape == (6, 3, 4) and g.max() < 16
    with pytest.raises(ValueError, match="guidance needs class labels"):
        prior.generate(n=2, guidance=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        tiny().generate(n=2, labels=1)


def test_the_ar_priors_are_untouched_by_the_variant_registry():
    ar = build_prior(default_prior(16, 3, 4)).eval()
    codes = torch.randint(0, 16, (2, 3, 4))
    nats, weights = ar.loss_terms(codes)
    assert type(ar).__name__ == "Prior" and weights is None and torch.equal(nats, ar.nll(codes))


def test_maskgit_on_the_seeds_blocks_is_bidirectional_and_round_trips(tmp_path):
    gpt = tiny()
    cfg = PriorConfig(codebook_size=16, height=3, width=4, variant="maskgit", d_model=32,
                      layers=2, heads=4, dropout=0.0, maskgit_blocks="seed")
    prior = build_prior(cfg).eval()
    assert isinstance(prior.stack, SeedStack) and not hasattr(prior.stack.blocks[0], "mlp")
    assert sum(p.numel() for p in prior.parameters()) < sum(p.numel() for p in gpt.parameters())
    tokens = torch.randint(0, 16, (2, 12))
    later = tokens.clone()
    later[:, -1] = (later[:, -1] + 1) % 16  # only the last code differs
    first, first_later = prior(tokens)[:, 0], prior(later)[:, 0]
    assert not torch.allclose(first, first_later)  # the first position sees the last one
    nats, weights = prior.loss_terms(tokens.view(2, 3, 4),
                                     generator=torch.Generator().manual_seed(0))
    assert nats.shape == weights.shape == (2, 12) and torch.all(nats[weights == 0] == 0)
    grids = prior.generate(n=3, steps=4, generator=torch.Generator().manual_seed(0))
    assert grids.shape == (3, 3, 4) and int(grids.max()) < 16
    write_checkpoint(tmp_path, 1, prior, PRIOR_KIND, to_dict(cfg))
    loaded = load_prior(tmp_path)
    assert loaded.cfg.maskgit_blocks == "seed" and torch.equal(loaded(tokens), prior(tokens))
    with pytest.raises(ConfigError, match="maskgit_blocks must be one of"):
        PriorConfig(variant="maskgit", maskgit_blocks="mlp")


def test_maskgit_through_the_cli(tmp_path, capsys):
    stage1 = tiny_stage1(eval_count=32, steps=10, every=10)
    autoregressive = tiny_prior(every=5, grid=2)
    prior = ["--variant", "maskgit", *autoregressive]
    assert main(["train", *stage1, "--out", str(tmp_path / "s")]) == 0
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train-prior", "--stage1", str(tmp_path / "s"), *prior, "--steps", "10",
                 "--out", str(a)]) == 0
    assert load_prior(a).cfg.variant == "maskgit"
    assert 0 < read_jsonl(a / "metrics.jsonl")[-1]["bits_per_code"] < 8
    assert main(["train-prior", "--stage1", str(tmp_path / "s"), *prior, "--steps", "5",
                 "--out", str(b)]) == 0
    assert main(["train-prior", "--stage1", str(tmp_path / "s"), *autoregressive, "--steps", "1",
                 "--every", "1", "--out", str(tmp_path / "ar")]) == 0
    assert main(["train-prior", "--resume", str(b), "--steps", "10"]) == 0
    wa, wb = load_prior(a).state_dict(), load_prior(b).state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)  # exact resume, masks too
    assert main(["sample", str(a), "--n", "5", "--steps", "3", "--out", str(tmp_path / "o")]) == 0
    codes = load_codes(tmp_path / "o" / "samples.safetensors").split("samples").codes
    assert codes.shape == (5, 2, 2) and int(codes.max()) < 16

    # Inpainting: the codes outside the (grown) mask are the image's own, the rest redrawn.
    digit = load_splits(DataConfig(size=8)).test.images[0]  # (1, 8, 8)
    Image.fromarray(digit[0].numpy()).save(tmp_path / "digit.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:4, :4] = 255  # the top-left code cell (codes are 2x2 cells of 4x4 pixels)
    Image.fromarray(mask).save(tmp_path / "mask.png")
    assert main(["inpaint", str(a), "--image", str(tmp_path / "digit.png"), "--mask",
                 str(tmp_path / "mask.png"), "--ring", "0", "--steps", "2"]) == 0
    with Image.open(tmp_path / "digit.inpainted.png") as result:
        assert result.size == (8, 8)
    assert (tmp_path / "digit.inpainted.compare.png").exists()
    done = inpaint(a, digit, torch.from_numpy(mask > 0), SampleConfig(steps=2), ring=0)
    own = load_autoencoder(tmp_path / "s").encode(to_float(digit[None])).indices[0]
    assert done.masked_codes.tolist() == [[True, False], [False, False]]
    assert torch.equal(done.codes[~done.masked_codes], own[~done.masked_codes])
    capsys.readouterr()
    assert main(["inpaint", str(tmp_path / "ar"), "--image", "x", "--mask", "y"]) == 2
    assert "needs a parallel-decoding prior" in capsys.readouterr().err


def test_code_mask_grows_by_the_ring():
    pixels = torch.zeros(16, 16, dtype=torch.bool)
    pixels[5, 6] = True  # one pixel in cell (1, 1) of 4x4 cells
    assert code_mask(pixels, 4, ring=0).nonzero().tolist() == [[1, 1]]
    assert code_mask(pixels, 4, ring=1).sum() == 9 and code_mask(pixels, 4, ring=1)[0, 0]


@pytest.mark.parametrize("choice, most_confident_first", [(0.0, True), (1e6, False)])
def test_the_choice_temperature_sets_the_unmasking_order(choice, most_confident_first):
    # Fixed logits: position i peaks on code i with margin i, so later positions are more
    # confident. Without noise the first iteration keeps the most confident codes; with a
    # huge choice temperature the order is the Gumbel noise's.
    prior = tiny()
    seen = []

    def fixed(tokens, labels=None):
        seen.append(tokens.clone())
        logits = torch.zeros(*tokens.shape, 16)
        logits[:, torch.arange(12), torch.arange(12)] = torch.arange(12).float()
        return logits

    prior.forward = fixed
    start = torch.full((1, 12), prior.mask_token)
    out = prior.fill(start, steps=2, generator=torch.Generator().manual_seed(0),
                     choice_temperature=choice)
    assert (out != prior.mask_token).all()
    kept = (seen[1][0] != prior.mask_token).nonzero().flatten().tolist()  # after iteration 1
    assert len(kept) == 12 - masked_count(12, 0.5)
    assert (kept == list(range(12 - len(kept), 12))) == most_confident_first
    with pytest.raises(ValueError, match="choice_temperature must be"):
        prior.generate(n=1, choice_temperature=-1.0)
    with pytest.raises(ValueError, match="choice_temperature must be"):
        SampleConfig(choice_temperature=float("nan"))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_guided_code_follows_uncond_plus_g_times_cond_minus_uncond_over_the_temperature(
        temperature):
    """A one-code grid decoded in one step: the code is drawn from softmax((u + g (c - u)) / T),
    c and u the logits of the masked grid with the class and with the null class, computed here
    by hand. A flipped guidance sign, or the temperature applied twice, draws from another."""
    prior, g, label, n = tiny(3, k=5, h=1, w=1), 3.0, 1, 4000
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # N(0, 0.5) weights: logits of a few units, not near-uniform ones
        for p in prior.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    prior.eval()
    masked = torch.full((1, 1), prior.mask_token)
    with torch.no_grad():
        cond = prior(masked, torch.tensor([label]))[0, 0]
        uncond = prior(masked, torch.tensor([prior.null_class]))[0, 0]
    codes = prior.generate(n=n, batch_size=n, labels=label, guidance=g, steps=1,
                           temperature=temperature,
                           generator=torch.Generator().manual_seed(1)).flatten()
    guided = uncond + g * (cond - uncond)
    probs = (guided / temperature).softmax(-1).double()
    wrongs = [((uncond - g * (cond - uncond)) / temperature).softmax(-1)]  # the sign flipped
    if temperature != 1.0:
        wrongs.append((guided / temperature ** 2).softmax(-1))  # the temperature twice
    freq = torch.bincount(codes, minlength=5).double() / n
    tol = 5 * (probs * (1 - probs) / n).sqrt() + 2e-3  # 5 binomial standard errors
    for wrong in wrongs:
        assert ((wrong.double() - probs).abs() > 2 * tol).any()  # the check can tell them apart
    assert ((freq - probs).abs() <= tol).all(), f"draws {freq.tolist()} != {probs.tolist()}"
