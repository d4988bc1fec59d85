"""The prior as an entropy coder, on code grids: exact round trips for both prior kinds and a
class-conditional prior across batch sizes, and a coded size at the prior's cross-entropy."""

import math

import pytest
import torch

from vqvae import PriorConfig, SampleConfig, build_prior
from vqvae.codec.coder import decode_grids, encode_grids
from vqvae.codec.probabilities import reveal_counts

N = 1000


def peaked_prior(variant: str, classes: int = 0) -> torch.nn.Module:
    """A random-init tiny prior whose head is scaled up so its distributions are far from
    uniform (a coder that ignored them would miss the cross-entropy by far)."""
    prior = build_prior(PriorConfig(codebook_size=32, height=4, width=4, variant=variant,
                                    d_model=16, layers=1, heads=2, num_classes=classes,
                                    dropout=0.0))
    with torch.no_grad():
        prior.head.weight.normal_(0.0, 1.0)
    return prior.eval()


def grids_of(prior: torch.nn.Module, n: int = N,
             noisy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n grids: drawn from the prior, half of them replaced by uniformly random ones if
    ``noisy``; labels for a conditional prior."""
    classes = prior.cfg.num_classes
    labels = torch.randint(0, classes, (n,)) if classes else None
    drawn = n // 2 if noisy else n
    drawn = prior.generate(SampleConfig(n=drawn, batch_size=drawn, steps=4),
                           labels=None if labels is None else labels[:drawn])
    noise = torch.randint(0, prior.cfg.codebook_size, (n - drawn.shape[0], 4, 4))
    return torch.cat([drawn, noise]), labels


@pytest.mark.parametrize("variant,classes", [("gpt", 0), ("maskgit", 0), ("gpt", 3),
                                             ("maskgit", 3)])
def test_round_trips_are_exact_across_batch_sizes(variant, classes):
    prior = peaked_prior(variant, classes)
    grids, labels = grids_of(prior)
    for batch, n in ((64, N), (7, N), (1, 60)):  # batches of 1 on fewer grids (one pass each)
        part = None if labels is None else labels[:n]
        coded = encode_grids(prior, grids[:n], part, batch, steps=4)
        assert len(coded.streams) == math.ceil(n / batch)
        decoded, got = decode_grids(prior, coded.streams, n, labels is not None, batch, steps=4)
        assert torch.equal(decoded, grids[:n])
        assert (got is None) == (labels is None) and (got is None or torch.equal(got, part))


def test_decoding_with_other_steps_or_labels_does_not_give_the_grids():
    prior = peaked_prior("maskgit", 3)
    grids, labels = grids_of(prior, 64)
    coded = encode_grids(prior, grids, labels, 64, steps=4)
    assert not torch.equal(decode_grids(prior, coded.streams, 64, True, 64, steps=5)[0], grids)
    unlabelled = encode_grids(prior, grids, None, 64, steps=4)
    assert unlabelled.streams != coded.streams  # the labels condition the codes and are coded


def reference_bits(prior: torch.nn.Module, grids: torch.Tensor, labels: torch.Tensor | None,
                   steps: int) -> float:
    """The prior's cross-entropy of the grids in bits, computed apart from the coder: teacher
    forcing for the autoregressive prior; for maskgit, grid by grid, each step revealing the
    schedule's count of most confident codes."""
    with torch.no_grad():
        if prior.cfg.variant != "maskgit":
            return float(prior.nll(grids, labels).sum()) / math.log(2)
        total = 0.0
        for i, grid in enumerate(grids.flatten(1)):
            label = None if labels is None else labels[i:i + 1]
            known = torch.full_like(grid, prior.mask_token)
            for count in reveal_counts(grid.numel(), steps):
                p = prior(known[None], label)[0].double().softmax(-1)  # (N, K)
                confidence = p.max(-1).values.masked_fill(known != prior.mask_token, -1)
                chosen = confidence.argsort(descending=True, stable=True)[:count]
                total -= float(p[chosen, grid[chosen]].log2().sum())
                known[chosen] = grid[chosen]
        return total


@pytest.mark.parametrize("variant,classes", [("gpt", 3), ("maskgit", 0)])
def test_the_coded_size_is_the_cross_entropy(variant, classes):
    prior = peaked_prior(variant, classes)
    grids, labels = grids_of(prior, 400, noisy=False)
    bits = reference_bits(prior, grids, labels, steps=4) + (400 * math.log2(classes)
                                                            if classes else 0)
    assert bits < 0.8 * 400 * 16 * 5  # the distributions are far from uniform (5 bits a code)
    coded = encode_grids(prior, grids, labels, 400, steps=4)  # one stream
    size = len(coded.streams[0])
    assert bits / 8 <= size <= 1.01 * bits / 8 + 8, (size, bits / 8)  # + the last 32-bit words
    assert coded.bits.sum() == pytest.approx(bits - (400 * math.log2(classes) if classes else 0),
                                             rel=1e-6)


def test_bad_labels_and_grids_are_refused():
    from vqvae.errors import DataError
    prior = peaked_prior("gpt", 3)
    grids = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(DataError, match="outside"):
        encode_grids(prior, grids, torch.tensor([0, 3]))
    with pytest.raises(DataError, match="unconditional"):
        encode_grids(peaked_prior("gpt"), grids, torch.tensor([0, 1]))
    with pytest.raises(DataError, match="codes outside"):
        encode_grids(prior, grids + 32)
    with pytest.raises(DataError, match="grids of"):
        encode_grids(prior, torch.zeros(2, 3, 4, dtype=torch.long))
