"""One set of rules for every sampling and engine parameter, shared by the command line, the
Python API and the HTTP server: the same checks and the same sentence everywhere, with the
parameter named the way each surface names it (`--min-p` on the command line, `min_p` in a JSON
body or a Python request). A broken rule raises ParamError, a UserError that also carries the
field, so the server can answer OpenAI's 400 with `param` set.

The sizes a request may ask for (body bytes, JSON depth, stop strings, n, top_logprobs,
logit_bias entries) are in Limits, one dataclass whose fields each have a command-line flag
(`--max-stop-strings` for max_stop_strings, ...) so an operator can raise them.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass, fields
from typing import Any, Callable, Mapping

from .errors import UserError

MAX_SEED = 2**64 - 1  # numpy's and mistral.rs's seeds are u64
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for a bias value


class ParamError(UserError):
    """A UserError about one parameter; `field` is its Python/JSON name (OpenAI's `param`)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


class ParamTypeError(ParamError, TypeError):
    """A parameter of the wrong type: Python callers may catch it as the TypeError it is."""


Namer = Callable[[str], str]


def flag(name: str) -> str:
    """The command line's name of a field: min_p -> --min-p."""
    return "--" + name.replace("_", "-")


def field(name: str) -> str:
    """JSON bodies and Python requests name fields as SamplingParams does."""
    return name


def python_limit(name: str) -> str:
    """How a Python caller raises a limit: Runner(limits=Limits(max_n=...))."""
    return f"Runner(limits=Limits({name}=...))"


@dataclass
class Limits:
    """What one request may ask for; each field has a flag named after it (--max-body-bytes ...).
    OpenAI allows 4 stop strings; 16 leaves room for clients written for other servers while
    bounding the work of matching them (stop strings x their length per generated token)."""

    max_body_bytes: int = 16 * 1024 * 1024
    max_json_depth: int = 64
    max_stop_strings: int = 16
    max_stop_length: int = 256
    max_n: int = 128
    max_top_logprobs: int = 20  # OpenAI's bound
    max_logit_bias: int = 1024  # entries in one logit_bias map
    max_stop_token_ids: int = 1024

    def check(self, name: Namer = flag) -> "Limits":
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParamError(f"{name(f.name)} must be an integer, 1 or more, got {value!r}.", f.name)
        return self


@dataclass(frozen=True)
class Rule:
    integer: bool
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is outside the range
    note: str = ""  # said after the range: what a boundary value means


SAMPLING_RULES: dict[str, Rule] = {
    "temperature": Rule(False, 0.0, note=" (0 is greedy)"),
    "top_p": Rule(False, 0.0, 1.0, lo_open=True, note=" (1 keeps all)"),
    "min_p": Rule(False, 0.0, 1.0, note=" (0 keeps all)"),
    "top_k": Rule(True, -1, note=" (0 or -1 keeps all)"),  # vLLM's clients send -1 for "off"
    "repetition_penalty": Rule(False, 0.0, lo_open=True, note=" (1 is off)"),
    "presence_penalty": Rule(False, -2.0, 2.0),  # OpenAI's range
    "frequency_penalty": Rule(False, -2.0, 2.0),
    "repeat_last_n": Rule(True, 0, note=" (0: the whole context)"),
    "max_tokens": Rule(True, 1),
    "seed": Rule(True, 0, MAX_SEED),
    "n": Rule(True, 1),
    "top_logprobs": Rule(True, 0),
}

# Engine settings: the EngineConfig field, its flag, and a sane range (absurd sizes fail here,
# in one line, instead of inside an allocation).
ENGINE_FLAGS = {"max_seqs": "--max-seqs", "block_size": "--pa-blk-size", "kv_mem_mb": "--pa-gpu-mem",
                "kv_mem_fraction": "--pa-gpu-mem-usage", "kv_tokens": "--pa-ctxt-len",
                "prefix_cache_n": "--prefix-cache-n", "max_batch_tokens": "max_batch_tokens"}
ENGINE_RULES: dict[str, Rule] = {
    "max_seqs": Rule(True, 1, 8192),
    "block_size": Rule(True, 1, 1024),
    "kv_mem_mb": Rule(False, 0.0, lo_open=True),  # hi: the machine's RAM (total_ram_mb)
    "kv_mem_fraction": Rule(False, 0.0, 1.0, lo_open=True),
    "kv_tokens": Rule(True, 1, 2**31 - 1),
    "prefix_cache_n": Rule(True, 0, 1_000_000),
    "max_batch_tokens": Rule(True, 1, 2**20),
}


def _num(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e16 else f"{x:g}"


def _range_text(rule: Rule, hi: float | None, hi_text: str | None) -> str:
    hi_s = hi_text or (None if hi is None else _num(hi))
    if rule.lo is None:
        return f"at most {hi_s}"
    if hi_s is None:
        return (f"more than {_num(rule.lo)}" if rule.lo_open else f"{_num(rule.lo)} or more") + rule.note
    if rule.lo_open:
        return f"more than {_num(rule.lo)} and at most {hi_s}{rule.note}"
    return f"between {_num(rule.lo)} and {hi_s}{rule.note}"


def check_value(key: str, value: Any, name: Namer = field, rule: Rule | None = None,
                hi: float | None = None, hi_text: str | None = None) -> Any:
    """value checked against key's rule (type, finite, range; hi overrides the rule's upper bound);
    returns it as the rule's type (an int or a float). hi_text says where hi comes from."""
    rule = rule or SAMPLING_RULES[key]
    kind = "an integer" if rule.integer else "a number"
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy's scalars too
    if not number or (rule.integer and not isinstance(value, numbers.Integral)):
        raise ParamTypeError(f"{name(key)} must be {kind}, got {type(value).__name__} {value!r:.80}.", key)
    if not isinstance(value, numbers.Integral) and not math.isfinite(value):
        raise ParamError(f"{name(key)} must be a finite number, got {value!r}.", key)
    hi = rule.hi if hi is None else hi
    below = rule.lo is not None and (value <= rule.lo if rule.lo_open else value < rule.lo)
    if below or (hi is not None and value > hi):
        raise ParamError(f"{name(key)} must be {_range_text(rule, hi, hi_text)}, got {value!r}.", key)
    return int(value) if rule.integer else float(value)


def check_token_ids(key: str, ids: Any, vocab: int | None, name: Namer = field,
                    limit: tuple[int, str] | None = None) -> list[int]:
    """A sequence of token ids, each in 0..vocab-1 (a negative id would index from the end);
    limit: (most ids, the name of the limit that raises it)."""
    if isinstance(ids, (str, bytes, Mapping)) or not hasattr(ids, "__iter__"):
        raise ParamTypeError(f"{name(key)} must be a list of token ids, got {type(ids).__name__}.", key)
    ids = list(ids)
    if limit is not None and len(ids) > limit[0]:
        raise ParamError(f"{name(key)} has {len(ids)} ids, more than the limit of {limit[0]} "
                         f"({limit[1]} raises it).", key)
    for t in ids:
        if isinstance(t, bool) or not isinstance(t, numbers.Integral) or t < 0 or (vocab is not None and t >= vocab):
            span = f"0..{vocab - 1}" if vocab is not None else "0 or more"
            raise ParamError(f"{name(key)} has {t!r:.40}, not a token id of the vocabulary ({span}).", key)
    return [int(t) for t in ids]


def check_logit_bias(bias: Any, vocab: int | None, name: Namer = field, limits: Limits | None = None,
                     limit_name: Namer = flag) -> dict[int, float]:
    """{token id: bias}: ids in the vocabulary (JSON sends them as strings), biases finite numbers
    in [-100, 100] (OpenAI's range)."""
    key, limits = "logit_bias", limits or Limits()
    if not isinstance(bias, Mapping):
        raise ParamError(f"{name(key)} must be a map of token ids to numbers, got {type(bias).__name__}.", key)
    if len(bias) > limits.max_logit_bias:
        raise ParamError(f"{name(key)} has {len(bias)} entries, more than the limit of {limits.max_logit_bias} "
                         f"({limit_name('max_logit_bias')} raises it).", key)
    out: dict[int, float] = {}
    for k, v in bias.items():
        tok = None
        if isinstance(k, numbers.Integral) and not isinstance(k, bool):
            tok = int(k)
        elif isinstance(k, str) and len(k) < 30:  # JSON's keys are strings
            try:
                tok = int(k)
            except ValueError:
                pass
        if tok is None:
            raise ParamError(f"{name(key)} keys must be token ids, got {k!r}.", key)
        if tok < 0 or (vocab is not None and tok >= vocab):
            span = f"0..{vocab - 1}" if vocab is not None else "0 or more"
            raise ParamError(f"{name(key)} has token id {tok}, outside the vocabulary ({span}).", key)
        finite = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        if not finite or not -MAX_LOGIT_BIAS <= v <= MAX_LOGIT_BIAS:
            raise ParamError(f"{name(key)} values must be numbers between -100 and 100, got {v!r}.", key)
        out[tok] = float(v)
    return out


def check_stop(stop: Any, name: Namer = field, limits: Limits | None = None, limit_name: Namer = flag) -> list[str]:
    """A string or a list of strings (empty ones dropped), bounded in count and length: matching
    costs stop strings x their length per generated token."""
    key, limits = "stop", limits or Limits()
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, (list, tuple)) or not all(isinstance(s, str) for s in stops):
        raise ParamError(f"{name(key)} must be a string or an array of strings.", key)
    stops = [s for s in stops if s]
    if len(stops) > limits.max_stop_strings:
        raise ParamError(f"{name(key)} has {len(stops)} strings, more than the limit of "
                         f"{limits.max_stop_strings} ({limit_name('max_stop_strings')} raises it).", key)
    longest = max(map(len, stops), default=0)
    if longest > limits.max_stop_length:
        raise ParamError(f"{name(key)} has a string of {longest} characters, more than the limit of "
                         f"{limits.max_stop_length} ({limit_name('max_stop_length')} raises it).", key)
    return stops


def _names_text(names: list[str], most: int) -> str:
    """Names for a message: quoted, each cut at 40 characters, at most `most` then a count."""
    shown = [repr(n) if len(n) <= 40 else repr(n[:40]) + "..." for n in names[:most]]
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(shown) + more


def check_adapters(value: Any, served: list[str], name: Namer = field, key: str = "adapters") -> list[str] | None:
    """A request's LoRA adapters: None (the engine's active set) or a list of names the model
    serves (`served`), repeats dropped; [] runs the base model alone. A list naming anything the
    model does not serve is refused whole, so its size and its names' lengths are bounded by the
    served set (the message quotes a few names, cut short)."""
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(s, str) for s in value):
        raise ParamTypeError(f"{name(key)} must be a list of adapter names (strings), got "
                             f"{type(value).__name__} {value!r:.80}.", key)
    names = list(dict.fromkeys(value))
    if names and not served:
        raise ParamError(f"{name(key)} names {_names_text(names, 5)}, but this model was loaded without "
                         f"LoRA adapters; drop {name(key)} or load the model with its adapters.", key)
    known = set(served)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ParamError(f"{name(key)} names {_names_text(unknown, 5)}, which this model does not serve; "
                         f"its adapters are {_names_text(list(served), 20)}.", key)
    return names


def check_sampling(values: Mapping[str, Any], name: Namer = field, *, vocab: int | None = None,
                   max_context: int | None = None, limits: Limits | None = None,
                   limit_name: Namer = flag) -> dict[str, Any]:
    """The given (not None) sampling fields, checked and normalized: numbers by SAMPLING_RULES,
    logit_bias and stop_token_ids against the vocabulary, stop by the limits. limit_name names a
    Limits field where a message says what raises it (the server's flags by default)."""
    limits = limits or Limits()
    his = {"n": (limits.max_n, f"{limits.max_n} ({limit_name('max_n')} raises it)"),
           "top_logprobs": (limits.max_top_logprobs,
                            f"{limits.max_top_logprobs} ({limit_name('max_top_logprobs')} raises it)")}
    if max_context is not None:
        his["max_tokens"] = (max_context, f"the model's context ({max_context})")
    out: dict[str, Any] = {}
    for key, value in values.items():
        if value is None:
            continue
        if key in SAMPLING_RULES:
            out[key] = check_value(key, value, name, None, *his.get(key, (None, None)))
        elif key == "logit_bias":
            out[key] = check_logit_bias(value, vocab, name, limits, limit_name)
        elif key == "stop":
            out[key] = check_stop(value, name, limits, limit_name)
        elif key == "stop_token_ids":
            out[key] = check_token_ids(key, value, vocab, name,
                                       (limits.max_stop_token_ids, limit_name("max_stop_token_ids")))
        else:
            out[key] = value
    return out


def check_text(text: str, what: str) -> str:
    """text that is UTF-8 through and through: Python decodes argv (and stdin in some locales)
    with surrogateescape, so invalid bytes arrive as lone surrogates, which the tokenizer refuses."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{what} is not UTF-8 text (an invalid byte at character {e.start}); "
                        "send UTF-8 text.") from None
    return text


def total_ram_mb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20
    except (ValueError, OSError, AttributeError):
        return float(2**20)  # unknown: 1 TiB


def check_engine(values: Mapping[str, Any], name: Namer | None = None) -> dict[str, Any]:
    """EngineConfig fields (not None) checked against ENGINE_RULES; name defaults to the flags."""
    name = name or (lambda k: ENGINE_FLAGS.get(k, k))
    out = {}
    for key, value in values.items():
        if value is None or key not in ENGINE_RULES:
            out[key] = value
            continue
        hi, hi_text = None, None
        if key == "kv_mem_mb":
            hi = total_ram_mb()
            hi_text = f"this machine's RAM ({hi:.0f} MB)"
        out[key] = check_value(key, value, name, ENGINE_RULES[key], hi, hi_text)
    return out


def check_kv_pool(n_bytes: int, what: str) -> None:
    """A KV pool (as --pa-ctxt-len/--pa-blk-size/... sized it) must fit in the machine's RAM."""
    ram = total_ram_mb()
    if n_bytes / 2**20 > ram:
        raise UserError(f"{what} asks for a {n_bytes / 2**20:.0f} MB KV cache, more than this machine's "
                        f"{ram:.0f} MB of RAM; ask for less.")
