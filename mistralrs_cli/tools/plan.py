"""How one chat request uses tools, decided once for the server and the Python API alike:
the prompt (tools through the template, or the fallback's system message), the grammar the
call is generated under, and how the output is split into reply text and tool calls."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..types import Grammar
from . import fallback, formats, grammars
from .messages import for_plain_template, nine_char_ids
from .spec import ToolRequest
from .stream import Splitter, assemble

# a tool a template either renders (its name appears in the prompt) or ignores
_PROBE = [{"type": "function", "function": {"name": "probe_tool_7f3a", "description": "probe",
                                            "parameters": {"type": "object", "properties": {}}}}]
_PROBE_MSGS = [{"role": "user", "content": "hi"}]
_renders: dict[str, bool] = {}


def renders_tools(template: Any) -> bool:
    """Whether a chat template shows `tools` to the model: rendered with a probe tool and
    without, the prompts differ and the probe's name is in it. Cached per template text."""
    key = template.source
    if key not in _renders:
        from ..errors import UserError
        try:
            with_tools = template.render(_PROBE_MSGS, tools=_PROBE)
            without = template.render(_PROBE_MSGS, tools=None)
            _renders[key] = with_tools != without and "probe_tool_7f3a" in with_tools
        except UserError:  # a template that fails on tools does not render them
            _renders[key] = False
    return _renders[key]


@dataclass(frozen=True)
class ToolPlan:
    request: ToolRequest | None  # None: tools off (tool_choice "none"), history only
    format: str  # "hermes" | "llama3" | "mistral" | "fallback" | "text"
    grammar: Grammar | None  # what the call is generated under; None: free text

    def splitter(self) -> Splitter:
        if self.request is None:
            return Splitter()
        if self.format == "fallback":
            return fallback.FallbackSplitter()
        return formats.FORMATS[self.format].splitter()

    @staticmethod
    def finish_reason(finish: str | None, calls: int) -> str | None:
        """OpenAI's "tool_calls" when the answer called tools and ended by itself."""
        return "tool_calls" if calls and finish == "stop" else finish

    def message(self, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
        """The non-streamed message for a whole output (the same splitter a stream uses)."""
        s = self.splitter()
        content, calls = assemble(s.feed(text) + s.finish())
        msg: dict[str, Any] = {"role": "assistant", "content": content if content or not calls else None}
        if calls:
            msg["tool_calls"] = calls
        return msg, self.finish_reason(finish, len(calls))


def _specials(tokenizer: Any):
    """marker text -> its id where the vocabulary has it as one special (control) token."""
    added = tokenizer.hf.get_added_tokens_decoder()

    def special_id(text: str) -> int | None:
        tid = tokenizer.hf.token_to_id(text)
        return tid if tid is not None and tid in added and added[tid].special else None
    return special_id


def _native_grammar(fmt: str, req: ToolRequest, tokenizer: Any) -> Grammar | None:
    """The grammar in the template's own format: a call for "required" or a named function;
    for "auto" a call or a reply that holds no call markup (not text then a call: see
    grammars._start)."""
    if fmt == "llama3":
        return grammars.llama3_grammar(req)
    build = grammars.mistral_grammar if fmt == "mistral" else grammars.hermes_grammar
    return build(req, _specials(tokenizer))


def checked(loaded: Any, grammar: Grammar | None, req: ToolRequest) -> Grammar | None:
    """The grammar compiled for this model once (the engine reuses it); a function whose
    parameters schema cannot be enforced is a ParamError naming it."""
    if grammar is None:
        return None
    from ..errors import UserError
    from ..grammar import check
    from ..validation import ParamError

    try:
        check(loaded, grammar, "tools")
    except UserError as e:
        for i, f in enumerate(req.functions):
            where = f"tools[{i}].function.parameters"
            try:
                check(loaded, Grammar("json_schema", f.schema_text()), where)
            except UserError as bad:
                raise ParamError(str(bad), where) from None
        raise ParamError(str(e), "tools") from None
    return grammar


def prepare(loaded: Any, messages: list[dict[str, Any]], req: ToolRequest | None) -> tuple[list[int], ToolPlan | None]:
    """The prompt ids for a chat request and its tool plan (None: no tools and no tool
    messages, a plain chat)."""
    from ..prompting import chat_ids

    has_history = any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if req is None and not has_history:
        return chat_ids(loaded, messages), None
    active = req if req is not None and req.active else None
    template = loaded.chat_template
    if template is not None and renders_tools(template):
        fmt = formats.detect(template.source).name
        if fmt == "mistral":
            messages = nine_char_ids(messages)
        ids = chat_ids(loaded, messages, tools=active.tools if active else None)
        if active is None:
            return ids, ToolPlan(None, "text", None)
        return ids, ToolPlan(active, fmt, checked(loaded, _native_grammar(fmt, active, loaded.tokenizer), active))
    plain = for_plain_template(messages)
    if active is None:
        return chat_ids(loaded, plain), ToolPlan(None, "text", None)
    grammar = checked(loaded, fallback.grammar(active), active)
    return chat_ids(loaded, fallback.with_tools(plain, active)), ToolPlan(active, "fallback", grammar)



def from_fields(loaded: Any, messages: list[dict[str, Any]], tools: Any, tool_choice: Any,
                parallel_tool_calls: Any) -> tuple[list[int], ToolPlan | None]:
    """prepare() for callers holding the raw fields (the Python API): the fields and the
    messages' tool parts checked the server's way (ParamError naming the field)."""
    from .messages import tool_fields
    from .spec import parse_tools

    req = parse_tools(tools, tool_choice, parallel_tool_calls)
    checked_msgs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            from ..validation import ParamError
            raise ParamError(f"messages[{i}] must be a dict with a role and content.", "messages")
        checked_msgs.append({**m, "content": m.get("content") or "", **tool_fields(m, i)})
    return prepare(loaded, checked_msgs, req)
