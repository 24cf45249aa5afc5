"""OpenAI request bodies -> what the engine needs, checked field by field.

Every mistake a client can make becomes an ApiError naming the field (OpenAI's error shape);
unknown fields are ignored, as OpenAI does.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from ... import validation
from ...engine.adapter_rows import AdapterRows
from ...errors import UserError
from ...prompting import completion_ids
from ...sampling_defaults import sampling_params
from ...tools.messages import tool_fields
from ...tools.plan import prepare as prepare_tools
from ...tools.spec import parse_tools
from ...types import SamplingParams
from ...validation import Limits, ParamError
from ...vision.chat import chat_with_images, has_images


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Parsed:
    kind: str  # "chat" | "completion"
    prompts: list[list[int]]  # token ids per prompt (completions may send several)
    params: list[SamplingParams]  # one per choice, prompt-major: index = prompt * n + i
    n: int
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: off; else how many top logprobs
    echo: list[str] = field(default_factory=list)  # completions: the prompt text to prepend
    images: list[Any] = field(default_factory=list)  # vision: each prompt's PromptImages (or None)
    tools: Any = None  # chat: a tools.plan.ToolPlan (tools, or tool messages), else None


@contextmanager
def _as_api_errors() -> Iterator[None]:
    """The shared rules (validation.py) raise ParamError; the client gets a 400 naming the field."""
    try:
        yield
    except ParamError as e:
        raise ApiError(400, str(e), e.field) from None


def _type_name(t: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    return " or ".join(names[x] for x in (t if isinstance(t, tuple) else (t,)))


def get(body: dict, name: str, kind: Any, default: Any = None, lo: float | None = None,
        hi: float | None = None) -> Any:
    """body[name] checked for type (int accepted where a number is) and range; null -> default."""
    value = body.get(name)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok and float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise ApiError(400, f"{name} must be {_type_name(kind)}, got {type(value).__name__} {value!r}.", name)
    if isinstance(value, float) and not math.isfinite(value):  # json.loads accepts NaN and Infinity
        raise ApiError(400, f"{name} must be a finite number, got {value!r}.", name)
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f"between {lo} and {hi}" if lo is not None and hi is not None else (
            f"at least {lo}" if lo is not None else f"at most {hi}")
        raise ApiError(400, f"{name} must be {rng}, got {value}.", name)
    return value


def _unsupported(body: dict) -> None:
    for name in ("suffix",):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported by this server.", name)


_NUMBERS = {"temperature": float, "top_p": float, "min_p": float, "top_k": int, "repetition_penalty": float,
            "presence_penalty": float, "frequency_penalty": float, "repeat_last_n": int, "seed": int}


def sampling(body: dict, vocab: int, max_context: int, top_logprobs: int,
             generation_config: dict[str, Any] | None = None, limits: Limits | None = None) -> SamplingParams:
    """The body's sampling fields, checked by the shared rules (validation.py); absent ones (or
    null) take the model's defaults (sampling_defaults: generation_config.json, else chat
    sampling with a repetition guard; mistral.rs and OpenAI would use greedy / temperature 1).
    temperature 0 is greedy."""
    raw = {name: get(body, name, kind) for name, kind in _NUMBERS.items()}
    raw["max_tokens"] = get(body, "max_tokens", int, get(body, "max_completion_tokens", int))
    raw["logit_bias"] = get(body, "logit_bias", dict)
    raw["stop"] = body.get("stop")
    raw["stop_token_ids"] = get(body, "stop_token_ids", list)
    with _as_api_errors():
        given = validation.check_sampling(raw, vocab=vocab, max_context=max_context, limits=limits)
    if given.get("top_k") == -1:
        given["top_k"] = 0  # -1 (vLLM's "off") and 0: no top-k
    return sampling_params(dict(
        given, presence_penalty=given.get("presence_penalty", 0.0),
        frequency_penalty=given.get("frequency_penalty", 0.0), logit_bias=given.get("logit_bias", {}),
        stop=given.get("stop", []), stop_token_ids=given.get("stop_token_ids", []),
        ignore_eos=get(body, "ignore_eos", bool, False), logprobs=top_logprobs >= 0,
        top_logprobs=max(top_logprobs, 0)), generation_config)


def served_adapters(loaded: Any) -> list[str]:
    """The LoRA adapters a request may name, as the engine counts them: the AdapterBank's, or with
    none the adapters merged into the weights at load."""
    return AdapterRows(loaded).names


def _request_adapters(body: dict, loaded: Any) -> list[str] | None:
    """The body's adapters by the shared rule, then by the engine's (adapters merged at load are
    always on: a request may name all of them, not fewer)."""
    rows = AdapterRows(loaded)
    with _as_api_errors():
        names = validation.check_adapters(body.get("adapters"), rows.names)
    if names is not None:
        try:
            rows.check(names, "adapters")
        except UserError as e:
            raise ApiError(400, str(e), "adapters") from None
    return names


def _choices(body: dict, prompts: list[list[int]], loaded: Any, top_logprobs: int,
             limits: Limits) -> tuple[int, list[SamplingParams]]:
    with _as_api_errors():
        n = validation.check_sampling({"n": get(body, "n", int, 1)}, limits=limits)["n"]
    base = sampling(body, loaded.tokenizer.vocab_size, loaded.max_context, top_logprobs,
                    getattr(loaded, "generation_config", None), limits)
    base.adapters = _request_adapters(body, loaded)  # None: the engine's active set when it starts
    base.grammar = _request_grammar(body, loaded)
    params = []
    for _ in prompts:
        for i in range(n):  # choice i: seed + i, so n choices differ and each is reproducible
            seed = None if base.seed is None else base.seed + i
            params.append(SamplingParams(**{**base.__dict__, "seed": seed}))
    return n, params


def _request_grammar(body: dict, loaded: Any):
    """grammar / response_format -> a Grammar compiled for this model (each choice gets its own
    matcher in the engine); a bad one is a 400 naming the field."""
    if body.get("grammar") is None and body.get("response_format") is None:
        return None
    from ...grammar.request import checked

    with _as_api_errors():
        return checked(loaded, body.get("grammar"), body.get("response_format"))


def _top_logprobs(body: dict, key: str, limits: Limits) -> int | None:
    """top_logprobs (chat) or logprobs (completions): 0..max_top_logprobs, None when absent."""
    value = get(body, key, int)
    if value is None:
        return None
    with _as_api_errors():
        return validation.check_value(key, value, validation.field, validation.SAMPLING_RULES["top_logprobs"],
                                      limits.max_top_logprobs,
                                      f"{limits.max_top_logprobs} (--max-top-logprobs raises it)")


def _stream_opts(body: dict) -> tuple[bool, bool]:
    stream = get(body, "stream", bool, False)
    opts = get(body, "stream_options", dict, {})
    return stream, bool(stream and get(opts, "include_usage", bool, False))


def _message_text(m: Any, i: int) -> dict[str, str]:
    if not isinstance(m, dict) or not isinstance(m.get("role"), str):
        raise ApiError(400, f"messages[{i}] must be an object with a role and content.", "messages")
    content = m.get("content")
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                raise ApiError(400, f"messages[{i}].content has a {kind!r} part; this model takes "
                                    "text parts only.", "messages")
            parts.append(p["text"])
        content = "".join(parts)
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ApiError(400, f"messages[{i}].content must be a string or an array of parts.", "messages")
    with _as_api_errors():  # assistant tool_calls, a tool result's tool_call_id
        return {"role": m["role"], "content": content, **tool_fields(m, i)}


def parse_chat(body: dict, loaded: Any, limits: Limits | None = None) -> Parsed:
    limits = limits or Limits()
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty array of messages.", "messages")
    if has_images(msgs) or getattr(loaded, "vision", None) is not None:
        return _parse_vision_chat(body, msgs, loaded, limits)
    msgs = [_message_text(m, i) for i, m in enumerate(msgs)]
    _unsupported(body)
    logprobs = get(body, "logprobs", bool, False)
    top = _top_logprobs(body, "top_logprobs", limits) or 0
    with _as_api_errors():
        tools = parse_tools(body.get("tools"), body.get("tool_choice"), body.get("parallel_tool_calls"))
    try:
        ids, plan = prepare_tools(loaded, msgs, tools)
    except ParamError as e:
        raise ApiError(400, str(e), e.field) from None
    except UserError as e:
        raise ApiError(400, str(e), "messages") from None
    n, params = _choices(body, [ids], loaded, top if logprobs else -1, limits)
    user_grammar = any(p.grammar is not None for p in params)
    if plan is not None and plan.grammar is not None and not (user_grammar and plan.request.choice == "auto"):
        # the call is generated under its grammar; under "auto" a request's own grammar wins
        if user_grammar:
            raise ApiError(400, "tool_choice \"required\" or a named function constrains the answer to a "
                                "tool call; send grammar/response_format without it, or tool_choice \"auto\".",
                           "tool_choice")
        for p in params:
            p.grammar = plan.grammar
    stream, usage = _stream_opts(body)
    return Parsed("chat", [ids], params, n, stream, usage, top if logprobs else None, tools=plan)


def _parse_vision_chat(body: dict, msgs: list, loaded: Any, limits: Limits) -> Parsed:
    """A chat with image_url parts (data: URIs, http(s) URLs fetched under vision/fetch.py's
    guard; never local paths), or any chat with a vision model."""
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a role and content.", "messages")
    _unsupported(body)
    if body.get("tools"):  # tools/ renders text-only chats; said, rather than dropped silently
        raise ApiError(400, "tools are not supported with images or a vision model yet; send the request "
                            "without tools.", "tools")
    logprobs = get(body, "logprobs", bool, False)
    top = _top_logprobs(body, "top_logprobs", limits) or 0
    try:
        ids, images = chat_with_images(loaded, msgs, allow_paths=False)
    except UserError as e:
        raise ApiError(400, str(e), "messages") from None
    n, params = _choices(body, [ids], loaded, top if logprobs else -1, limits)
    stream, usage = _stream_opts(body)
    return Parsed("chat", [ids], params, n, stream, usage, top if logprobs else None, images=[images])


def _prompts(body: dict, loaded: Any) -> tuple[list[list[int]], list[str]]:
    p = body.get("prompt")
    tok = loaded.tokenizer
    if isinstance(p, str):
        p = [p]
    if isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        p = [p]
    if not isinstance(p, list) or not p:
        raise ApiError(400, "prompt must be a string, an array of strings, or an array of token ids.", "prompt")
    ids, texts = [], []
    for x in p:
        if isinstance(x, str):
            ids.append(completion_ids(loaded, x))
            texts.append(x)
        elif isinstance(x, list) and x and all(isinstance(t, int) and 0 <= t < tok.vocab_size for t in x):
            ids.append(list(x))
            texts.append(tok.decode(x))
        else:
            raise ApiError(400, "prompt must be a string, an array of strings, or an array of token ids "
                                "within the vocabulary.", "prompt")
    return ids, texts


def parse_completion(body: dict, loaded: Any, limits: Limits | None = None) -> Parsed:
    limits = limits or Limits()
    prompts, texts = _prompts(body, loaded)
    _unsupported(body)
    top = _top_logprobs(body, "logprobs", limits)
    n, params = _choices(body, prompts, loaded, -1 if top is None else top, limits)
    stream, usage = _stream_opts(body)
    echo = texts if get(body, "echo", bool, False) else []
    return Parsed("completion", prompts, params, n, stream, usage, top, echo)


def parse_activation(body: dict, loaded: Any) -> list[str]:
    """POST /activate_adapters' body, mistral.rs's {"adapter_names": [...]}: the names checked
    against the adapters the model serves ([] runs the base model alone)."""
    served = served_adapters(loaded)
    if not served:
        raise ApiError(400, "this model was loaded without LoRA adapters, so there are none to activate; "
                            "load it with a lora subcommand.", "adapter_names")
    with _as_api_errors():
        names = validation.check_adapters(body.get("adapter_names"), served, key="adapter_names")
    if names is None:
        example = json.dumps({"adapter_names": [served[0][:40]]})
        raise ApiError(400, f"send the adapters to activate as adapter_names, e.g. {example} "
                            "([] runs the base model alone).", "adapter_names")
    return names
