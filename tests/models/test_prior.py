import time
from dataclasses import replace

import pytest
import torch
from torch import nn

from vqvae.store import checkpoint as ckpt
from vqvae.config import (DEFAULT_PRIOR_TRAIN, LARGE_CODE_SET, SMALL_SET_LR, ConfigError,
                          PriorConfig, default_prior, prior_for_data, seed_prior, to_dict)
from vqvae.training.schedule import RunClock, learning_rate
from vqvae.models.prior import Prior
from vqvae.models.transformer import SeedBlock, filter_logits, sample_next


def tiny(variant="gpt", num_classes=0, h=3, w=4, k=7):
    return PriorConfig(codebook_size=k, height=h, width=w, num_classes=num_classes,
                       variant=variant, d_model=16, layers=2, heads=4, mlp_ratio=2, dropout=0.0)


VARIANTS = [("seed", 0), ("gpt", 0), ("gpt", 3), ("seed", 3)]


@pytest.mark.parametrize("variant,classes", VARIANTS)
def test_causality(variant, classes):
    """Changing a later token never changes earlier logits."""
    prior = Prior(tiny(variant, classes)).eval()
    codes = torch.randint(0, 7, (2, 3, 4))
    labels = torch.tensor([0, 2]) if classes else None
    inputs, _ = prior.inputs_and_targets(codes)
    base = prior(inputs, labels)
    assert base.shape == (2, 12, 7)
    for t in (1, 5, 11):
        changed = inputs.clone()
        changed[:, t] = (changed[:, t] + 1) % 7
        out = prior(changed, labels)
        assert torch.equal(out[:, :t], base[:, :t]), t
        assert not torch.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize("variant,classes", VARIANTS)
def test_cached_forward_matches_full_forward(variant, classes):
    prior = Prior(tiny(variant, classes)).eval()
    inputs, _ = prior.inputs_and_targets(torch.randint(0, 7, (3, 3, 4)))
    labels = torch.tensor([0, 1, 3]) if classes else None  # 3 = the null class
    full = prior(inputs, labels)
    cache = prior.new_cache(3)
    steps = [prior(inputs[:, :1], labels, cache)]
    steps += [prior(inputs[:, t:t + 1], labels, cache) for t in range(1, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="one token at a time"):
        cache = prior.new_cache(3)
        prior(inputs[:, :2], labels, cache)
        prior(inputs[:, 2:4], labels, cache)


@pytest.mark.parametrize("variant,classes", VARIANTS)
def test_static_decode_step_matches_full_forward(variant, classes):
    """The fixed-shape step (a CUDA graph's): one token at the cache's device-side position,
    attending to all slots with the unwritten ones masked, gives the full forward's logits."""
    prior = Prior(tiny(variant, classes)).eval()
    inputs, _ = prior.inputs_and_targets(torch.randint(0, 7, (3, 3, 4)))
    labels = torch.tensor([0, 1, 3]) if classes else None
    full = prior(inputs, labels)
    cache = prior.new_cache(3, static=True)
    extra = prior.cls(labels) if classes else None
    steps = [prior.decode_step(inputs[:, :1], cache, extra)]
    steps += [prior.decode_step(inputs[:, t:t + 1], cache) for t in range(1, 12)]
    assert int(cache.position) == 12
    torch.testing.assert_close(torch.stack(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_sampling(precision):
    """Forward passes under autocast, the cache in the autocast dtype; the same draw again gives
    the same grids, and the static step agrees with the dynamic one."""
    prior = Prior(tiny("gpt", 3))
    draw = lambda **kw: prior.generate(n=4, labels=1, guidance=2.0, precision=precision,  # noqa
                                       generator=torch.Generator().manual_seed(0), **kw)
    a = draw()
    assert a.shape == (4, 3, 4) and 0 <= a.min() and a.max() < 7
    assert torch.equal(a, draw()) and torch.equal(a, draw(graph=True))
    with pytest.raises(ValueError, match="precision"):
        prior.generate(n=4, precision="tf32")


@pytest.mark.cuda
@pytest.mark.parametrize("variant,classes", VARIANTS)
def test_cuda_graph_sampling_equals_eager(variant, classes):
    """On CUDA the static step is captured once and replayed: the same codes as the eager
    cached sampler (float64 logits, as the test above)."""
    prior = Prior(tiny(variant, classes)).double().cuda()
    extra = {"labels": torch.tensor([0, 1, 2, 1, 0]), "guidance": 2.0} if classes else {}
    a, b = (prior.generate(n=5, generator=torch.Generator().manual_seed(1), batch_size=3,
                           graph=graph, **extra) for graph in (False, True))
    assert torch.equal(a, b)


@pytest.mark.parametrize("variant,classes", VARIANTS)
@pytest.mark.parametrize("options", [{}, {"top_k": 3}, {"top_p": 0.8, "temperature": 1.5}])
def test_cached_sampling_equals_full_recomputation(variant, classes, options):
    """Same random stream -> exactly the same tokens (float64, so logits agree to ~1e-15)."""
    prior = Prior(tiny(variant, classes)).double()
    extra = {"labels": torch.tensor([0, 1, 2, 1, 0]), "guidance": 2.0} if classes else {}
    a = prior.generate(n=5, generator=torch.Generator().manual_seed(1), batch_size=3,
                       **options, **extra)
    b = prior.generate(n=5, generator=torch.Generator().manual_seed(1), batch_size=3,
                       no_cache=True, **options, **extra)
    d = prior.generate(n=5, generator=torch.Generator().manual_seed(1), batch_size=3,
                       graph=True, **options, **extra)  # the static cache's step
    assert a.shape == (5, 3, 4) and a.dtype == torch.long
    assert torch.equal(a, b) and torch.equal(a, d)
    assert 0 <= a.min() and a.max() < 7
    c = prior.generate(n=5, generator=torch.Generator().manual_seed(2), batch_size=3,
                       **options, **extra)
    assert not torch.equal(a, c)


def test_sampling_is_reproducible_and_restores_mode():
    prior = Prior(replace_dropout(tiny(), 0.3)).train()
    a = prior.generate(n=4, generator=torch.Generator().manual_seed(0))
    b = prior.generate(n=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and prior.training


def replace_dropout(cfg, p):
    from dataclasses import replace
    return replace(cfg, dropout=p)


def test_top_k_and_top_p_keep_exactly_the_right_candidates():
    probs = torch.tensor([[0.05, 0.5, 0.1, 0.2, 0.15]])
    logits = probs.log()
    kept = lambda out: set(torch.isfinite(out[0]).nonzero().flatten().tolist())  # noqa: E731
    assert kept(filter_logits(logits, top_k=1)) == {1}
    assert kept(filter_logits(logits, top_k=3)) == {1, 3, 4}
    assert kept(filter_logits(logits, top_k=5)) == {0, 1, 2, 3, 4}
    assert kept(filter_logits(logits, top_p=0.3)) == {1}  # the most probable code always stays
    assert kept(filter_logits(logits, top_p=0.6)) == {1, 3}
    assert kept(filter_logits(logits, top_p=0.75)) == {1, 3, 4}
    assert kept(filter_logits(logits, top_p=0.9)) == {1, 2, 3, 4}
    assert kept(filter_logits(logits, top_p=1.0)) == {0, 1, 2, 3, 4}
    assert kept(filter_logits(logits, top_k=2, top_p=0.75)) == {1, 3}  # renormalised over top-k
    # draws only ever land on kept candidates
    draws = sample_next(logits.expand(2000, 5), top_p=0.75,
                        generator=torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3, 4}
    # and follow the renormalised probabilities
    freq = torch.bincount(draws, minlength=5).double() / 2000
    assert freq[1] == pytest.approx(0.5 / 0.85, abs=0.04)


def test_temperature_to_zero_is_greedy():
    prior = Prior(tiny("seed"))
    greedy = prior.generate(n=4, temperature=0.0)
    assert torch.equal(greedy, prior.generate(n=4, temperature=0.0))
    cold = prior.generate(n=4, temperature=1e-6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cold, greedy)
    logits = torch.randn(6, 7)
    assert torch.equal(sample_next(logits, 0.0), logits.argmax(-1))


def test_seed_preset_structure():
    cfg = seed_prior(codebook_size=64, height=8, width=8)
    prior = Prior(cfg)
    assert prior.tok.weight.shape == (65, 256)  # Embedding(K + 1): codes and the start token
    assert prior.row.weight.shape == (8, 256) and prior.col.weight.shape == (8, 256)
    assert prior.head.weight.shape == (64, 256)
    assert isinstance(prior.stack.norm, nn.LayerNorm)  # right after the summed embeddings
    assert len(prior.stack.blocks) == 4
    for block in prior.stack.blocks:
        assert isinstance(block, SeedBlock)
        attn = block.attn
        assert attn.heads == 8 and cfg.d_model // attn.heads == 32
        assert all(p.bias is None for p in (attn.q, attn.k, attn.v))  # Keras Dense(use_bias=False)
        assert not hasattr(attn, "proj")  # no output projection
        assert block.dense.weight.shape == (256, 256) and block.dense.bias is not None
        assert isinstance(block.norm, nn.LayerNorm)
    assert not any(isinstance(m, nn.Dropout) for m in prior.modules())
    n_params = sum(p.numel() for p in prior.parameters())
    # 4 x (3 * 256^2 + 256^2 + 256 + 2 * 256) + embeddings + 2 * 256 + head
    expected = 4 * (4 * 256**2 + 3 * 256) + 65 * 256 + 16 * 256 + 2 * 256 + 64 * 257
    assert n_params == expected
    # positions: input p names row p // w, column p % w
    inputs, targets = prior.inputs_and_targets(torch.arange(64).view(1, 8, 8))
    assert inputs[0, 0] == 64 and torch.equal(inputs[0, 1:], torch.arange(63))
    assert torch.equal(targets[0], torch.arange(64))


def test_default_preset_is_gpt():
    prior = Prior(default_prior(64, 8, 8))
    assert prior.cfg.variant == "gpt"
    assert prior.row.weight.shape == (8, prior.cfg.d_model)


def test_default_prior_regularised_on_small_code_sets_only():
    model, train = default_prior(128, 4, 4), DEFAULT_PRIOR_TRAIN
    small = prior_for_data(model, train, train_grids=1617)  # the digits: 26k codes
    large = prior_for_data(replace(model, height=8, width=8), train, 60000)  # Fashion-MNIST
    assert small[0].dropout == 0.1 and small[1].token_dropout == 0.1
    assert small[1].lr == SMALL_SET_LR < train.lr
    assert large[0].dropout == 0.0 and large[1].token_dropout == 0.0
    assert large[1].lr == train.lr
    assert small[0].variant == "gpt" and large[0].variant == "seed"  # width and heads kept
    assert small[0].maskgit_blocks == "gpt" and large[0].maskgit_blocks == "seed"  # maskgit's
    assert (large[0].d_model, large[0].heads, large[0].layers) == (128, 8, 4)
    edge = LARGE_CODE_SET // 16
    assert prior_for_data(model, train, edge)[0].dropout == 0.0
    assert prior_for_data(model, train, edge - 1)[0].dropout == 0.1


def test_learning_rate_warmup_then_cosine_to_zero():
    assert learning_rate(0, 1.0, 4) == 0.25 and learning_rate(3, 1.0, 4) == 1.0
    assert learning_rate(10, 1.0, 4, "constant", 0.9) == 1.0
    assert learning_rate(4, 1.0, 4, "cosine", 0.0) == 1.0
    assert learning_rate(50, 1.0, 4, "cosine", 0.5) == pytest.approx(0.5)
    assert learning_rate(99, 1.0, 4, "cosine", 1.0) == pytest.approx(0.0)
    assert learning_rate(99, 1.0, 4, "cosine", 1.5) == pytest.approx(0.0)  # past the end
    assert learning_rate(1, 1.0, 4, "cosine", 0.9) == 0.5  # the warm-up comes first


def test_run_clock_progress_by_steps_or_by_the_time_budget(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    by_steps, by_time = RunClock(200, None), RunClock(10**9, 2.0)
    now[0] += 60.0  # half of the 2-minute budget
    assert by_time.progress(0) == 0.0  # the schedule reads the seconds of the last tick
    by_steps.tick()
    by_time.tick()
    assert by_steps.progress(50) == 0.25
    assert by_time.progress(50) == pytest.approx(0.5)
    assert by_time.remaining() == pytest.approx(60.0) and not by_time.out_of_time()
    by_time.tick(90.0)  # the seconds the ranks agreed on
    assert by_time.progress(50) == pytest.approx(0.75)
    now[0] += 600.0
    by_time.tick()
    assert by_time.progress(60) == 1.0 and by_time.out_of_time()
    # a resumed run: 90 of its 120 seconds spent before, so it goes on from there
    resumed = RunClock(10**9, 2.0, spent=90.0)
    assert resumed.progress(0) == pytest.approx(0.75)
    assert resumed.remaining() == pytest.approx(30.0)
    now[0] += 30.0
    assert resumed.out_of_time()


def test_save_load_identical_logits(tmp_path):
    cfg = tiny("gpt", 3)
    prior = Prior(cfg).eval()
    ckpt.write_checkpoint(tmp_path, 5, prior, ckpt.PRIOR_KIND, to_dict(cfg))
    loaded = ckpt.load_prior(tmp_path)
    assert loaded.cfg == cfg
    inputs, _ = prior.inputs_and_targets(torch.randint(0, 7, (2, 3, 4)))
    labels = torch.tensor([1, 3])
    assert torch.equal(loaded(inputs, labels), prior(inputs, labels))


def test_config_and_sampling_errors():
    with pytest.raises(ConfigError, match="multiple of heads"):
        PriorConfig(d_model=30, heads=4)
    with pytest.raises(ConfigError, match="variant"):
        PriorConfig(variant="lstm")
    conditional, plain = Prior(tiny("gpt", 3)), Prior(tiny())
    with pytest.raises(ValueError, match=r"class ids must be in \[0, 2\]"):
        conditional.generate(n=2, labels=3)
    with pytest.raises(ValueError, match="unconditional"):
        plain.generate(n=2, labels=0)
    with pytest.raises(ValueError, match="guidance needs"):
        conditional.generate(n=2, guidance=3.0)
    with pytest.raises(ValueError, match="top_p"):
        plain.generate(n=2, top_p=0.0)
    unguided = conditional.generate(n=2)  # a conditional prior samples unconditionally by default
    assert unguided.shape == (2, 3, 4)


def test_nll_is_per_code_cross_entropy():
    prior = Prior(tiny())
    codes = torch.randint(0, 7, (2, 3, 4))
    nll = prior.nll(codes)
    assert nll.shape == (2, 12) and (nll > 0).all()
    # an untrained prior is close to uniform over the 7 codes
    assert nll.mean().item() == pytest.approx(torch.log(torch.tensor(7.0)).item(), rel=0.1)


def test_token_dropout_corrupts_inputs_not_targets():
    from vqvae.models.prior import _corrupt

    tokens = torch.full((64, 50), 7)
    tokens[:, 0] = 99  # a start token
    out = _corrupt(tokens, 0.5, 16, torch.Generator().manual_seed(0), keep_first=True)
    assert torch.all(out[:, 0] == 99) and out[:, 1:].max() < 16
    changed = (out[:, 1:] != 7).float().mean().item()
    assert 0.4 < changed < 0.55  # p = 0.5, minus random codes that happen to be 7
    prior = Prior(default_prior(16, 2, 3)).eval()
    codes = torch.randint(0, 16, (8, 2, 3))
    clean, _ = prior.loss_terms(codes)
    noisy, _ = prior.loss_terms(codes, noise=0.9, generator=torch.Generator().manual_seed(0))
    assert torch.equal(clean, prior.nll(codes)) and not torch.equal(clean, noisy)
    assert torch.equal(clean[:, 0], noisy[:, 0])  # the first code is predicted from the start


# --- the sampled distribution itself, against softmax computed by hand ------------------------

DRAWS = 4000


def sharp(prior, seed=0):
    """``prior`` with N(0, 0.5) weights: logits of a few units, so that the distributions a
    planted sampling bug would give are far apart (GPT-2's init gives near-uniform ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in prior.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return prior.eval()


def assert_draws_follow(codes, probs, wrong):
    """The frequencies of ``codes`` match ``probs`` within 5 binomial standard errors, and
    ``wrong`` (what a planted bug would give) lies outside that band: the check can tell."""
    freq = torch.bincount(codes, minlength=probs.numel()).double() / codes.numel()
    probs, wrong = probs.double(), wrong.double()
    tol = 5 * (probs * (1 - probs) / codes.numel()).sqrt() + 2e-3
    assert ((wrong - probs).abs() > 2 * tol).any(), "the test cannot tell the bug apart"
    assert ((freq - probs).abs() <= tol).all(), f"draws {freq.tolist()} != {probs.tolist()}"


@pytest.mark.parametrize("variant", ["gpt", "seed"])
def test_guided_first_code_follows_uncond_plus_g_times_cond_minus_uncond(variant):
    """Classifier-free guidance draws the first code from softmax(u + g (c - u)), c and u the
    logits with the class and with the null class; a flipped sign (pushing away from the class)
    would draw from softmax(u - g (c - u))."""
    prior, g, label = sharp(Prior(tiny(variant, 3, h=1, w=2, k=5))), 3.0, 1
    start = torch.full((1, 1), prior.start_token)
    with torch.no_grad():
        cond = prior(start, torch.tensor([label]))[0, -1]
        uncond = prior(start, torch.tensor([prior.null_class]))[0, -1]
    codes = prior.generate(n=DRAWS, batch_size=DRAWS, labels=label, guidance=g,
                           generator=torch.Generator().manual_seed(1))[:, 0, 0]
    assert_draws_follow(codes, (uncond + g * (cond - uncond)).softmax(-1),
                        (uncond - g * (cond - uncond)).softmax(-1))


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_first_code_follows_softmax_of_logits_over_the_temperature(temperature):
    """At T != 1 the first code is drawn from softmax(logits / T), computed here by hand; the
    temperature applied twice would give softmax(logits / T^2)."""
    prior = sharp(Prior(tiny("gpt", h=1, w=2, k=5)), seed=2)
    with torch.no_grad():
        logits = prior(torch.full((1, 1), prior.start_token))[0, -1]
    codes = prior.generate(n=DRAWS, batch_size=DRAWS, temperature=temperature,
                           generator=torch.Generator().manual_seed(1))[:, 0, 0]
    assert_draws_follow(codes, (logits / temperature).softmax(-1),
                        (logits / temperature ** 2).softmax(-1))
