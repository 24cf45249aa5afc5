"""How many draft tokens a speculative step should carry: the gamma that maximises the expected
tokens per second of the whole step, from measured forward costs and acceptance rates.

Speculation pays when a forward's cost grows slowly with its rows (a CPU decode step streams
every weight once whatever the rows: a verify chunk of 6 costs little more than 1 token) and the
draft is cheap beside the target. When the step already carries many decode rows (batching has
filled the cores) the verify rows cost nearly full price and the draft's own batched passes too,
so the same draft that doubles batch 1 slows batch 8 down: the policy turns it down there.

Costs are measured once per model, at the first step that might speculate: the best of 3 timed
forwards at 1, 2, 4, 6 and 8 rows (6: the verify of the default gamma 5, where a kernel's cost
may step rather than run straight from 4 to 8 rows; a throw-away cache; every row asks for
logits, as a verify does; on a shared machine a point above a later one is lowered to it),
interpolated linearly between those row counts and extended by the last slope.

For a step with `rows` rows already and sequences s (acceptance estimate a_s, cap c_s), a
common gamma g costs draft passes i = 1..g (pass i batches the sequences with min(g, c_s) >= i;
the first also catches each draft cache up: ~2 rows a sequence, or the rows it is behind) plus
the target's forward of rows + sum min(g, c_s) rows, and yields sum E(a_s, min(g, c_s))
tokens, where E(a, g) = (1 - a^(g+1)) / (1 - a) is the expected run (accepted drafts plus the
target's own token) when each draft token passes with probability a. g = 0 is plain decoding.
"""
from __future__ import annotations

import time
from typing import Callable

ROWS = (1, 2, 4, 6, 8)


class Costs:
    """Seconds per forward of a model as a function of its rows (piecewise linear)."""

    def __init__(self, points: dict[int, float]):
        # more rows never cost less: a point above a later one was a busy moment, lowered to it
        pts, low = [], float("inf")
        for r, t in sorted(points.items(), reverse=True):
            low = min(low, t)
            pts.append((r, low))
        self.points = pts[::-1]

    def __call__(self, rows: float) -> float:
        pts = self.points
        if rows <= pts[0][0] or len(pts) == 1:
            return pts[0][1]
        for (r0, t0), (r1, t1) in zip(pts, pts[1:]):
            if rows <= r1:
                return t0 + (t1 - t0) * (rows - r0) / (r1 - r0)
        (r0, t0), (r1, t1) = pts[-2], pts[-1]
        return t1 + max(t1 - t0, 0.0) * (rows - r1) / (r1 - r0)

    @classmethod
    def measure(cls, model, rows: tuple[int, ...] = ROWS, repeats: int = 3) -> "Costs":
        from ..models.batch import SeqSlice
        from .kv_cache import cache_for

        best: dict[int, float] = {}
        for _ in range(repeats):
            for r in rows:
                cache = cache_for(model)
                t0 = time.perf_counter()
                model.step([1] * r, list(range(r)), [SeqSlice(0, r, cache)], list(range(r)))
                best[r] = min(best.get(r, float("inf")), time.perf_counter() - t0)
        return cls(best)


def expected_tokens(alpha: float, g: int) -> float:
    """Tokens a run of g drafts emits on average (accepted drafts plus the target's token)."""
    if alpha >= 1.0:
        return g + 1.0
    return (1.0 - alpha ** (g + 1)) / (1.0 - alpha)


def best_gamma(target: Callable[[float], float], draft: Callable[[float], float] | None, rows: int,
               alphas: list[float], caps: list[int], others: int = 0, first: int | None = None) -> int:
    """The common gamma (0: no drafts) with the most expected tokens per second this step; `others`
    counts the step's decode rows that draft nothing (one token each either way); `first`: the
    rows of the first draft pass (default 2 a sequence, a draft cache one run behind)."""
    n = len(alphas)
    extra = n if first is None else max(first - n, 0)  # first-pass rows beyond one a sequence
    best_g, best_rate = 0, (n + others) / target(rows)
    for g in range(1, max(caps, default=0) + 1):
        gs = [min(g, c) for c in caps]
        seconds = target(rows + sum(gs))
        if draft is not None:
            seconds += sum(draft(sum(x >= i for x in gs) + (extra if i == 1 else 0)) for i in range(1, g + 1))
        rate = (sum(expected_tokens(a, x) for a, x in zip(alphas, gs)) + others) / seconds
        if rate > best_rate:
            best_g, best_rate = g, rate
    return best_g
