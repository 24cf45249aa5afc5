"""Sampling as small pure functions, in mistral.rs's order:
penalties -> logit_bias -> temperature -> top-k -> top-p -> min-p -> draw.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import torch

from ..types import SamplingParams


def apply_penalties(logits: torch.Tensor, history: Sequence[int], p: SamplingParams) -> torch.Tensor:
    """Repetition (HF: divide positive logits, multiply negative), presence and frequency
    penalties over the last `repeat_last_n` tokens of the context."""
    rep = p.repetition_penalty
    if (rep is None or rep == 1.0) and not p.presence_penalty and not p.frequency_penalty:
        return logits
    window = history[-p.repeat_last_n:] if p.repeat_last_n > 0 else history
    if not window:
        return logits
    counts = Counter(window)
    ids = torch.tensor(list(counts), dtype=torch.long)
    n = torch.tensor(list(counts.values()), dtype=logits.dtype)
    sel = logits[ids]
    if rep is not None and rep != 1.0:
        sel = torch.where(sel > 0, sel / rep, sel * rep)
    sel = sel - p.presence_penalty - p.frequency_penalty * n
    out = logits.clone()
    out[ids] = sel
    return out


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float]) -> torch.Tensor:
    if not bias:
        return logits
    out = logits.clone()
    for tok, b in bias.items():
        out[tok] += b
    return out


def filter_probs(probs: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """top-k, then top-p (nucleus), then min-p over a probability vector; renormalized."""
    if p.top_k is not None and 0 < p.top_k < probs.numel():
        kth = torch.topk(probs, p.top_k).values[-1]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
    if p.top_p is not None and p.top_p < 1.0:
        sorted_p, idx = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, 0)
        keep = (cum - sorted_p) < p.top_p  # keep tokens until the mass before them reaches top_p
        keep[0] = True
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[idx[keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
    if p.min_p is not None and p.min_p > 0:
        probs = torch.where(probs >= p.min_p * probs.max(), probs, torch.zeros_like(probs))
    return probs / probs.sum()


@dataclass
class Sampled:
    token: int
    logprob: float  # natural log of the token's probability under the model's distribution
    top: list[tuple[int, float]]  # top_logprobs (id, logprob)


def sample(logits: torch.Tensor, history: Sequence[int], p: SamplingParams,
           generator: torch.Generator | None = None) -> Sampled:
    """logits (vocab,) float32 -> one token. Log-probabilities are the model's own (natural
    log-softmax of the raw logits, before penalties, bias and temperature), as OpenAI reports."""
    raw = logits
    logits = apply_logit_bias(apply_penalties(logits, history, p), p.logit_bias)
    if p.greedy:
        token = int(torch.argmax(logits))
    else:
        probs = filter_probs(torch.softmax(logits / p.temperature, dim=-1), p)
        token = int(torch.multinomial(probs, 1, generator=generator))
    logprob, top = 0.0, []
    if p.logprobs:
        lp = torch.log_softmax(raw, dim=-1)
        logprob = float(lp[token])
        if p.top_logprobs:
            vals, ids = torch.topk(lp, p.top_logprobs)
            top = list(zip(ids.tolist(), vals.tolist()))
    return Sampled(token, logprob, top)
