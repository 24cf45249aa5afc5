"""The request's tool fields (OpenAI's `tools`, `tool_choice`, `parallel_tool_calls`), checked
once and kept as a ToolRequest. Each mistake is one ParamError naming the field (the server
answers it as a 400 in OpenAI's shape, the Python API raises it)."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ..validation import ParamError

# OpenAI's rule for function names; it also keeps names safe inside grammars and prompts
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_CHOICES = ("auto", "none", "required")


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]  # a JSON schema for the arguments object

    def schema_text(self) -> str:
        return json.dumps(self.parameters, ensure_ascii=False)


@dataclass(frozen=True)
class ToolRequest:
    tools: list[dict[str, Any]]  # as the client sent them: what a chat template gets as `tools`
    functions: list[Function]
    choice: str  # "auto" | "none" | "required" | "function" (one named function)
    name: str | None = None  # the function tool_choice names
    parallel: bool = True  # parallel_tool_calls: more than one call per answer

    @property
    def active(self) -> bool:
        """False when tool_choice is "none": the answer is plain text and tools are not shown."""
        return self.choice != "none"

    def callable(self) -> list[Function]:
        """The functions a call may name: the one tool_choice names, else all of them."""
        if self.choice == "function":
            return [f for f in self.functions if f.name == self.name]
        return list(self.functions)


def _function(tool: Any, i: int) -> Function:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
        raise ParamError(f"{where} must be an object {{\"type\": \"function\", \"function\": {{\"name\", "
                         f"\"description\", \"parameters\"}}}}.", where)
    fn = tool["function"]
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ParamError(f"{where}.function.name must be 1 to 64 letters, digits, underscores or dashes, "
                         f"got {name!r:.80}.", f"{where}.function.name")
    desc = fn.get("description", "")
    if desc is None:
        desc = ""
    if not isinstance(desc, str):
        raise ParamError(f"{where}.function.description must be a string.", f"{where}.function.description")
    params = fn.get("parameters")
    if params is None:  # OpenAI: a function without parameters takes an empty object
        params = {"type": "object", "properties": {}, "additionalProperties": False}
    if not isinstance(params, dict):
        raise ParamError(f"{where}.function.parameters must be a JSON schema object, got "
                         f"{type(params).__name__}.", f"{where}.function.parameters")
    if params.get("type", "object") != "object":
        raise ParamError(f"{where}.function.parameters must describe an object (\"type\": \"object\"), "
                         f"got type {params.get('type')!r:.40}.", f"{where}.function.parameters")
    return Function(name, desc, params)


def _choice(value: Any, names: list[str]) -> tuple[str, str | None]:
    if value is None:
        return ("auto" if names else "none"), None
    if isinstance(value, str):
        if value not in _CHOICES:
            raise ParamError(f"tool_choice must be \"auto\", \"none\", \"required\" or "
                             f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {value!r:.40}.",
                             "tool_choice")
        if value == "required" and not names:
            raise ParamError("tool_choice is \"required\" but the request has no tools; send tools.", "tool_choice")
        return value, None
    fn = value.get("function") if isinstance(value, dict) and value.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ParamError("tool_choice must be \"auto\", \"none\", \"required\" or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}.", "tool_choice")
    if name not in names:
        known = ", ".join(names) if names else "none"
        raise ParamError(f"tool_choice names the function {name!r:.80}, which is not in tools "
                         f"(functions: {known:.200}); name one of them.", "tool_choice")
    return "function", name


def parse_tools(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> ToolRequest | None:
    """The three fields checked; None when the request has no tools and no tool_choice
    (tool_choice "none" alone also gives None: nothing changes)."""
    if tools is not None and not isinstance(tools, list):
        raise ParamError(f"tools must be an array of {{\"type\": \"function\", \"function\": {{...}}}} "
                         f"objects, got {type(tools).__name__}.", "tools")
    functions = [_function(t, i) for i, t in enumerate(tools or [])]
    names = [f.name for f in functions]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ParamError(f"tools[{i}].function.name {name!r} is given twice; function names must "
                             f"be unique.", f"tools[{i}].function.name")
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ParamError(f"parallel_tool_calls must be a boolean, got {parallel_tool_calls!r:.40}.",
                         "parallel_tool_calls")
    choice, name = _choice(tool_choice, names)
    if not functions:
        return None
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    return ToolRequest(list(tools), functions, choice, name, parallel)
