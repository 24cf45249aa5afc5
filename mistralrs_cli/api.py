"""The Python API, shaped like mistral.rs's: Runner(which=Which.GGUF(...)) and OpenAI-shaped
responses. The CLI's one-shot and interactive modes are built on the same calls."""
from __future__ import annotations

import enum
import re
import time
import uuid
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

from . import validation
from .engine.engine import Engine
from .engine.request import RequestOutput
from .engine.token_text import TokenText
from .errors import UserError
from .loaders.load import Loaded, load
from .prompting import completion_ids
from .sampling_defaults import sampling_params
from .numerics import check_numerics
from .types import (EngineConfig, GGMLSpec, GGUFSpec, LoadOptions, LoraSpec, PlainSpec, SamplingParams,
                    SpeculativeSpec, VisionSpec, XLoraSpec)
from .validation import Limits, ParamError, ParamTypeError
from .vision.chat import chat_with_images, has_images


class Which:
    """Model sources, named as in mistral.rs's Python API."""

    @staticmethod
    def GGUF(quantized_model_id: str | None, quantized_filename: str, tok_model_id: str | None = None,
             tokenizer_json: str | None = None, **_ignored: Any) -> GGUFSpec:
        return GGUFSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json)

    @staticmethod
    def GGML(tok_model_id: str | None = None, quantized_model_id: str | None = None,
             quantized_filename: str | None = None, tokenizer_json: str | None = None, gqa: int = 1,
             eps: float = 1e-5, rope_theta: float = 10000.0, **_ignored: Any) -> GGMLSpec:
        if not quantized_filename:
            raise UserError("Which.GGML needs quantized_filename (the GGML .bin file).")
        return GGMLSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json,
                        1 if gqa is None else int(gqa), eps, rope_theta)

    @staticmethod
    def Plain(model_id: str, arch: str | None = None, tokenizer_json: str | None = None,
              **_ignored: Any) -> PlainSpec:
        return PlainSpec(model_id, arch, tokenizer_json)

    @staticmethod
    def VisionPlain(model_id: str, arch: Any = None, tokenizer_json: str | None = None,
                    quantized_filename: str | None = None, **_ignored: Any) -> VisionSpec:
        """A vision-language checkpoint (llava); arch may be a name or an enum with that value;
        quantized_filename: the language model's weights from this GGUF (as vision-plain -f)."""
        arch = getattr(arch, "value", arch)
        return VisionSpec(model_id, None if arch is None else str(arch), tokenizer_json, quantized_filename)

    @staticmethod
    def Lora(model_id: str, adapters_model_id: str, order: str, arch: str | None = None,
             tokenizer_json: str | None = None, **_ignored: Any) -> LoraSpec:
        """A plain checkpoint with the PEFT LoRA adapters the ordering file `order` names."""
        return LoraSpec(PlainSpec(model_id, arch, tokenizer_json), adapters_model_id, order)

    @staticmethod
    def LoraGGUF(quantized_model_id: str | None, quantized_filename: str, adapters_model_id: str, order: str,
                 tok_model_id: str | None = None, tokenizer_json: str | None = None, **_ignored: Any) -> LoraSpec:
        return LoraSpec(GGUFSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json),
                        adapters_model_id, order)

    @staticmethod
    def LoraGGML(adapters_model_id: str, order: str, tok_model_id: str | None = None,
                 quantized_model_id: str | None = None, quantized_filename: str | None = None,
                 tokenizer_json: str | None = None, gqa: int = 1, eps: float = 1e-5, rope_theta: float = 10000.0,
                 **_ignored: Any) -> LoraSpec:
        if not quantized_filename:
            raise UserError("Which.LoraGGML needs quantized_filename (the GGML .bin file).")
        return LoraSpec(GGMLSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json,
                                 1 if gqa is None else int(gqa), eps, rope_theta), adapters_model_id, order)

    @staticmethod
    def XLora(xlora_model_id: str, order: str | None = None, tgt_non_granular_index: int | None = None,
              model_id: str | None = None, tokenizer_json: str | None = None, arch: str | None = None,
              **_ignored: Any) -> XLoraSpec:
        """A plain checkpoint with an X-LoRA model; model_id defaults to the ordering's base_model_id."""
        return XLoraSpec(PlainSpec(model_id, arch, tokenizer_json), xlora_model_id, order, tgt_non_granular_index)

    @staticmethod
    def XLoraGGUF(quantized_model_id: str | None, quantized_filename: str, xlora_model_id: str,
                  order: str | None = None, tgt_non_granular_index: int | None = None,
                  tok_model_id: str | None = None, tokenizer_json: str | None = None, **_ignored: Any) -> XLoraSpec:
        return XLoraSpec(GGUFSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json),
                         xlora_model_id, order, tgt_non_granular_index)

    @staticmethod
    def XLoraGGML(xlora_model_id: str, order: str | None = None, tgt_non_granular_index: int | None = None,
                  tok_model_id: str | None = None, quantized_model_id: str | None = None,
                  quantized_filename: str | None = None, tokenizer_json: str | None = None, gqa: int = 1,
                  eps: float = 1e-5, rope_theta: float = 10000.0, **_ignored: Any) -> XLoraSpec:
        if not quantized_filename:
            raise UserError("Which.XLoraGGML needs quantized_filename (the GGML .bin file).")
        return XLoraSpec(GGMLSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json,
                                  1 if gqa is None else int(gqa), eps, rope_theta),
                         xlora_model_id, order, tgt_non_granular_index)


# The loaders' messages name command-line flags; a Python caller set these fields instead.
_COMMON_FIELDS = {"-c/--chat-template": "chat_template", "--chat-template": "chat_template",
                  "--token-source": "token_source", "--numerics": "numerics", "--isq": "isq",
                  "--dtype": "dtype", "--raw": "a CompletionRequest", "--truncate-sequence": "truncate_sequence",
                  "--pa-gpu-mem": "engine_config.kv_mem_mb", "--pa-ctxt-len": "engine_config.kv_tokens",
                  "--tp": "tensor_parallel_size", "--dist-backend": "dist_backend"}
_SPEC_FIELDS = {
    GGUFSpec: {"-m/-f": "quantized_model_id/quantized_filename", "-m/--quantized-model-id": "quantized_model_id",
               "-m": "quantized_model_id", "-f": "quantized_filename", "-t/--tok-model-id": "tok_model_id",
               "-t": "tok_model_id", "--tokenizer-json": "tokenizer_json"},
    PlainSpec: {"-m/--model-id": "model_id", "--model-id": "model_id", "-m": "model_id",
                "-t/--tokenizer-json": "tokenizer_json", "-a/--arch": "arch", "--arch": "arch"},
}
_SPEC_FIELDS[VisionSpec] = {**_SPEC_FIELDS[PlainSpec], "-f/--quantized-filename": "quantized_filename",
                             "--quantized-filename": "quantized_filename", "-f": "quantized_filename"}
_SPEC_FIELDS[GGMLSpec] = {**_SPEC_FIELDS[GGUFSpec], "-t/--tokenizer-json": "tokenizer_json", "--gqa": "gqa",
                          "--eps": "eps", "--rope-theta": "rope_theta"}


_ADAPTER_FIELDS = {"-a/--adapters-model-id": "adapters_model_id", "-o/--order": "order",
                   "-x/--xlora-model-id": "xlora_model_id", "--tgt-non-granular-index": "tgt_non_granular_index"}


def python_field_names(message: str, spec: Any) -> str:
    """message with each command-line flag it names replaced by the Python field it stands for."""
    names = {**_COMMON_FIELDS, **_SPEC_FIELDS.get(type(spec), {})}
    if isinstance(spec, (LoraSpec, XLoraSpec)):  # the base's fields, and the adapters'
        names.update({**_SPEC_FIELDS.get(type(spec.base), {}), **_ADAPTER_FIELDS})
    flags = "|".join(re.escape(f) for f in sorted(names, key=len, reverse=True))
    return re.sub(rf"(?<![\w/-])({flags})(?![\w/-])", lambda m: names[m.group(1)], message)


@contextmanager
def _python_fields(spec: Any) -> Iterator[None]:
    """Re-raise a UserError with the Python field names (the same exception, reworded)."""
    try:
        yield
    except UserError as e:
        e.args = (python_field_names(str(e), spec), *e.args[1:])
        raise


def _speculative(which: Any, which_draft: Any, gamma: Any) -> SpeculativeSpec:
    from .loaders.speculative import check_gamma

    if not isinstance(which, (GGUFSpec, GGMLSpec, PlainSpec)) or not isinstance(which_draft, (GGUFSpec, GGMLSpec, PlainSpec)):
        raise ParamTypeError("which and which_draft must each be Which.GGUF(...), Which.GGML(...) or Which.Plain(...) "
                             "for speculative decoding.", "which_draft")
    return SpeculativeSpec(which, which_draft, check_gamma(gamma, "speculative_gamma"))


def _check_which(which: Any) -> None:
    if not isinstance(which, (GGUFSpec, GGMLSpec, PlainSpec, LoraSpec, XLoraSpec, SpeculativeSpec, VisionSpec)):
        raise ParamTypeError(f"which must be a model source made by Which.GGUF(...), Which.GGML(...) or "
                         f"Which.Plain(...), got {type(which).__name__} {which!r:.80}.", "which")


class VisionArchitecture(str, enum.Enum):
    """mistral.rs's names for Which.VisionPlain(arch=...): the ones this build runs."""
    LLaVA = "llava"
    LLaVANext = "llava_next"
    Gemma3 = "gemma3"
    Idefics3 = "idefics3"
    Idefics2 = "idefics2"
    Phi3V = "phi3v"


class Role(str, enum.Enum):
    System = "system"
    User = "user"
    Assistant = "assistant"


@dataclass
class Message:
    role: Role | str
    content: str

    def to_dict(self) -> dict[str, Any]:
        role = self.role.value if isinstance(self.role, Role) else str(self.role)
        return {"role": role, "content": self.content}


@dataclass
class _Sampling:
    """Request fields; None takes the model's default (sampling_defaults: its generation_config.json,
    else temperature 0.8, top-k 40, top-p 0.95, min-p 0.05, repetition penalty 1.1 over the last
    64 tokens). mistral.rs treats an unset temperature as greedy; here greedy is temperature=0."""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    repeat_last_n: int | None = None
    logit_bias: dict[int, float] | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int = 1
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    stream: bool = False
    ignore_eos: bool = False
    # LoRA adapters (names) this request runs with, beside other requests' own; None: the active
    # set (Runner.activate_adapters), []: the base model alone
    adapters: list[str] | None = None
    # a constraint on the output (grammar/request.py): a types.Grammar, {"type": "regex"|"lark"|
    # "json_schema"|"llguidance", "value": ...}, or a string with grammar_type (mistral.rs's shape;
    # "yacc" is Lark); response_format: OpenAI's {"type": "json_object"} or {"type": "json_schema",
    # "json_schema": {"name", "schema"}}
    grammar: Any = None
    grammar_type: str | None = None
    response_format: dict[str, Any] | None = None

    def sampling(self, index: int = 0, generation_config: dict[str, Any] | None = None, vocab: int | None = None,
                 max_context: int | None = None, limits: Limits | None = None) -> SamplingParams:
        """The fields checked by the rules the CLI and the server use (validation.py), over the
        model's defaults; choice `index` samples with seed + index."""
        names = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "repeat_last_n", "logit_bias", "stop", "stop_token_ids", "n", "seed",
                 "top_logprobs")
        given = validation.check_sampling({k: getattr(self, k) for k in names}, vocab=vocab,
                                          max_context=max_context, limits=limits,
                                          limit_name=validation.python_limit)
        given.pop("n", None)
        if given.get("top_k") == -1:
            given["top_k"] = 0  # -1 and 0: no top-k
        if "seed" in given:
            given["seed"] += index
        return sampling_params(dict(
            given, presence_penalty=given.get("presence_penalty", 0.0),
            frequency_penalty=given.get("frequency_penalty", 0.0), logit_bias=given.get("logit_bias", {}),
            stop=given.get("stop", []), stop_token_ids=given.get("stop_token_ids", []),
            ignore_eos=self.ignore_eos, logprobs=self.logprobs, top_logprobs=given.get("top_logprobs", 0)),
            generation_config)


@dataclass
class ChatCompletionRequest(_Sampling):
    messages: list[dict[str, Any] | Message] | str = field(default_factory=list)
    model: str = "default"
    # OpenAI tool calling (tools/): [{"type": "function", "function": {"name", "description",
    # "parameters"}}]; tool_choice "auto" | "none" | "required" | {"type": "function", "function":
    # {"name": ...}}; the response's message carries tool_calls
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


@dataclass
class CompletionRequest(_Sampling):
    prompt: str = ""
    model: str = "default"
    echo_prompt: bool = False


# ---- OpenAI-shaped responses ----
@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    avg_prompt_tok_per_sec: float = 0.0
    avg_compl_tok_per_sec: float = 0.0
    total_prompt_time_sec: float = 0.0
    total_completion_time_sec: float = 0.0
    total_time_sec: float = 0.0


@dataclass
class ResponseMessage:
    role: str
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None  # OpenAI's {"id", "type", "function": {"name", "arguments"}}


@dataclass
class Choice:
    index: int
    finish_reason: str | None
    message: ResponseMessage | None = None  # chat
    text: str | None = None  # completion
    delta: ResponseMessage | None = None  # chat stream chunk
    logprobs: Any = None


@dataclass
class Response:
    id: str
    object: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage | None = None


def _usage(outs: list[RequestOutput]) -> Usage:
    p = outs[0].prompt_tokens if outs else 0
    c = sum(o.completion_tokens for o in outs)
    pt = max((o.prompt_time for o in outs), default=0.0)
    dt = max((o.decode_time for o in outs), default=0.0)
    return Usage(p, c, p + c, p / pt if pt else 0.0, c / dt if dt else 0.0, pt, dt, pt + dt)


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
