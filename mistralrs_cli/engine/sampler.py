"""Sampling as small pure functions over numpy vectors, in mistral.rs's order:
penalties -> logit_bias -> grammar mask -> temperature -> top-k -> top-p -> min-p -> draw.

numpy, not torch: the engine serves the torch-free native runtime too, and one vocabulary-sized
vector per request per step is cheaper to handle without torch's per-op dispatch. Inputs may be
anything numpy can view as float32 (torch CPU tensors included).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..types import SamplingParams

_RNG = np.random.default_rng()  # requests without a seed
_BIG = np.finfo(np.float32).max


def new_generator(seed: int | None) -> np.random.Generator | None:
    """A request's own random stream: the same seed draws the same tokens."""
    return None if seed is None else np.random.default_rng(seed)


def _vec(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def apply_penalties(logits, history: Sequence[int], p: SamplingParams) -> np.ndarray:
    """Repetition (HF: divide positive logits, multiply negative), presence and frequency
    penalties over the last `repeat_last_n` tokens of the context."""
    logits = _vec(logits)
    rep = p.repetition_penalty
    if (rep is None or rep == 1.0) and not p.presence_penalty and not p.frequency_penalty:
        return logits
    window = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history
    if not window:
        return logits
    counts = Counter(t for t in window if 0 <= t < logits.size)  # never index from the end
    if not counts:
        return logits
    ids = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
    n = np.fromiter(counts.values(), dtype=np.float32, count=len(counts))
    sel = logits[ids]
    with np.errstate(all="ignore"):  # an extreme penalty overflows float32; softmax handles the infs
        if rep is not None and rep != 1.0:
            sel = np.where(sel > 0, sel / np.float32(rep), sel * np.float32(rep))
        sel = sel - np.float32(p.presence_penalty) - np.float32(p.frequency_penalty) * n
    out = logits.copy()
    out[ids] = sel
    return out


def apply_logit_bias(logits, bias: dict[int, float]) -> np.ndarray:
    """logits + bias; ids outside 0..vocab-1 are skipped (the request check refuses them: a
    negative id must never index from the end and bias the last token)."""
    logits = _vec(logits)
    if not bias:
        return logits
    out = logits.copy()
    for tok, b in bias.items():
        if 0 <= tok < out.size:
            out[tok] += np.float32(b)
    return out


def apply_mask(logits, allowed: np.ndarray | None) -> np.ndarray:
    """Tokens a grammar disallows (allowed[i] False, or past the mask's end) set to -inf."""
    logits = _vec(logits)
    if allowed is None:
        return logits
    n = min(allowed.size, logits.size)
    out = np.full(logits.shape, -np.inf, dtype=np.float32)
    np.copyto(out[:n], logits[:n], where=allowed[:n])
    return out


def filter_probs(probs, p: SamplingParams) -> np.ndarray:
    """top-k, then top-p (nucleus), then min-p over a probability vector; renormalized."""
    probs = _vec(probs)
    if p.top_k is not None and 0 < p.top_k < probs.size:
        kth = np.partition(probs, probs.size - p.top_k)[probs.size - p.top_k]  # the k-th largest
        probs = np.where(probs >= kth, probs, np.float32(0))
    if p.top_p is not None and p.top_p < 1.0:
        cand = np.flatnonzero(probs)  # after top-k only k of them: sort those, not the vocabulary
        order = cand[np.argsort(-probs[cand], kind="stable")]
        sorted_p = probs[order]
        cum = np.cumsum(sorted_p)
        keep = (cum - sorted_p) < p.top_p  # keep tokens until the mass before them reaches top_p
        keep[0] = True
        mask = np.zeros(probs.shape, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, np.float32(0))
    if p.min_p is not None and p.min_p > 0:
        probs = np.where(probs >= np.float32(p.min_p) * probs.max(), probs, np.float32(0))
    return probs / probs.sum()


def _finite(x: np.ndarray) -> np.ndarray:
    """x with NaN as the lowest and +-inf as the extreme float32 values: a tiny repetition penalty
    can push a logit past float32's range, and inf - inf would make every probability NaN."""
    if np.isfinite(x).all():
        return x
    big = np.finfo(np.float32).max
    return np.nan_to_num(x, nan=-big, posinf=big, neginf=-big)


def softmax(x: np.ndarray) -> np.ndarray:
    x = _finite(x)
    e = np.exp(x - x.max())
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def draw(probs: np.ndarray, generator: np.random.Generator | None = None) -> int:
    """One index with probability probs[i] (zeros are never drawn)."""
    cdf = np.cumsum(probs, dtype=np.float64)
    u = (generator or _RNG).random() * cdf[-1]
    return min(int(np.searchsorted(cdf, u, side="right")), probs.size - 1)


@dataclass
class Sampled:
    token: int
    logprob: float  # natural log of the token's probability under the model's distribution
    top: list[tuple[int, float]]  # top_logprobs (id, logprob)


def biased(logits, history: Sequence[int], p: SamplingParams, mask: np.ndarray | None = None) -> np.ndarray:
    """The logits after penalties, logit_bias and a grammar's mask (what greedy takes the argmax
    of); mask: the tokens the request's grammar allows (grammar/matcher.py), None without one."""
    return apply_mask(apply_logit_bias(apply_penalties(_vec(logits), history, p), p.logit_bias), mask)


def greedy_token(logits, history: Sequence[int], p: SamplingParams, mask: np.ndarray | None = None) -> int:
    x = biased(logits, history, p, mask)
    i = int(np.argmax(x))  # a NaN or +inf anywhere would be the argmax, so a finite maximum
    if -_BIG < x[i] < np.inf:  # means _finite would change no candidate: skip its vocabulary-wide scan
        return i
    return int(np.argmax(_finite(x)))


def distribution(logits, history: Sequence[int], p: SamplingParams, mask: np.ndarray | None = None) -> np.ndarray:
    """The probabilities a non-greedy request draws from: every transform applied (speculative
    decoding compares the target's and the draft's, engine/speculative.py)."""
    with np.errstate(all="ignore"):  # a huge temperature is float32 inf: all logits 0, uniform
        scaled = biased(logits, history, p, mask) / np.float32(p.temperature)
    return filter_probs(softmax(scaled), p)


def sample(logits, history: Sequence[int], p: SamplingParams,
           generator: np.random.Generator | None = None, mask: np.ndarray | None = None) -> Sampled:
    """logits (vocab,) float32 -> one token. Log-probabilities are the model's own (natural
    log-softmax of the raw logits, before penalties, bias, grammar and temperature), as OpenAI
    reports."""
    if p.greedy:
        token = greedy_token(logits, history, p, mask)
    else:
        token = draw(distribution(logits, history, p, mask), generator)
    return with_logprobs(logits, token, p)


def with_logprobs(logits, token: int, p: SamplingParams) -> Sampled:
    """`token` with its log-probability (and the top ones) under the raw logits, if asked."""
    raw = _vec(logits)
    logprob, top = 0.0, []
    if p.logprobs:
        lp = log_softmax(raw)
        logprob = float(lp[token])
        if p.top_logprobs > 0:
            k = min(p.top_logprobs, lp.size)
            ids = np.argpartition(-lp, k - 1)[:k]
            ids = ids[np.argsort(-lp[ids], kind="stable")]
            top = [(int(i), float(lp[i])) for i in ids]
    return Sampled(token, logprob, top)
