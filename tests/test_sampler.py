"""Sampling functions against hand computations on small vectors."""
from __future__ import annotations

import math

import torch

from mistralrs_cli.engine.sampler import apply_penalties, filter_probs, new_generator, sample
from mistralrs_cli.types import SamplingParams


def test_penalties_over_the_last_n_tokens_only():
    logits = torch.tensor([2.0, -1.0, 0.5, 3.0])
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25, repeat_last_n=3)
    out = apply_penalties(logits, [3, 3, 0, 1, 1], p)  # window: [0, 1, 1]; token 3 is too old
    want = [2.0 / 2 - 0.5 - 0.25 * 1, -1.0 * 2 - 0.5 - 0.25 * 2, 0.5, 3.0]
    assert torch.allclose(torch.from_numpy(out), torch.tensor(want))


def test_top_k_top_p_min_p():
    probs = torch.tensor([0.4, 0.3, 0.15, 0.1, 0.05])
    assert torch.allclose(torch.from_numpy(filter_probs(probs, SamplingParams(top_k=2))), torch.tensor([4 / 7, 3 / 7, 0, 0, 0]))
    # top_p 0.8: 0.4 and 0.3 reach 0.7 < 0.8, so 0.15 is kept too
    got = torch.from_numpy(filter_probs(probs, SamplingParams(top_p=0.8)))
    assert torch.allclose(got, torch.tensor([0.4, 0.3, 0.15, 0, 0]) / 0.85)
    # min_p 0.3: tokens below 0.3 * 0.4 = 0.12 go
    got = torch.from_numpy(filter_probs(probs, SamplingParams(min_p=0.3)))
    assert torch.allclose(got, torch.tensor([0.4, 0.3, 0.15, 0, 0]) / 0.85)


def test_logit_bias_moves_the_greedy_choice():
    logits = torch.tensor([1.0, 5.0, 2.0])
    assert sample(logits, [], SamplingParams()).token == 1
    assert sample(logits, [], SamplingParams(logit_bias={2: 10.0})).token == 2
    assert sample(logits, [], SamplingParams(logit_bias={1: -100.0})).token == 2


def test_seeded_draws_reproduce_and_differ_by_seed():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.5)

    def draws(seed):
        g = new_generator(seed)
        return [sample(logits, [], p, g).token for _ in range(30)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_logprobs_are_the_models_natural_log_softmax():
    logits = torch.tensor([0.5, 2.0, -1.0, 1.0])
    s = sample(logits, [1], SamplingParams(logprobs=True, top_logprobs=2, repetition_penalty=3.0))
    z = sum(math.exp(x) for x in logits.tolist())
    want = {i: x - math.log(z) for i, x in enumerate(logits.tolist())}
    assert s.token == 3  # the penalty (2.0 / 3 < 1.0) changes the choice, not the reported logprobs
    assert abs(s.logprob - want[s.token]) < 1e-6
    assert [t for t, _ in s.top] == [1, 3]
    assert all(abs(lp - want[t]) < 1e-6 and lp <= 0 for t, lp in s.top)


def test_draws_follow_the_filtered_distribution():
    """temperature 2, top-k 3 over [3, 2, 1, 0] logits: by hand, p = softmax([1.5, 1, 0.5]) on the
    first three tokens, never the fourth; 20000 seeded draws land within 1.5% of it."""
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    e = [math.exp(x / 2.0) for x in (3.0, 2.0, 1.0)]
    want = [x / sum(e) for x in e] + [0.0]
    g = new_generator(3)
    p = SamplingParams(temperature=2.0, top_k=3)
    counts = [0] * 4
    for _ in range(20000):
        counts[sample(logits, [], p, g).token] += 1
    assert counts[3] == 0
    assert all(abs(c / 20000 - w) < 0.015 for c, w in zip(counts, want))
