"""swarm.sampling: logit bias, penalties, temperature, top-k, top-p, greedy, seeded sampling, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from swarm.sampling import (
    SamplingParams,
    adjust_logits,
    apply_logit_bias,
    apply_penalties,
    apply_top_k,
    apply_top_p,
    count_tokens,
    sample,
    token_logprobs,
)


def test_logit_bias_adds_per_token_and_is_pure():
    logits = torch.zeros(2, 5)
    out = apply_logit_bias(logits, {1: 2.0, 4: -100.0})
    assert out[:, 1].tolist() == [2.0, 2.0] and out[:, 4].tolist() == [-100.0, -100.0]
    assert logits.abs().sum() == 0


def test_penalties_follow_openai_formula():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0, 1, 3, 0]])
    out = apply_penalties(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_count_tokens():
    counts = torch.zeros(2, 4, dtype=torch.int32)
    count_tokens(counts, torch.tensor([1, 3]))
    count_tokens(counts, torch.tensor([1, 0]))
    assert counts.tolist() == [[0, 2, 0, 0], [1, 0, 0, 1]]


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0]])
    assert torch.isinf(apply_top_k(logits, 2)).tolist() == [[False, False, True, True]]
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    kept = ~torch.isinf(apply_top_p(probs.log(), 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    # The most likely token always survives, whatever p.
    assert (~torch.isinf(apply_top_p(probs.log(), 0.01))).tolist() == [[True, False, False, False]]


def test_greedy_is_argmax():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingParams(temperature=0.0)), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    params = SamplingParams(temperature=1.0)
    a = sample(logits, params, torch.Generator().manual_seed(5))
    b = sample(logits, params, torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    freq = torch.bincount(a, minlength=3).float() / len(a)
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    top1 = sample(logits, SamplingParams(top_k=1), torch.Generator().manual_seed(1))
    assert (top1 == 0).all()


def test_low_temperature_concentrates():
    logits = torch.tensor([[1.0, 0.0]]).repeat(1000, 1)
    picks = sample(logits, SamplingParams(temperature=0.05), torch.Generator().manual_seed(0))
    assert (picks == 0).float().mean() > 0.99


def test_token_logprobs_come_from_adjusted_scores():
    logits = torch.zeros(1, 4)
    scores = adjust_logits(logits, SamplingParams(logit_bias={2: math.log(3.0)}))
    lp = token_logprobs(scores, torch.tensor([2]), top_k=2)
    assert lp.chosen.item() == pytest.approx(math.log(3 / 6))
    assert lp.top_ids[0, 0].item() == 2 and lp.top_values.shape == (1, 2)
    none = token_logprobs(scores, torch.tensor([0]), top_k=0)
    assert none.top_ids.shape == (1, 0)


def test_temperature_zero_is_rejected_outside_greedy():
    from swarm.sampling import apply_temperature

    with pytest.raises(ValueError):
        apply_temperature(torch.zeros(1, 2), 0.0)


def test_top_p_prefix_widens_when_the_mass_is_spread():
    # Flat distribution: 1024 candidates hold ~2% of the mass, so the nucleus needs a wider prefix.
    logits = torch.zeros(2, 49152)
    kept = (~torch.isinf(apply_top_p(logits, 0.5))).sum(-1)
    assert kept.tolist() == [24576, 24576]


def test_sampling_never_picks_masked_tokens():
    logits = torch.full((1000, 6), float("-inf"))
    logits[:, 2] = 0.0
    logits[:, 4] = 0.0
    picks = sample(logits, SamplingParams(temperature=1.0), torch.Generator().manual_seed(3))
    assert set(picks.tolist()) == {2, 4}
