"""The engine: requests in, RequestOutput deltas out. One step = schedule -> forward -> sample.

A request is "computed tokens catching up with known tokens": a prompt is prefilled in chunks
under a token budget, then each step adds one token. All scheduled sequences run in one
flattened forward pass, so prefills and decodes of different requests mix in one step. The
scheduler (scheduler.py) decides who runs; the KV cache is a paged pool (paged.py), or one
contiguous cache per sequence with --no-paged-attn, or none with --no-kv-cache.
"""
from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from typing import Any, Iterator

from ..errors import UserError
from ..models.batch import SeqSlice
from ..types import EngineConfig, SamplingParams
from ..validation import check_kv_pool
from .adapter_rows import AdapterRows
from .image_rows import ImageRows
from .kv_cache import cache_for
from .paged import PagedKV, PagedSeqCache, PoolShape
from .request import Request, RequestOutput
from .sampler import new_generator, sample
from .scheduler import Scheduled, Scheduler
from .token_text import find_stop

_ids = itertools.count()
log = logging.getLogger(__name__)


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def pool_blocks(cfg: EngineConfig, shape: PoolShape, max_context: int) -> int:
    """How many blocks the KV pool gets: --pa-ctxt-len tokens, else --pa-gpu-mem MB, else
    --pa-gpu-mem-usage of the available RAM; by default enough for max_seqs full contexts,
    capped at half the available RAM."""
    per_block = shape.bytes_per_token() * cfg.block_size
    if cfg.kv_tokens is not None:
        n = max(1, -(-cfg.kv_tokens // cfg.block_size))
        check_kv_pool(n * per_block, f"--pa-ctxt-len {cfg.kv_tokens}")
        return n
    if cfg.kv_mem_mb is not None:
        return max(1, int(cfg.kv_mem_mb * 2**20) // per_block)
    if cfg.kv_mem_fraction is not None:
        return max(1, int(cfg.kv_mem_fraction * _available_ram()) // per_block)
    want = cfg.max_seqs * -(-max_context // cfg.block_size)
    return max(1, min(want, int(0.5 * _available_ram()) // per_block))


class Engine:
    def __init__(self, loaded, config: EngineConfig | None = None):
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.cfg = cfg = config or EngineConfig()
        self.max_context = loaded.max_context
        self.kv: PagedKV | None = None
        if cfg.paged_attn and not cfg.no_kv_cache:
            c, m = self.model.config, self.model
            shape = PoolShape(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, m.cache_dtype)
            self.kv = PagedKV(shape, pool_blocks(cfg, shape, self.max_context), cfg.block_size,
                              cfg.prefix_cache_n, m.kv_round_to)
        self.scheduler = Scheduler(cfg.max_seqs, cfg.max_batch_tokens, self._reserve, self._release,
                                   chunked=not cfg.no_kv_cache)
        self.finished: dict[str, int] = {}  # finish reason -> requests, since start
        self.grammar_flush = None  # grammar/matcher.flush once a request has a grammar
        self.adapter_rows = AdapterRows(loaded)  # LoRA adapters per request (adapter_rows.py)
        self.xlora = None  # X-LoRA's scaling pass and classifier (xlora_step.py), with an X-LoRA model
        if getattr(loaded, "xlora", None) is not None:
            from .xlora_step import XLoraStep

            self.xlora = XLoraStep(self.model, loaded.xlora, loaded.adapters, cfg.no_kv_cache,
                                   loaded.xlora.tgt_non_granular_index)
        self.spec = None  # speculative decoding (speculative.py), with a draft model or --spec-ngram
        if getattr(loaded, "speculative", None) is not None:
            # verifying drafts needs a cache to roll back; its passes carry no image rows
            off = ("with --no-kv-cache" if cfg.no_kv_cache else "on an X-LoRA model" if self.xlora is not None
                   else "on a vision model" if getattr(loaded, "vision", None) is not None else None)
            if off is not None:
                log.warning("speculative decoding is off: it does not run %s", off)
            else:
                from .speculative import Speculator

                self.spec = Speculator(self, loaded.speculative)

    # ---- requests in ----
    def add_request(self, prompt_ids: list[int], params: SamplingParams,
                    request_id: str | None = None, images=None) -> Request:
        """images: vision/prompt.py PromptImages for a prompt whose placeholders were expanded."""
        rid = request_id or f"req-{next(_ids)}"
        prompt_ids = self._fit_prompt(list(prompt_ids), images)
        if params.adapters is not None or self.xlora is None:  # None on an X-LoRA model: X-LoRA
            adapters = self.adapter_rows.resolve(params.adapters)
            if adapters != params.adapters:  # fixed now: a later set_active_adapters leaves it alone
                params = dataclasses.replace(params, adapters=adapters)
        req = Request(rid, prompt_ids, params, detok=self.tokenizer.stream())
        req.generator = new_generator(params.seed)
        req.images = images
        if params.grammar is not None:  # compiled (or taken from the cache) before it is queued
            from ..grammar import seq_grammar
            from ..grammar.matcher import flush

            req.grammar = seq_grammar(self.loaded, params.grammar)
            self.grammar_flush = flush
        if params.max_tokens == 0:  # nothing to generate: finish without computing
            req.finish_reason = "length"
        self.scheduler.add(req)
        return req

    def _fit_prompt(self, ids: list[int], images=None) -> list[int]:
        if not ids:
            raise UserError("the prompt is empty after tokenization; send some text.")
        if images is not None and self.loaded.vision is None:
            raise UserError(f"model {self.loaded.model_id} takes no images; send text only, or load a "
                            "vision model with vision-plain.")
        if len(ids) >= self.max_context:
            if images is not None:  # cutting would split an image
                raise UserError(f"the prompt has {len(ids)} tokens with its images but the model's context is "
                                f"{self.max_context}; send fewer images or less text (prompts with images "
                                "are not truncated).")
            if not self.cfg.truncate_sequence:
                raise UserError(f"the prompt has {len(ids)} tokens but the model's context is "
                                f"{self.max_context}; shorten it or pass --truncate-sequence.")
            ids = ids[-(self.max_context - 1):]
        if self.kv is not None and len(ids) + 1 > self.kv.capacity_tokens:
            raise UserError(f"the prompt has {len(ids)} tokens but the KV cache holds "
                            f"{self.kv.capacity_tokens}; give it more memory (--pa-gpu-mem MB or "
                            "--pa-ctxt-len TOKENS) or shorten the prompt.")
        return ids

    # ---- LoRA adapters ----
    def adapter_names(self) -> list[str]:
        """Every adapter this model serves (a request may name any of them)."""
        return list(self.adapter_rows.names)

    @property
    def active_adapters(self) -> list[str]:
        """The adapters of requests that name none."""
        return list(self.adapter_rows.active)

    def set_active_adapters(self, names: list[str]) -> None:
        """The adapters of requests that name none, from now on (requests added keep theirs)."""
        if self.xlora is not None:  # such requests run X-LoRA; mistral.rs refuses this too
            raise UserError("this is an X-LoRA model: a request naming no adapters runs X-LoRA, so there is no "
                            "default set to activate; name the adapters in each request instead.")
        self.adapter_rows.active = self.adapter_rows.check(list(names), "the adapters to activate")

    def abort(self, request_id: str) -> None:
        """Cancel a request (call on the engine's thread); its final output comes next step."""
        for req in list(self.scheduler.waiting) + self.scheduler.running:
            if req.id == request_id and req.finish_reason is None:
                req.finish_reason = "cancelled"

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the KV cache, as the scheduler asks for it ----
    def _reserve(self, req: Request, n_tokens: int) -> bool:
        if self.cfg.no_kv_cache:
            return True
        if req.cache is None:
            if req.t_scheduled is None:
                req.t_scheduled = time.perf_counter()
            if self.kv is None:
                req.cache = cache_for(self.model)
            else:
                req.cache = self.kv.new_sequence(req.tokens(0, req.n_known), self._prefix_salt(req))
                req.n_computed = len(req.cache)
        return not isinstance(req.cache, PagedSeqCache) or req.cache.reserve(n_tokens)

    def _prefix_salt(self, req: Request):
        """What else than the tokens a sequence's keys/values depend on: its unmerged LoRA
        adapters, or X-LoRA; prefix-cache blocks are shared only between equal salts."""
        if self.xlora is not None and self.xlora.uses(req):
            # past --tgt-non-granular-index a row's keys depend on where its prompt ended too
            return ("x-lora", None if self.xlora.tgt is None else len(req.prompt_ids))
        names = req.params.adapters
        salt = ("lora", *sorted(names)) if names and self.adapter_rows.bank is not None else None
        if req.images is not None:  # image rows' keys depend on the image: key them by its content
            salt = ("images", req.images.digests, salt)
        return salt

    def _release(self, req: Request, keep_prefix: bool = False) -> None:
        if isinstance(req.cache, PagedSeqCache):
            req.cache.release(keep_prefix)
        req.cache = None
        if self.spec is not None:  # the draft's cache goes with it
            self.spec.release(req)
        if self.xlora is not None:  # its scaling-pass cache goes with it
            self.xlora.release(req)

    # ---- one step ----
    def step(self) -> list[RequestOutput]:
        """One step. A request whose forward pass or sampling raises fails alone (an "error"
        output carrying the exception; its blocks are freed next step) and the others go on; an
        exception that escapes step() is the engine's own bookkeeping failing."""
        outputs = []
        for req in self.scheduler.finished():
            # a failed request's cache may hold a half-written step: keep none of it
            self._release(req, keep_prefix=req.finish_reason != "error")
            self.finished[req.finish_reason] = self.finished.get(req.finish_reason, 0) + 1
            if not req.final_sent:
                outputs.append(self._final(req))
        work = self.scheduler.schedule()
        if not work:
            return outputs
        if self.spec is not None:  # speculative decoding: drafts verified beside this step's work
            outputs += self.spec.step(work)
        else:
            outputs += self._run_work(work)
        if self.grammar_flush is not None:  # grammar masks for the next step, computed meanwhile
            self.grammar_flush()
        return outputs

    def _run_work(self, work: list[Scheduled]) -> list[RequestOutput]:
        """Forward the scheduled chunks and sample every request whose prompt is all computed."""
        outputs: list[RequestOutput] = []
        try:
            sampled = self._forward(work)
        except Exception as e:
            sampled = self._forward_alone(work, e, outputs)
        for req, row in sampled:
            try:
                outputs.append(self._advance(req, row))
            except Exception as e:  # sampling, stop strings, detokenizing: this request's alone
                outputs.append(self.fail(req, e))
        return outputs

    def _forward(self, work: list[Scheduled]) -> list[tuple[Request, Any]]:
        """One flattened forward pass over the scheduled chunks -> (request, logits row) for each
        request whose prompt is now all computed."""
        ids, positions, seqs, rows, sampled = [], [], [], [], []
        embeds = ImageRows(self.loaded.vision)
        for w in work:
            req, start = w.req, len(ids)
            if req.t_scheduled is None:
                req.t_scheduled = time.perf_counter()
            ids.extend(req.tokens(req.n_computed, req.n_computed + w.n))
            positions.extend(range(req.n_computed, req.n_computed + w.n))
            seqs.append(SeqSlice(start, start + w.n, req.cache))
            embeds.add(req.images, req.n_computed, w.n, start, len(seqs) - 1)
            if req.n_computed + w.n == req.n_known:
                sampled.append(req)
                rows.append(start + w.n - 1)
        weights = self.adapter_rows.weights([(w.n, w.req.params.adapters or []) for w in work])
        if self.xlora is not None:  # the scaling pass of this step's X-LoRA sequences
            weights = self.xlora.fill(weights, work, len(ids))
        kw = {} if weights is None else {"adapter_weights": weights}
        if embeds:
            kw["input_embeds"] = embeds.joined()
        logits = self.model.step(ids, positions, seqs, rows, **kw)
        self._computed(work)
        return list(zip(sampled, logits))

    def _forward_alone(self, work: list[Scheduled], err: Exception,
                       outputs: list[RequestOutput]) -> list[tuple[Request, Any]]:
        """A batch's forward pass raised: run each request alone so only the one that raises
        again fails (positions are explicit, so recomputing a chunk rewrites the same cache rows)."""
        if len(work) == 1:
            outputs.append(self.fail(work[0].req, err))
            return []
        log.warning("a batched forward pass failed (%s: %s); retrying its %d requests one by one",
                    type(err).__name__, err, len(work))
        for w in work:
            self._rewind(w.req)
        sampled = []
        for w in work:
            try:
                sampled += self._forward([w])
            except Exception as e:
                self._rewind(w.req)
                outputs.append(self.fail(w.req, e))
        return sampled

    def _rewind(self, req: Request) -> None:
        """Forget cache positions a failed forward pass may have written past n_computed."""
        cache = req.cache
        if isinstance(cache, PagedSeqCache):
            cache.set_length(req.n_computed)
        elif cache is not None:
            cache.truncate(req.n_computed)

    def fail(self, req: Request, err: BaseException) -> RequestOutput:
        """End `req` with an "error" output carrying `err`; the next step frees its cache."""
        log.error("request %s failed", req.id, exc_info=err)
        req.finish_reason, req.final_sent = "error", True
        return RequestOutput(req.id, None, f"internal error: {type(err).__name__}: {err}", "error",
                             prompt_tokens=len(req.prompt_ids), completion_tokens=len(req.output_ids),
                             error=err)

    def _computed(self, work: list[Scheduled]) -> None:
        for w in work:
            req = w.req
            req.n_computed = 0 if self.cfg.no_kv_cache else req.n_computed + w.n
            if isinstance(req.cache, PagedSeqCache):
                req.cache.commit(req.tokens(0, req.n_computed))

    def _advance(self, req: Request, logits) -> RequestOutput:
        p = req.params
        start = max(0, req.n_known - p.repeat_last_n) if p.repeat_last_n > 0 else 0
        mask = req.grammar.allowed() if req.grammar is not None else None
        return self._take(req, sample(logits, req.tokens(start, req.n_known), p, req.generator, mask))

    def _take(self, req: Request, s) -> RequestOutput:
        """Append the sampled token; end the request at an end token, a stop string, max_tokens
        or the context's end (speculative decoding takes an accepted run one token at a time)."""
        p = req.params
        if req.t_first is None:
            req.t_first = time.perf_counter()
        tok = s.token
        stop_tok = (not p.ignore_eos and tok in self.loaded.eos_ids) or tok in p.stop_token_ids
        req.output_ids.append(tok)
        if stop_tok:  # an end token is not part of the answer: no logprob entry for it
            req.finish_reason = "stop"
            return self._emit(req, tok, None, flush=True)
        req.text += req.detok.push(tok)
        if self._match_stop(req):
            req.finish_reason = "stop"
            return self._emit(req, tok, s, flush=False)
        if req.grammar is not None and req.grammar.consume(tok):  # complete: only EOS could follow
            req.finish_reason = "stop"
            return self._emit(req, tok, s, flush=True)
        if (p.max_tokens is not None and len(req.output_ids) >= p.max_tokens) or req.n_known >= self.max_context:
            req.finish_reason = "length"
            return self._emit(req, tok, s, flush=True)
        return self._emit(req, tok, s, flush=False)

    def _match_stop(self, req: Request) -> bool:
        """Cut the text at the first stop string; otherwise hold back a possible stop prefix."""
        cut, req.hold = find_stop(req.text, req.emitted, req.params.stop)
        if cut is not None:
            req.text = req.text[:cut]
        return cut is not None

    def _emit(self, req: Request, tok: int | None, s, flush: bool) -> RequestOutput:
        if flush:
            req.text += req.detok.flush()
            req.hold = 0
        end = len(req.text) - req.hold
        delta, req.emitted = req.text[req.emitted:end], max(req.emitted, end)
        pt, dt = req.timing()
        req.final_sent = req.finish_reason is not None
        return RequestOutput(
            req.id, tok, delta, req.finish_reason,
            logprob=s.logprob if s is not None and req.params.logprobs else None,
            top_logprobs=s.top if s is not None else [],
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.output_ids),
            prompt_time=pt, decode_time=dt, speculative=req.spec_counts,
        )

    def _final(self, req: Request) -> RequestOutput:
        return self._emit(req, None, None, flush=False)

    # ---- convenience: run one request to the end on this thread ----
    def generate(self, prompt_ids: list[int], params: SamplingParams, images=None) -> Iterator[RequestOutput]:
        req = self.add_request(prompt_ids, params, images=images)
        try:
            while True:
                for out in self.step():
                    if out.request_id == req.id:
                        if out.error is not None:  # called directly (Python API): raise it here
                            raise out.error
                        yield out
                        if out.finish_reason is not None:
                            return
        finally:
            if req.finish_reason is None:
                self.abort(req.id)
            for r in self.scheduler.finished():  # free its blocks now
                self._release(r, keep_prefix=r.finish_reason != "error")
