"""The next-scale (VAR) prior: its block-causal attention, exact teacher-forced likelihood, a KV
cache that changes nothing, and one pass per scale when sampling."""

import pytest
import torch

import vqvae
from vqvae import ConfigError
from vqvae.config import PriorConfig
from vqvae.models.prior import Prior, build_prior
from vqvae.models.quantizers.multiscale import split_scales
from vqvae.models.var import VARPrior, block_causal_mask, token_scales

SCALES = (1, 2, 3, 4)
L = 30


def var(num_classes: int = 0, **changes) -> VARPrior:
    cfg = PriorConfig(**{**dict(codebook_size=16, height=4, width=4, variant="var",
                                scales=SCALES, d_model=16, layers=2, heads=2, dropout=0.0,
                                num_classes=num_classes), **changes})
    return build_prior(cfg).eval()


def test_mask_brute_force_no_scale_sees_a_finer_one():
    mask = block_causal_mask(SCALES)
    level = [k for k, s in enumerate(SCALES) for _ in range(s * s)]
    assert mask.shape == (L, L)
    for i in range(L):
        for j in range(L):
            assert bool(mask[i, j]) == (level[j] <= level[i]), (i, j)
    assert token_scales(SCALES).tolist() == level


def test_logits_of_a_scale_depend_on_coarser_codes_only():
    """Brute force through the model: changing the codes of scale k and finer leaves the logits
    of scales 0..k unchanged (scale k's codes are predicted there, never seen), and changes
    those of scale k + 1 (which sees them)."""
    prior = var(num_classes=3)
    codes = torch.randint(0, 16, (2, L))
    labels = torch.tensor([0, 2])
    with torch.no_grad():
        base = prior(codes, labels)
        ends = torch.tensor([s * s for s in SCALES]).cumsum(0).tolist()
        for k in range(len(SCALES) - 1):
            changed = codes.clone()
            changed[:, ends[k] - SCALES[k] ** 2:] = torch.randint(0, 16, (2, L - ends[k]
                                                                         + SCALES[k] ** 2))
            out = prior(changed, labels)
            assert torch.allclose(out[:, :ends[k]], base[:, :ends[k]], atol=1e-5), k
            assert not torch.allclose(out[:, ends[k]:ends[k + 1]], base[:, ends[k]:ends[k + 1]])


def test_loss_is_the_exact_nll_and_counts_every_token():
    prior = var()
    codes = torch.randint(0, 16, (3, L))
    with torch.no_grad():
        nats, weights = prior.loss_terms(codes)
        logp = prior(codes).log_softmax(-1).gather(-1, codes[..., None])[..., 0]
    assert weights is None and nats.shape == (3, L)
    assert torch.allclose(nats, -logp, atol=1e-5)
    assert torch.allclose(prior.nll(codes), nats)


@pytest.mark.parametrize("knobs", [dict(temperature=1.0, top_k=5),
                                   dict(temperature=0.8, top_p=0.9, label=1, guidance=2.0)])
def test_cached_sampling_draws_what_the_uncached_one_does(knobs):
    prior = var(num_classes=3)
    cached = prior.generate(n=3, seed=4, **knobs)
    again = prior.generate(n=3, seed=4, no_cache=True, **knobs)
    assert cached.shape == (3, L) and cached.dtype == torch.long
    assert torch.equal(cached, again)


def test_greedy_sampling_is_the_teacher_forced_argmax():
    prior = var(num_classes=3)
    drawn = prior.generate(n=4, temperature=0.0, label=2)
    with torch.no_grad():
        logits = prior(drawn.clone(), torch.full((4,), 2))
    assert torch.equal(logits.argmax(-1), drawn)


def test_sampling_takes_one_pass_per_scale_and_batches():
    prior = var()
    calls = []
    hook = prior.stack.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[1]))
    codes = prior.generate(n=5, batch_size=2, temperature=1.0)
    hook.remove()
    assert codes.shape == (5, L) and int(codes.max()) < 16
    assert calls == [s * s for s in SCALES] * 3  # three batches (2, 2, 1), a pass per scale
    assert [tuple(m.shape) for m in split_scales(codes, SCALES)] == [(5, s, s) for s in SCALES]


def test_saved_prior_loads_as_its_own_class(tmp_path):
    prior = var(num_classes=3)
    folder = prior.save_pretrained(tmp_path / "p")
    for loaded in (Prior.from_pretrained(folder), vqvae.load_prior(folder)):
        assert type(loaded) is VARPrior and loaded.cfg == prior.cfg
        codes = torch.randint(0, 16, (2, L))
        with torch.no_grad():
            assert torch.equal(loaded.eval()(codes), prior(codes))


@pytest.mark.parametrize("changes, words", [
    (dict(scales=()), "needs rising scales"), (dict(scales=(1, 2, 3)), "must end at the 4x4"),
    (dict(variant="gpt"), "scales are the var prior's")])
def test_bad_configs_are_one_line_errors(changes, words):
    with pytest.raises(ConfigError, match=words) as e:
        var(**changes)
    assert "\n" not in str(e.value)
