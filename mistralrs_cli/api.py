"""The Python API, shaped like mistral.rs's: Runner(which=Which.GGUF(...)) and OpenAI-shaped
responses. The CLI's one-shot and interactive modes are built on the same calls. The model
sources are in api_which.py, the requests and responses in api_types.py."""
from __future__ import annotations

import time
import uuid
from contextlib import nullcontext
from dataclasses import replace
from typing import Any, Iterator

from . import validation
from .api_types import (ChatCompletionRequest, Choice, CompletionRequest, Message, Response, ResponseMessage,  # noqa: F401
                        Role, Usage, _Sampling, _usage)
from .api_which import VisionArchitecture, Which, _check_which, _python_fields, _speculative, python_field_names  # noqa: F401
from .engine.engine import Engine
from .engine.request import RequestOutput
from .engine.token_text import TokenText
from .loaders.load import Loaded, load
from .prompting import completion_ids
from .numerics import check_numerics
from .types import EngineConfig, LoadOptions, SamplingParams
from .validation import Limits, ParamError, ParamTypeError
from .vision.chat import chat_with_images, has_images


class Runner:
    def __init__(self, which: Any, token_source: str = "cache", chat_template: str | None = None,
                 max_seqs: int = 16, truncate_sequence: bool = False, no_kv_cache: bool = False,
                 loaded: Loaded | None = None, numerics: str = "precise", isq: str | None = None,
                 in_situ_quant: str | None = None,  # mistral.rs's Python name for isq
                 engine_config: EngineConfig | None = None, limits: Limits | None = None,
                 _flag_names: bool = False,  # the CLI's modes: messages keep naming the flags
                 which_draft: Any = None, speculative_gamma: int = 5, speculative_ngram: int | None = None,
                 tensor_parallel_size: int = 1, dist_backend: str | None = None,  # --tp, --dist-backend
                 allow_local_images: bool = False, **_ignored: Any):
        _check_which(which)
        if which_draft is not None:  # speculative decoding: which verifies what which_draft proposes
            which = _speculative(which, which_draft, speculative_gamma)
        check_numerics(numerics, "numerics")
        config = engine_config or EngineConfig(max_seqs=max_seqs, truncate_sequence=truncate_sequence,
                                               no_kv_cache=no_kv_cache)
        # the engine's settings, named as the caller set them (max_seqs=, or engine_config=...)
        validation.check_engine(vars(config), lambda k: f"engine_config.{k}" if engine_config else k)
        self.limits = (limits or Limits()).check(lambda k: f"limits.{k}")
        if speculative_ngram is not None:  # draft-free speculation: checked before anything loads
            from .loaders.speculative import ngram_config

            ngram_config(speculative_ngram, "speculative_ngram")
        opts = LoadOptions(token_source=token_source, chat_template=chat_template, numerics=numerics,
                           isq=isq or in_situ_quant, spec_ngram=speculative_ngram,
                           tp=tensor_parallel_size, dist_backend=dist_backend,
                           allow_local_images=bool(allow_local_images))
        self.which = which
        with _python_fields(which):
            self.loaded = loaded or load(which, opts)
        with nullcontext() if _flag_names else _python_fields(which):
            self.engine = Engine(self.loaded, config)
        self._token_text: TokenText | None = None

    # ---- tokenizer ----
    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise ParamTypeError(f"text must be a string, got {type(text).__name__}.", "text")
        return self.loaded.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize_text(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        validation.check_token_ids("ids", ids, self.loaded.tokenizer.vocab_size)
        return self.loaded.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    # ---- requests ----
    def send_chat_completion_request(self, request: ChatCompletionRequest):
        msgs = request.messages
        if isinstance(msgs, str):
            msgs = [{"role": "user", "content": msgs}]
        msgs = [m.to_dict() if isinstance(m, Message) else m for m in msgs]
        images = None
        with _python_fields(self.which):
            if has_images(msgs) or self.loaded.vision is not None:  # image parts: paths, data: URIs, URLs
                if request.tools:
                    raise ParamError("tools are not supported with images or a vision model yet; send the "
                                     "request without tools.", "tools")
                ids, images = chat_with_images(self.loaded, msgs, allow_paths=True)
            else:
                from .tools.plan import from_fields

                ids, tools = from_fields(self.loaded, msgs, request.tools, request.tool_choice,
                                         request.parallel_tool_calls)
                return self._run(ids, request, "chat.completion", f"chatcmpl-{uuid.uuid4().hex}", tools=tools)
        return self._run(ids, request, "chat.completion", f"chatcmpl-{uuid.uuid4().hex}", images)

    def send_completion_request(self, request: CompletionRequest):
        ids = completion_ids(self.loaded, request.prompt)
        return self._run(ids, request, "text_completion", f"cmpl-{uuid.uuid4().hex}")

    def stream(self, prompt_ids: list[int], params: SamplingParams, images=None) -> Iterator[RequestOutput]:
        """The engine's deltas for one request (the CLI's one-shot and interactive modes);
        images: the prompt's PromptImages (vision/chat.py chat_with_images)."""
        validation.check_token_ids("prompt_ids", prompt_ids, self.loaded.tokenizer.vocab_size)
        self._check(vars(params), context_bounds_max_tokens=False)  # the CLI's "until the context is full"
        return self.engine.generate(prompt_ids, params, images=images)

    def _check(self, values: dict[str, Any], context_bounds_max_tokens: bool = True) -> dict[str, Any]:
        ctx = self.loaded.max_context if context_bounds_max_tokens else None
        return validation.check_sampling(values, vocab=self.loaded.tokenizer.vocab_size, max_context=ctx,
                                         limits=self.limits, limit_name=validation.python_limit)

    # ---- adapters ----
    def activate_adapters(self, adapter_names: list[str]) -> None:
        """mistral.rs's call: the LoRA adapters of requests that name none (adapters=None) from
        now on; [] runs the base model alone."""
        names = validation.check_adapters(adapter_names, self.engine.adapter_names(), key="adapter_names")
        if names is None:
            raise ParamTypeError("adapter_names must be a list of adapter names (strings), got None.",
                                 "adapter_names")
        self.engine.set_active_adapters(names)

    def _grammar(self, request: _Sampling):
        """The request's grammar / response_format, compiled for this model (ParamError naming
        the field when it is wrong)."""
        from .grammar.request import checked

        g = request.grammar
        if isinstance(g, str):  # mistral.rs: grammar="...", grammar_type="regex" | "yacc" | ...
            if request.grammar_type is None:
                raise ParamError("grammar is a string: say what kind it is with grammar_type (regex, lark, "
                                 "json_schema or llguidance).", "grammar_type")
            g = {"type": request.grammar_type, "value": g}
        return checked(self.loaded, g, request.response_format)

    def _run(self, ids: list[int], request: _Sampling, kind: str, rid: str, images=None, tools=None):
        """tools: the request's tools.plan.ToolPlan (its grammar, its output split into tool_calls)."""
        cfg, vocab, ctx = self.loaded.generation_config, self.loaded.tokenizer.vocab_size, self.loaded.max_context
        self._check({"n": request.n})  # before range(n): n=0 would send nothing and answer nothing
        adapters = validation.check_adapters(request.adapters, self.engine.adapter_names())
        grammar = self._grammar(request)
        # the call is generated under its grammar; under "auto" a request's own grammar wins
        if tools is not None and tools.grammar is not None and not (
                grammar is not None and tools.request.choice == "auto"):
            if grammar is not None:
                raise ParamError("tool_choice \"required\" or a named function constrains the answer to a tool "
                                 "call; set grammar/response_format without it, or tool_choice \"auto\".", "tool_choice")
            grammar = tools.grammar
        params = [replace(request.sampling(i, cfg, vocab, ctx, self.limits), adapters=adapters, grammar=grammar)
                  for i in range(request.n)]
        with _python_fields(self.which):
            reqs = [self.engine.add_request(ids, p, images=images) for p in params]
        index = {r.id: i for i, r in enumerate(reqs)}
        gen = self._drain(index)
        if request.stream:
            return self._chunks(gen, kind, rid, tools)
        texts, last, lps = [""] * len(reqs), {}, [[] for _ in reqs]
        for i, out in gen:
            texts[i] += out.text
            if out.logprob is not None and out.token_id is not None:
                lps[i].append(self._logprob(out))
            if out.finish_reason is not None:
                last[i] = out
        choices = [self._choice(kind, i, texts[i], last[i].finish_reason, tools=tools) for i in range(len(reqs))]
        if request.logprobs:
            for c, entries in zip(choices, lps):
                c.logprobs = {"content": entries}
        return Response(rid, kind, int(time.time()), self.loaded.model_id, choices, _usage(list(last.values())))

    def _tool_chunks(self, gen, obj: str, rid: str, tools) -> Iterator[Response]:
        """Chat chunks with tools: content and tool_calls deltas as the server streams them
        (tools/deltas.py), the finish reason "tool_calls" when the answer called tools."""
        from .tools.deltas import DeltaStream

        streams: dict[int, DeltaStream] = {}
        for i, out in gen:
            ds = streams.setdefault(i, DeltaStream(tools))
            deltas = ds.feed(out.text) + (ds.finish() if out.finish_reason is not None else [])
            for d in deltas:
                msg = ResponseMessage("assistant", d.get("content"), d.get("tool_calls"))
                yield Response(rid, obj, int(time.time()), self.loaded.model_id, [Choice(i, None, delta=msg)])
            if out.finish_reason is not None:
                msg = ResponseMessage("assistant", None)
                yield Response(rid, obj, int(time.time()), self.loaded.model_id,
                               [Choice(i, ds.finish_reason(out.finish_reason), delta=msg)], _usage([out]))

    def _drain(self, index: dict[str, int]) -> Iterator[tuple[int, RequestOutput]]:
        pending = set(index)
        try:
            while pending:
                for out in self.engine.step():
                    if out.request_id in pending:
                        if out.finish_reason is not None:
                            pending.discard(out.request_id)
                        yield index[out.request_id], out
        finally:
            for rid in pending:
                self.engine.abort(rid)

    def _logprob(self, out: RequestOutput) -> dict[str, Any]:
        """OpenAI's logprobs.content item: token text, natural log, bytes, top alternatives."""
        if self._token_text is None:
            self._token_text = TokenText(self.loaded.tokenizer)
        tok, raw = self._token_text(out.token_id)
        top = [dict(zip(("token", "bytes"), self._token_text(t)), logprob=lp) for t, lp in out.top_logprobs]
        return {"token": tok, "logprob": out.logprob, "bytes": raw, "top_logprobs": top}

    @staticmethod
    def _choice(kind: str, i: int, text: str, finish: str | None, chunk: bool = False, tools=None) -> Choice:
        if kind == "text_completion":
            return Choice(i, finish, text=text)
        msg = ResponseMessage("assistant", text)
        if tools is not None:  # the server's split (tools/plan.py): content and tool_calls
            message, finish = tools.message(text, finish)
            msg = ResponseMessage("assistant", message["content"], message.get("tool_calls"))
        return Choice(i, finish, delta=msg) if chunk else Choice(i, finish, message=msg)

    def _chunks(self, gen, kind: str, rid: str, tools=None) -> Iterator[Response]:
        obj = "chat.completion.chunk" if kind == "chat.completion" else kind
        if tools is not None:
            yield from self._tool_chunks(gen, obj, rid, tools)
            return
        for i, out in gen:
            if out.text or out.finish_reason is not None:
                usage = _usage([out]) if out.finish_reason is not None else None
                yield Response(rid, obj, int(time.time()), self.loaded.model_id,
                               [self._choice(kind, i, out.text, out.finish_reason, chunk=True)], usage)
