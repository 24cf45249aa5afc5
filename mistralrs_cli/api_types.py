"""The Python API's requests (the OpenAI fields, checked by validation.py's rules) and its
OpenAI-shaped responses."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from . import validation
from .engine.request import RequestOutput
from .sampling_defaults import sampling_params
from .types import SamplingParams
from .validation import Limits


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
