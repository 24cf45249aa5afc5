"""OpenAI request bodies -> what the engine needs, checked field by field.

Every mistake a client can make becomes an ApiError naming the field (OpenAI's error shape);
unknown fields are ignored, as OpenAI does.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import UserError
from ...prompting import chat_ids, completion_ids
from ...sampling_defaults import sampling_params
from ...types import SamplingParams

MAX_N = 128


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
    if lo is not None and value < lo or hi is not None and value > hi:
        rng = f"between {lo} and {hi}" if lo is not None and hi is not None else (
            f"at least {lo}" if lo is not None else f"at most {hi}")
        raise ApiError(400, f"{name} must be {rng}, got {value}.", name)
    return value


def _stop(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop] if stop else []
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return [s for s in stop if s]
    raise ApiError(400, "stop must be a string or an array of strings.", "stop")


def _logit_bias(body: dict, vocab: int) -> dict[int, float]:
    raw = get(body, "logit_bias", dict, {})
    out = {}
    for k, v in raw.items():
        try:
            tok = int(k)
        except (TypeError, ValueError):
            raise ApiError(400, f"logit_bias keys must be token ids, got {k!r}.", "logit_bias") from None
        if not 0 <= tok < vocab:
            raise ApiError(400, f"logit_bias has token id {tok}, outside the vocabulary (0..{vocab - 1}).",
                           "logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
            raise ApiError(400, f"logit_bias values must be numbers between -100 and 100, got {v!r}.",
                           "logit_bias")
        out[tok] = float(v)
    return out


def _unsupported(body: dict) -> None:
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "response_format (structured output) is not supported by this server yet.",
                       "response_format")
    for name in ("grammar", "adapters", "suffix", "tools"):
        if body.get(name):
            raise ApiError(400, f"{name} is not supported by this server.", name)


def sampling(body: dict, vocab: int, max_context: int, top_logprobs: int,
             generation_config: dict[str, Any] | None = None) -> SamplingParams:
    """The body's sampling fields; absent ones (or null) take the model's defaults (sampling_defaults:
    generation_config.json, else chat sampling with a repetition guard; mistral.rs and OpenAI would
    use greedy / temperature 1). temperature 0 is greedy."""
    max_tokens = get(body, "max_completion_tokens", int, None)
    max_tokens = get(body, "max_tokens", int, max_tokens)
    if max_tokens is not None and not 1 <= max_tokens <= max_context:
        raise ApiError(400, f"max_tokens must be between 1 and the model's context ({max_context}), "
                            f"got {max_tokens}.", "max_tokens")
    top_k = get(body, "top_k", int, None)
    temperature = get(body, "temperature", float, None, 0.0)
    return sampling_params(dict(
        temperature=None if temperature is None else float(temperature),
        top_k=None if top_k is None else max(top_k, 0),  # 0 or -1: no top-k
        top_p=get(body, "top_p", float, None, 0.0, 1.0),
        min_p=get(body, "min_p", float, None, 0.0, 1.0),
        repetition_penalty=get(body, "repetition_penalty", float, None, 1e-6),
        presence_penalty=float(get(body, "presence_penalty", float, 0.0, -2.0, 2.0)),
        frequency_penalty=float(get(body, "frequency_penalty", float, 0.0, -2.0, 2.0)),
        repeat_last_n=get(body, "repeat_last_n", int, None, 0),
        logit_bias=_logit_bias(body, vocab),
        max_tokens=max_tokens,
        stop=_stop(body),
        ignore_eos=get(body, "ignore_eos", bool, False),
        seed=get(body, "seed", int, None),
        logprobs=top_logprobs >= 0,
        top_logprobs=max(top_logprobs, 0),
    ), generation_config)


def _choices(body: dict, prompts: list[list[int]], loaded: Any, top_logprobs: int) -> tuple[int, list[SamplingParams]]:
    n = get(body, "n", int, 1, 1, MAX_N)
    base = sampling(body, loaded.tokenizer.vocab_size, loaded.max_context, top_logprobs,
                    getattr(loaded, "generation_config", None))
    params = []
    for _ in prompts:
        for i in range(n):  # choice i: seed + i, so n choices differ and each is reproducible
            seed = None if base.seed is None else base.seed + i
            params.append(SamplingParams(**{**base.__dict__, "seed": seed}))
    return n, params


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
    return {"role": m["role"], "content": content}


def parse_chat(body: dict, loaded: Any) -> Parsed:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty array of messages.", "messages")
    msgs = [_message_text(m, i) for i, m in enumerate(msgs)]
    _unsupported(body)
    logprobs = get(body, "logprobs", bool, False)
    top = get(body, "top_logprobs", int, 0, 0, 20)
    try:
        ids = chat_ids(loaded, msgs)
    except UserError as e:
        raise ApiError(400, str(e), "messages") from None
    n, params = _choices(body, [ids], loaded, top if logprobs else -1)
    stream, usage = _stream_opts(body)
    return Parsed("chat", [ids], params, n, stream, usage, top if logprobs else None)


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


def parse_completion(body: dict, loaded: Any) -> Parsed:
    prompts, texts = _prompts(body, loaded)
    _unsupported(body)
    top = get(body, "logprobs", int, None, 0, 5)
    n, params = _choices(body, prompts, loaded, -1 if top is None else top)
    stream, usage = _stream_opts(body)
    echo = texts if get(body, "echo", bool, False) else []
    return Parsed("completion", prompts, params, n, stream, usage, top, echo)
