"""mistral.rs's TOML model selectors (`mistralrs toml -f FILE`), read into the same Spec objects
the subcommands build.

The schema is mistral.rs's (mistralrs-core/src/toml_selector.rs, toml-selectors/*.toml):
top-level `tokenizer_json` and `repeat_last_n`, a `[model]` table, and optionally `[speculative]`
with `gamma` and a `[speculative.draft_model]` table of the same form as `[model]`. mistral.rs
tells the kinds of `[model]` apart by their keys (an untagged enum), and so do we:

  xlora_model_id            -> X-LoRA over the base the other keys describe
  adapters_model_id + order -> LoRA over that base
  quantized_filename        -> GGUF; GGML when the file ends in .bin or gqa/eps/rope_theta is set
  model_id + a vision arch  -> vision-plain
  model_id                  -> plain

Each kind takes the fields of its subcommand (mistral.rs's names), so a selector is exactly what
the command line could say. Relative paths are relative to the working directory, as in mistral.rs.
Every mistake is one sentence naming the file and the key.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError
from .types import GGMLSpec, GGUFSpec, LoraSpec, PlainSpec, SpeculativeSpec, VisionSpec, XLoraSpec

VISION_ARCHS = ("llava", "llava_next", "idefics2", "phi3v")  # mistral.rs's VisionLoaderType names
GGML_ONLY = {"gqa", "eps", "rope_theta"}
DTYPES = ("auto", "f32", "f16", "bf16")

# kind: (required keys, optional keys); values are checked by _TYPES
_GGUF = ({"quantized_filename"}, {"quantized_model_id", "tok_model_id", "tokenizer_json"})
_GGML = ({"quantized_filename"}, {"quantized_model_id", "tok_model_id", "tokenizer_json"} | GGML_ONLY)
_PLAIN = ({"model_id"}, {"arch", "tokenizer_json", "dtype"})
BASES = {"plain": _PLAIN, "gguf": _GGUF, "ggml": _GGML, "vision-plain": ({"model_id", "arch"}, {"tokenizer_json", "dtype"})}
ADAPTERS = {"lora": ({"adapters_model_id", "order"}, set()),
            "x-lora": ({"xlora_model_id"}, {"order", "tgt_non_granular_index"})}
_TYPES = {"gqa": int, "tgt_non_granular_index": int, "gamma": int, "repeat_last_n": int, "eps": float,
          "rope_theta": float}
TOP_KEYS = {"tokenizer_json", "repeat_last_n", "model", "speculative"}


@dataclass
class Selector:
    """What a selector file says: the spec to load, and the settings it carries beside it."""

    spec: Any
    repeat_last_n: int | None = None
    dtype: str | None = None


def read_selector(path: str | Path) -> Selector:
    """The selector in the TOML file at path (UserError, naming the file and key, on any mistake)."""
    doc = _read(Path(path))
    where = str(path)
    _no_unknown(doc, TOP_KEYS, where, "at the top level", "the top level")
    model = _table(doc, "model", where, "")
    top_tok = _typed(doc, "tokenizer_json", where, "")
    spec, dtype = _model_spec(model, where, "model", top_tok)
    spec_table = doc.get("speculative")
    if spec_table is not None:
        spec = _speculative(spec, _table(doc, "speculative", where, ""), where, top_tok)
    return Selector(spec, _typed(doc, "repeat_last_n", where, ""), dtype)


def _read(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"toml -f {path}: no such file.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"toml -f {path} could not be read as UTF-8 text ({e}).") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path} is not valid TOML: {e}.") from None


def _name(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _no_unknown(table: dict[str, Any], allowed: set[str], where: str, what: str, who: str) -> None:
    for key in table:
        if key == "anymoe":
            raise UserError(f"{where}: unknown key 'anymoe' {what}; mistralrs-cli does not implement AnyMoE.")
        if key not in allowed:
            raise UserError(f"{where}: unknown key '{key}' {what}; {who} takes {', '.join(sorted(allowed))}.")


def _table(doc: dict[str, Any], key: str, where: str, prefix: str) -> dict[str, Any]:
    if key not in doc:
        raise UserError(f"{where}: missing table [{_name(prefix, key)}] (the model to load: see "
                        "examples/toml-selectors/).")
    if not isinstance(doc[key], dict):
        raise UserError(f"{where}: '{_name(prefix, key)}' must be a table ([{_name(prefix, key)}]).")
    return doc[key]


def _typed(table: dict[str, Any], key: str, where: str, prefix: str) -> Any:
    """table[key] (None when absent), checked to be a string, or the number _TYPES names."""
    if key not in table:
        return None
    value, want = table[key], _TYPES.get(key, str)
    ok = isinstance(value, want) and not isinstance(value, bool)
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok or (want is int and value < (1 if key == "gamma" else 0)):
        kind = {int: "a non-negative integer", float: "a number", str: "a string"}[want]
        kind = "a positive integer" if key == "gamma" else kind
        raise UserError(f"{where}: '{_name(prefix, key)}' must be {kind}, got {value!r}.")
    return value


def _kinds(model: dict[str, Any], where: str, prefix: str) -> tuple[str | None, str]:
    """(adapter kind or None, base kind) from the keys present, as mistral.rs's untagged enum."""
    if "xlora_model_id" in model and "adapters_model_id" in model:
        raise UserError(f"{where}: [{prefix}] has both xlora_model_id and adapters_model_id; keep one "
                        "(X-LoRA or LoRA).")
    adapter = "x-lora" if "xlora_model_id" in model else "lora" if "adapters_model_id" in model else None
    if "quantized_filename" in model or "quantized_model_id" in model:
        name = str(model.get("quantized_filename", ""))
        base = "ggml" if GGML_ONLY & model.keys() or name.endswith(".bin") else "gguf"
    else:
        base = "vision-plain" if model.get("arch") in VISION_ARCHS else "plain"
    return adapter, base


def _model_spec(model: dict[str, Any], where: str, prefix: str, top_tok: str | None) -> tuple[Any, str | None]:
    adapter, base = _kinds(model, where, prefix)
    required, optional = BASES[base]
    if adapter:
        if base == "vision-plain":
            raise UserError(f"{where}: [{prefix}] puts adapters on a vision model; mistral.rs has no such selector.")
        extra_req, extra_opt = ADAPTERS[adapter]
        required, optional = required | extra_req, optional | extra_opt
        if base == "plain":  # the ordering's base_model_id may name the model (as in mistral.rs)
            required, optional = required - {"model_id"}, optional | {"model_id"}
    kind = f"{adapter}-{base}" if adapter else base
    _no_unknown(model, required | optional, where, f"in [{prefix}]", f"a {kind} selector")
    for key in sorted(required):
        if key not in model:
            raise UserError(f"{where}: [{prefix}] needs '{key}' for a {kind} selector.")
    v = {key: _typed(model, key, where, prefix) for key in model}
    tok_json = v.get("tokenizer_json") or top_tok
    dtype = v.get("dtype")
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"{where}: '{prefix}.dtype' must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    spec = _base_spec(base, v, tok_json)
    if adapter == "lora":
        if isinstance(spec, PlainSpec) and spec.model_id is None:
            spec.model_id = _ordering_base(v["order"], where, prefix)
        spec = LoraSpec(spec, v["adapters_model_id"], v["order"])
    elif adapter == "x-lora":
        spec = XLoraSpec(spec, v["xlora_model_id"], v.get("order"), v.get("tgt_non_granular_index"))
    return spec, dtype


def _base_spec(base: str, v: dict[str, Any], tok_json: str | None) -> Any:
    if base == "gguf":
        return GGUFSpec(v["quantized_filename"], v.get("quantized_model_id"), v.get("tok_model_id"), tok_json)
    if base == "ggml":
        return GGMLSpec(v["quantized_filename"], v.get("quantized_model_id"), v.get("tok_model_id"), tok_json,
                        v.get("gqa", 1), v.get("eps", 1e-5), v.get("rope_theta", 10000.0))
    if base == "vision-plain":
        return VisionSpec(v["model_id"], v["arch"], tok_json)
    return PlainSpec(v.get("model_id"), v.get("arch"), tok_json)


def _ordering_base(order: str, where: str, prefix: str) -> str:
    from .adapters.ordering import read_ordering

    base = read_ordering(order).base_model_id
    if not base:
        raise UserError(f"{where}: [{prefix}] needs 'model_id' (the ordering file {order} names no base_model_id).")
    return base


def _speculative(target: Any, table: dict[str, Any], where: str, top_tok: str | None) -> SpeculativeSpec:
    _no_unknown(table, {"gamma", "draft_model"}, where, "in [speculative]", "[speculative]")
    if "gamma" not in table:
        raise UserError(f"{where}: [speculative] needs 'gamma' (draft tokens per step, e.g. gamma = 5).")
    gamma = _typed(table, "gamma", where, "speculative")
    draft, _ = _model_spec(_table(table, "draft_model", where, "speculative"), where, "speculative.draft_model",
                           top_tok)
    for role, spec in (("[model]", target), ("[speculative.draft_model]", draft)):
        if not isinstance(spec, (PlainSpec, GGUFSpec, GGMLSpec)):
            raise UserError(f"{where}: speculative decoding takes a plain, GGUF or GGML model as {role}, "
                            f"not {type(spec).__name__.removesuffix('Spec')}.")
    return SpeculativeSpec(target, draft, gamma)


def for_command_line(ctx: Any, path: str) -> Any:
    """`mistralrs toml -f FILE`: the selector's spec; its dtype and repeat_last_n become the global
    --dtype and --repeat-last-n unless those flags were given (a flag on the command line wins)."""
    sel = read_selector(path)
    root, opts = ctx.find_root(), ctx.obj

    def unset(param: str) -> bool:
        source = root.get_parameter_source(param)
        return source is None or source.name == "DEFAULT"

    if sel.dtype is not None and unset("dtype"):
        opts.load.dtype = sel.dtype
    if sel.repeat_last_n is not None and unset("repeat_last_n") and hasattr(opts, "sampling"):
        opts.sampling["repeat_last_n"] = sel.repeat_last_n
    return sel.spec
