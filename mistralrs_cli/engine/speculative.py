"""Speculative decoding inside the engine's step: a draft proposes gamma tokens for each decoding
sequence, the target scores them all in the step's one forward pass (each sequence's last token
plus its drafts as one chunk, beside the other requests' prefills and decodes), and the longest
acceptable prefix plus one target token is emitted. Rejected positions roll back in both caches.

Acceptance is exact in distribution (Leviathan et al. 2023, Chen et al. 2023): with temperature
> 0 a draft token x drawn from q is kept with probability min(1, p(x)/q(x)), else the token is
drawn from norm(max(0, p - q)); when all gamma pass, a bonus token is drawn from the next p.
p and q are the distributions after every transform the request asks for (sampler.distribution:
penalties with the history so far, logit_bias, temperature, top-k/top-p/min-p). Greedy keeps a
draft token while it is the target's argmax and then adds the target's own token, so the text is
token for token the target's alone.

gamma adapts per sequence unless fixed (SpecConfig.fixed): a run that accepted every draft token
raises the sequence's gamma by 2, one that rejected some lowers it by 1, within 1..SpecConfig.gamma
(Hugging Face's "heuristic" assistant schedule, bounded by the configured gamma). A sequence whose
single draft token is rejected pauses drafting for 1, 2, 4 ... 16 steps (doubling while it keeps
failing, reset by an accepted token): a verify chunk costs more than a decode, so a draft that
never agrees (n-gram lookup on text that does not repeat) should not keep paying for it.
On top of that (unless fixed or SpecConfig.cost_policy is off) the step's drafts are cut to the
common gamma with the most expected tokens per second (spec_costs.py): forward costs measured
once per model, acceptance estimated per sequence (shrunk toward the engine's pooled rate); 0,
plain decoding, when batching already fills the cores. When the acceptance estimate alone turns
drafting off, one draft token is tried again after 8, 16 .. 128 such steps, if drafts that all
pass would pay even for catching the draft's caches up on the tokens they missed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..models.batch import SeqSlice
from .drafts import Draft, ModelDraft, NgramDraft, history
from .paged import PagedSeqCache
from .request import Request, RequestOutput
from .sampler import _RNG, distribution, draw, greedy_token, sample, with_logprobs
from .scheduler import Scheduled
from .spec_costs import Costs, best_gamma

log = logging.getLogger(__name__)


@dataclass
class SpecConfig:
    """What Loaded.speculative carries: the draft source and gamma."""

    gamma: int = 5
    draft: Any = None  # the draft model's Loaded, or None with n-gram drafting
    ngram: int | None = None  # --spec-ngram N: draft from the sequence itself
    fixed: bool = False  # keep gamma fixed (benchmarks) instead of adapting it per sequence
    cost_policy: bool = True  # cut drafts to what pays for itself (spec_costs.py); off: adaptive gamma alone


class Speculator:
    def __init__(self, engine, cfg: SpecConfig):
        self.engine, self.cfg = engine, cfg
        vocab = len_logits(engine.model)
        self.source = ModelDraft(cfg.draft, vocab, engine.kv) if cfg.draft is not None else NgramDraft(cfg.ngram)
        self.gammas: dict[Request, int] = {}
        self.waits: dict[Request, tuple[int, int]] = {}  # paused sequences: (steps left, pause length)
        self.proposed = self.accepted = self.runs = 0  # since start, over every request
        self.costs: tuple | None = None  # (target, draft or None) Costs, measured at first use
        self.tally: dict[Request, tuple[int, int]] = {}  # per sequence: draft tokens passed, runs cut short
        self.cut_short = 0  # runs with a rejected draft token, over every request
        self.quiet, self.retry = 0, 8  # steps the acceptance estimate kept drafts off; when to try again

    # ---- stats ----
    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verified run (accepted drafts plus the target's own token)."""
        return (self.accepted + self.runs) / self.runs if self.runs else 0.0

    def release(self, req: Request) -> None:
        self.source.release(req)
        self.gammas.pop(req, None)
        self.waits.pop(req, None)
        self.tally.pop(req, None)

    # ---- one step ----
    def step(self, work: list[Scheduled]) -> list[RequestOutput]:
        e = self.engine
        gammas = {w.req: g for w in work if (g := self._gamma(w)) > 0}
        looked = None
        if gammas and isinstance(self.source, NgramDraft):  # a free lookup: budget its actual proposals
            looked = {r: d for r, d in self.source.propose(list(gammas), list(gammas.values())).items() if d.tokens}
            gammas = {r: len(d.tokens) for r, d in looked.items()}
        if gammas and self.cfg.cost_policy and not self.cfg.fixed:
            gammas = self._budget(work, gammas)
        if not gammas:
            return e._run_work(work)
        try:
            if looked is not None:
                drafts = {r: Draft(looked[r].tokens[:g], looked[r].probs[:g]) for r, g in gammas.items()}
            else:
                drafts = self.source.propose(list(gammas), list(gammas.values()))
                drafts = {r: d for r, d in drafts.items() if d.tokens}
            logits = self._forward(work, drafts)
        except Exception as err:  # the plain step decides who fails, as without speculation
            log.warning("a speculative step failed (%s: %s); running it without drafts", type(err).__name__, err)
            for req in gammas:
                e._rewind(req)
                self.source.rollback(req, req.n_computed)
            return e._run_work(work)
        return self._finish(work, drafts, logits)

    def _gamma(self, w: Scheduled) -> int:
        """Draft tokens for this sequence now: 0 unless it decodes with a KV cache and room."""
        req, e = w.req, self.engine
        if w.n != 1 or req.n_known - req.n_computed != 1 or req.cache is None or e.xlora is not None:
            return 0
        left, length = self.waits.get(req, (0, 0))
        if left > 0:
            self.waits[req] = (left - 1, length)
            return 0
        g = self.cfg.gamma if self.cfg.fixed else self.gammas.setdefault(req, self.cfg.gamma)
        if req.params.max_tokens is not None:  # no draft past what may still be emitted
            g = min(g, req.params.max_tokens - len(req.output_ids) - 1)
        g = min(g, e.max_context - req.n_known, self.source.room(req))
        if g > 0 and isinstance(req.cache, PagedSeqCache) and not req.cache.reserve(req.n_computed + 1 + g):
            return 0  # the pool is full: decode plainly rather than preempt anyone for drafts
        return max(g, 0)

    def _budget(self, work: list[Scheduled], gammas: dict[Request, int]) -> dict[Request, int]:
        """The drafts cut to the step's best common gamma (spec_costs.best_gamma); {} when none pays."""
        if self.costs is None:
            self.costs = (Costs.measure(self.engine.model),
                          Costs.measure(self.source.model) if isinstance(self.source, ModelDraft) else None)
            log.debug("speculation costs (rows: seconds): target %s, draft %s", self.costs[0].points,
                      self.costs[1].points if self.costs[1] else None)
        rows = sum(w.n for w in work)
        emitting = sum(w.req.n_computed + w.n == w.req.n_known for w in work)  # rows that yield a token
        reqs, caps = list(gammas), list(gammas.values())
        g = best_gamma(*self.costs, rows, [self._alpha(r) for r in reqs], caps, emitting - len(reqs))
        # a retry pays its drafts' catching up (the caches fell behind while drafting was off): at
        # batch 8 that is a prefill of every sequence, and a retry there cost more than it won
        behind = sum(map(self.source.behind, reqs)) if isinstance(self.source, ModelDraft) else None
        if g == 0 and best_gamma(*self.costs, rows, [1.0] * len(reqs), caps, emitting - len(reqs), behind):
            self.quiet += 1  # the acceptance estimate, not the cost, said no: try one token now and then
            if self.quiet >= self.retry:
                g, self.quiet, self.retry = 1, 0, min(2 * self.retry, 128)
        elif g:
            self.quiet, self.retry = 0, 8
        return {r: min(c, g) for r, c in gammas.items()} if g else {}

    def _alpha(self, req: Request) -> float:
        """The chance a draft token passes: this sequence's record shrunk toward the engine's
        (itself from a prior of 0.8 worth 4 tokens)."""
        pooled = (self.accepted + 3.2) / (self.accepted + self.cut_short + 4)
        passed, cut = self.tally.get(req, (0, 0))
        return (passed + 2 * pooled) / (passed + cut + 2)

    def _forward(self, work: list[Scheduled], drafts: dict[Request, Draft]):
        """Engine._forward with each drafted sequence's chunk extended by its drafts and a logits
        row for every position of it."""
        e = self.engine
        ids, positions, seqs, rows, sizes = [], [], [], [], []
        for w in work:
            req, start = w.req, len(ids)
            d = drafts.get(req)
            toks = req.tokens(req.n_computed, req.n_computed + w.n) + (d.tokens if d else [])
            ids.extend(toks)
            positions.extend(range(req.n_computed, req.n_computed + len(toks)))
            seqs.append(SeqSlice(start, start + len(toks), req.cache))
            if d is not None:
                rows.extend(range(start, start + len(toks)))
            elif req.n_computed + w.n == req.n_known:
                rows.append(start + len(toks) - 1)
            sizes.append((len(toks), req.params.adapters or []))
        weights = e.adapter_rows.weights(sizes)
        kw = {} if weights is None else {"adapter_weights": weights}
        return e.model.step(ids, positions, seqs, rows, **kw)

    def _finish(self, work: list[Scheduled], drafts: dict[Request, Draft], logits) -> list[RequestOutput]:
        e, outputs, i = self.engine, [], 0
        e._computed([w for w in work if w.req not in drafts])
        for w in work:
            req = w.req
            d = drafts.get(req)
            if d is None and req.n_computed != req.n_known:
                continue  # a prefill chunk: no logits row
            n = len(d.tokens) + 1 if d is not None else 1
            rows, i = logits[i:i + n], i + n
            try:
                outputs += self._accept(req, d, rows) if d is not None else [e._advance(req, rows[0])]
            except Exception as err:  # this request's alone, as in Engine.step
                outputs.append(e.fail(req, err))
        return outputs

    def _accept(self, req: Request, d: Draft, rows) -> list[RequestOutput]:
        """Judge the drafts, emit the run one token at a time (stops and max_tokens cut it), and
        roll both caches back to the tokens now known."""
        e, known = self.engine, req.n_known
        run = self.judge(req, d, rows)
        accepted = len(run) - 1
        p0, a0, r0 = req.spec_counts or (0, 0, 0)
        req.spec_counts = (p0 + len(d.tokens), a0 + accepted, r0 + 1)
        outputs = []
        for s in run:
            outputs.append(e._take(req, s))
            if req.finish_reason is not None:
                break
        req.n_computed = min(known + accepted, req.n_known)
        e._rewind(req)
        if isinstance(req.cache, PagedSeqCache):
            req.cache.commit(req.tokens(0, req.n_computed))
        self.source.rollback(req, req.n_computed)
        self.proposed, self.accepted, self.runs = self.proposed + len(d.tokens), self.accepted + accepted, self.runs + 1
        passed, cut = self.tally.get(req, (0, 0))
        self.tally[req] = (passed + accepted, cut + (accepted < len(d.tokens)))
        self.cut_short += accepted < len(d.tokens)
        if req in self.gammas and not self.cfg.fixed:
            self._adapt(req, accepted, len(d.tokens))
        log.debug("request %s: %d of %d draft tokens accepted", req.id, accepted, len(d.tokens))
        return outputs

    def _adapt(self, req: Request, accepted: int, proposed: int) -> None:
        g = self.gammas[req] + 2 if accepted == proposed else self.gammas[req] - 1
        self.gammas[req] = min(max(g, 1), self.cfg.gamma)
        if accepted:
            self.waits.pop(req, None)
        elif proposed == 1:  # even one draft token fails: pause, longer each time
            length = min(2 * self.waits.get(req, (0, 0))[1] or 1, 16)
            self.waits[req] = (length, length)

    def judge(self, req: Request, d: Draft, rows) -> list:
        """The emitted run: the accepted draft tokens, then the target's own token (Sampled each)."""
        p, hist, gen = req.params, history(req), req.generator or _RNG
        # a grammar's mask at each draft position (the target's distributions are masked: a draft
        # token the grammar refuses has probability 0 and is rejected); none past a refused one
        masks = req.grammar.draft_masks(d.tokens) if req.grammar is not None else [None] * (len(d.tokens) + 1)
        run = []
        for i, tok in enumerate(d.tokens):
            t = self.verdict(rows[i], hist, p, tok, d.probs[i], gen, mask=masks[i])
            run.append(with_logprobs(rows[i], tok if t is None else t, p))
            if t is not None:
                return run
            hist.append(tok)
        run.append(sample(rows[len(d.tokens)], hist, p, req.generator, masks[len(d.tokens)]))
        return run

    @staticmethod
    def verdict(logits, hist: list[int], p, tok: int, q, gen, mask=None) -> int | None:
        """None: keep the draft token `tok`; else the token emitted in its place."""
        if p.greedy:
            t = greedy_token(logits, hist, p, mask)
            return None if t == tok else t
        probs = distribution(logits, hist, p, mask)
        if q is None:  # a certain draft (n-gram): q is one-hot at tok
            q = np.zeros_like(probs)
            q[tok] = 1.0
        elif q.size != probs.size:  # a draft with fewer logit rows: it never proposes the rest
            q = np.pad(q, (0, probs.size - q.size))
        if tok < probs.size and gen.random() * q[tok] < probs[tok]:  # with probability min(1, p/q)
            return None
        resid = np.maximum(probs - q, 0)
        total = resid.sum()
        return draw(resid / total if total > 0 else probs, gen)


def len_logits(model) -> int:
    return int(model.config.vocab_size)
