"""The speculative cost policy (engine/spec_costs.py): how many draft tokens a step carries.

- Costs interpolates measured (rows, seconds) points linearly and extends the last slope; a
  point above a later one (a busy moment) is lowered to it.
- best_gamma against hand-computed expected tokens per second, with forward costs measured here
  for SmolLM2-135M (native F32 target, its Q4_1 file as the draft: ms at 1, 2, 4, 8 rows): at
  batch 1 with 96% acceptance every draft token up to 5 pays; at batch 8 none does (the step
  already fills the cores); free drafts (n-gram) pay whenever the target's cost is flat. Two
  sets: 2 threads before the kernels' weight prefetch (git 89afee1), where batch 2 drafts
  nothing, and one thread's CPU time after it (the 6-row verify nearer a decode's cost), where
  batch 2 drafts 5 and batch 8 still nothing.
- In the engine: costs that make drafting a loss keep every step plain (and the text is the
  target's); costs that make it pay draft every step.
"""
from __future__ import annotations

import pytest

from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.engine.spec_costs import Costs, best_gamma, expected_tokens
from mistralrs_cli.loaders.load import load
from mistralrs_cli.types import GGUFSpec, SamplingParams, SpeculativeSpec

from test_speculative import OPTS, files  # noqa: F401  (the tiny target and drafts)

TARGET = Costs({1: 18.4, 2: 21.2, 4: 27.5, 8: 38.6})  # ms
DRAFT = Costs({1: 9.2, 2: 11.6, 4: 20.8, 8: 37.7})


def test_costs_interpolate_and_extend_the_last_slope():
    c = Costs({1: 1.0, 2: 1.2, 4: 1.6, 8: 2.4})
    assert c(0) == 1.0 and c(1) == 1.0 and c(3) == pytest.approx(1.4) and c(6) == pytest.approx(2.0)
    assert c(16) == pytest.approx(2.4 + 0.2 * 8)
    # a busy moment at 1 row (above the 2-row time) is lowered to the later point
    assert Costs({1: 3.0, 2: 1.2, 4: 1.6}).points == [(1, 1.2), (2, 1.2), (4, 1.6)]


def test_expected_tokens():
    assert expected_tokens(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    assert expected_tokens(1.0, 4) == 5.0 and expected_tokens(0.0, 3) == 1.0


def test_batch_1_drafts_up_to_5():
    """Tokens per ms by hand (first draft pass 2 rows: the draft cache catches up):
    plain 1/18.4 = .0543; g=1 1.96/(11.6+21.2) = .0598; g=3 3.766/(11.6+2*9.2+27.5) = .0655;
    g=5 5.431/(11.6+4*9.2+33.05) = .0667, the best."""
    assert best_gamma(TARGET, DRAFT, 1, [0.96], [5]) == 5
    assert best_gamma(TARGET, DRAFT, 1, [0.96], [3]) == 3
    # a draft right 30% of the time: g=1 1.3/32.8 = .0396 < plain .0543
    assert best_gamma(TARGET, DRAFT, 1, [0.3], [5]) == 0


def test_batch_8_drafts_nothing():
    """8 sequences: plain 8/38.6 = .207 tokens/ms; g=1 costs a draft pass of 16 rows (37.7 +
    16.9 * 8 / 4 extended = 71.5) and a target forward of 16 rows (38.6 + 2.775 * 8 = 60.8): even
    every draft passing gives 16/132.3 = .121."""
    assert best_gamma(TARGET, DRAFT, 8, [1.0] * 8, [5] * 8) == 0
    # 2 sequences: plain 2/21.2 = .0943; the best draft, g=5, 10.86/(20.8+4*11.6+49.7) = .0929
    assert best_gamma(TARGET, DRAFT, 2, [0.96] * 2, [5] * 2) == 0


# one thread, CPU ms (medians of 9 on 2 shared cores, load ~5), after floatmm/packed's prefetch
TARGET_PF = Costs({1: 47.4, 2: 47.4, 4: 51.8, 8: 65.7})
DRAFT_PF = Costs({1: 10.4, 2: 11.2, 4: 15.1, 8: 26.5})


def test_prefetch_costs_batch_1_and_2_draft_5_batch_8_none():
    """E(.96, g) = (1 - .96^(g+1)) / .04: E4 = 4.6157, E5 = 5.4311. Slopes past 8 rows: target
    (65.7 - 51.8) / 4 = 3.475 ms/row, draft (26.5 - 15.1) / 4 = 2.85 (16 rows: 49.3).
    batch 1: plain 1/47.4 = .0211; g=5 5.4311/(58.75 + 11.2 + 4*10.4) = .0487.
    batch 2: plain 2/47.4 = .0422; g=5 10.862/(79.6 + 15.1 + 4*11.2) = .0779.
    batch 8: plain 8/65.7 = .12177; g=4 36.93/(176.9 + 49.3 + 3*26.5) = .12079, g=5
    43.45/(204.7 + 49.3 + 4*26.5) = .12069 (g=1..3 less): none pays at 96%; with every draft
    passing g=5 (48/360 = .1333) would."""
    assert best_gamma(TARGET_PF, DRAFT_PF, 1, [0.96], [5]) == 5
    assert best_gamma(TARGET_PF, DRAFT_PF, 2, [0.96] * 2, [5] * 2) == 5
    assert best_gamma(TARGET_PF, DRAFT_PF, 8, [0.96] * 8, [5] * 8) == 0
    assert best_gamma(TARGET_PF, DRAFT_PF, 8, [1.0] * 8, [5] * 8) == 5


def test_a_retry_pays_for_catching_the_draft_up():
    """Costs measured on 2 threads with the machine nearly quiet (wall ms, after the prefetch), so
    flat that at batch 8 drafts that all pass would just pay with caches one run behind: g=5
    costs target(48) = 31.1 + 2.45 * 40 = 129.1, draft(16) = 9.8 + .95 * 8 = 17.4 and 4 * 9.8:
    48/185.7 = .2585 > 8/31.1 = .2572. Caches 40 tokens behind each (drafting was off) make the
    first pass 320 rows, draft(320) = 306.2: 48/474.5 = .101, no. At batch 1, 9 rows behind:
    draft(9) = 10.75, g=5 6/(26.2 + 10.75 + 4 * 3.6) = .117 > 1/24.4 = .041."""
    target = Costs({1: 24.4, 2: 24.4, 4: 25.5, 6: 26.2, 8: 31.1})
    draft = Costs({1: 3.6, 2: 4.6, 4: 5.8, 6: 7.9, 8: 9.8})
    assert best_gamma(target, draft, 8, [1.0] * 8, [5] * 8) == 5
    assert best_gamma(target, draft, 8, [1.0] * 8, [5] * 8, first=320) == 0
    assert best_gamma(target, draft, 1, [1.0], [5], first=9) == 5


def test_free_drafts_pay_on_a_flat_target():
    flat = Costs({1: 10.0, 8: 10.5})
    assert best_gamma(flat, None, 1, [0.5], [4]) == 4
    assert best_gamma(flat, None, 8, [0.5] * 8, [4] * 8) > 0


def _engine(files, costs):  # noqa: F811
    loaded = load(SpeculativeSpec(GGUFSpec(str(files["target"])), GGUFSpec(str(files["self"])), 4), OPTS)
    engine = Engine(loaded)
    engine.spec.costs = costs
    return engine


@pytest.mark.parametrize("pays", [False, True])
def test_the_engine_follows_the_costs(files, pays):  # noqa: F811
    target = Costs({1: 1.0, 8: 1.1})
    engine = _engine(files, (target, Costs({1: 0.01 if pays else 5.0})))
    prompt = files["tok"].encode("the quick brown fox").ids
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    req = engine.add_request(prompt, params)
    while engine.has_unfinished():
        engine.step()
    plain = Engine(load(GGUFSpec(str(files["target"])), OPTS))
    ref = plain.add_request(prompt, params)
    while plain.has_unfinished():
        plain.step()
    assert req.output_ids == ref.output_ids
    assert (engine.spec.proposed > 0) == pays
