"""Speculative decoding is exact in distribution (engine/speculative.py's rejection sampling):
with temperature 1 (and again with top-k/top-p), the first 3 generated tokens over 2000 seeds
match the target's own sampling (chi-square, p > 0.01) for a draft that disagrees often, and
mistral.rs's argmax-match rule fails the same test. The pair and helpers: test_speculative.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.engine.sampler import distribution, draw
from mistralrs_cli.engine.speculative import Speculator
from mistralrs_cli.loaders.load import load
from mistralrs_cli.types import EngineConfig, GGUFSpec, SamplingParams, SpeculativeSpec

from test_speculative import OPTS, TEXTS, files, noisy_copy  # noqa: F401  (files: the tiny pair's fixture)

N_SEEDS = 2000


def peaked(model: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Sharper next-token distributions (a few likely tokens), so a biased rule shows in 2000 draws."""
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def chi2_p(a: list, b: list, min_count: int = 10) -> float:
    """Two-sample chi-square test of homogeneity; categories rarer than min_count in both samples
    together are pooled. p from the regularized upper incomplete gamma (chi2's survival)."""
    cats = sorted(set(a) | set(b), key=str)
    ca = np.array([a.count(c) for c in cats], dtype=np.float64)
    cb = np.array([b.count(c) for c in cats], dtype=np.float64)
    rare = ca + cb < min_count
    ca = np.append(ca[~rare], ca[rare].sum())
    cb = np.append(cb[~rare], cb[rare].sum())
    keep = ca + cb > 0
    obs = np.stack([ca[keep], cb[keep]])
    exp = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / obs.sum()
    stat, dof = float(((obs - exp) ** 2 / exp).sum()), obs.shape[1] - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


@pytest.fixture(scope="module")
def sharp(tmp_path_factory, files):  # noqa: F811
    d = tmp_path_factory.mktemp("sharp")
    vocab = gb.gguf_vocab(files["tok"])
    t = gb.write_gguf(d / "t.gguf", peaked(gb.tiny_llama(0), 3.0), vocab, qtype=Q.Q8_0)
    dr = gb.write_gguf(d / "d.gguf", peaked(noisy_copy(gb.tiny_llama(0), 0.04, 2), 3.0), vocab, qtype=Q.Q8_0)
    return t, dr


def _samples(loaded, prompt, params, seeds) -> tuple[list[tuple], Engine]:
    import dataclasses

    engine = Engine(loaded, EngineConfig(max_seqs=512, prefix_cache_n=0))
    reqs = [engine.add_request(prompt, dataclasses.replace(params, seed=s)) for s in seeds]
    while engine.has_unfinished():
        engine.step()
    return [tuple(r.output_ids) for r in reqs], engine


_ALONE: dict = {}


def _p_values(sharp, files, filters) -> tuple[list[float], float]:
    """p of each of the first 3 tokens and of the three together: the target alone (2000 seeds)
    vs speculation with a draft that disagrees often (2000 other seeds; the first token comes from
    the prefill, the second and third are a draft token and the bonus or a resampled token)."""
    t, dr = sharp
    prompt = files["tok"].encode(TEXTS[0]).ids
    params = SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True, **filters)
    key = (str(t), tuple(sorted(filters.items())))
    if key not in _ALONE:  # the same for the right and the wrong rule
        _ALONE[key] = _samples(load(GGUFSpec(str(t)), OPTS), prompt, params, range(N_SEEDS))[0]
    alone = _ALONE[key]
    spec_loaded = load(SpeculativeSpec(GGUFSpec(str(t)), GGUFSpec(str(dr)), 2, gamma_fixed=True), OPTS)
    spec, engine = _samples(spec_loaded, prompt, params, range(10**6, 10**6 + N_SEEDS))
    ps = [chi2_p([s[i] for s in alone], [s[i] for s in spec]) for i in range(3)]
    return ps + [chi2_p(alone, spec)], engine.spec.acceptance_rate


FILTERS = [{}, {"top_k": 8, "top_p": 0.9}]


@pytest.mark.parametrize("filters", FILTERS)
def test_distribution_matches_target(sharp, files, filters):  # noqa: F811
    ps, rate = _p_values(sharp, files, filters)
    assert 0.05 < rate < 0.9, rate  # the draft disagrees often
    assert min(ps) > 0.01, ps


def wrong_verdict(logits, hist, p, tok, q, gen, mask=None):
    """mistral.rs's rule: keep a draft token only when it is the target's argmax, else sample p."""
    probs = distribution(logits, hist, p)
    return None if tok == int(np.argmax(probs)) else draw(probs, gen)


@pytest.mark.parametrize("filters", FILTERS)
def test_wrong_rule_fails_the_same_test(sharp, files, filters, monkeypatch):  # noqa: F811
    monkeypatch.setattr(Speculator, "verdict", staticmethod(wrong_verdict))
    ps, _ = _p_values(sharp, files, filters)
    assert min(ps) < 0.01, ps
