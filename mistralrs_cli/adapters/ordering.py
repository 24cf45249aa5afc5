"""Ordering files (mistral.rs's format, orderings/README.md): which adapters, in what order, for
which base model and modules. Every mismatch is one sentence naming both sides and what to do.

base_model_id is compared leniently, because one ordering serves a checkpoint, its GGUF and a
local copy alike: both sides are reduced to their last path component, lower-cased, without a
.gguf/.bin extension, a quantization suffix after the first dot, or a trailing -GGUF/-GGML
(`TheBloke/zephyr-7B-beta-GGUF`, `zephyr-7b-beta.Q8_0.gguf` and `HuggingFaceH4/zephyr-7b-beta`
all read `zephyr-7b-beta`). An absent or null base_model_id is not checked.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from .peft_files import CONFIG, read_json_object


@dataclass
class Preload:
    name: str
    adapter_model_id: str


@dataclass
class Ordering:
    path: Path
    base_model_id: str | None
    order: list[str]
    layers: dict[str, int]
    preload: list[Preload] = field(default_factory=list)


def _strings(value: Any, path: Path, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise UserError(f"{path}: `{key}` must be a list of adapter names (non-empty strings); fix the file.")
    if len(set(value)) != len(value):
        raise UserError(f"{path}: `{key}` names an adapter twice; list each once.")
    return value


def _preloads(value: Any, path: Path) -> list[Preload]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise UserError(f"{path}: `preload_adapters` must be a list of {{\"name\", \"adapter_model_id\"}} objects; fix the file.")
    out = []
    for i, p in enumerate(value):
        ok = isinstance(p, dict) and all(isinstance(p.get(k), str) and p.get(k) for k in ("name", "adapter_model_id"))
        if not ok:
            raise UserError(f"{path}: preload_adapters[{i}] needs a `name` and an `adapter_model_id` (strings); fix the file.")
        out.append(Preload(p["name"], p["adapter_model_id"]))
    return out


def read_ordering(path_str: str) -> Ordering:
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise UserError(f"ordering file {path} does not exist; pass one with -o/--order "
                        "(scripts/create_ordering.py writes one).")
    raw = read_json_object(path, "fix the file.", f"ordering file {path} is not a JSON object; see "
                           "orderings/README.md for its fields.", what="ordering file ")
    base = raw.get("base_model_id")
    if base is not None and not isinstance(base, str):
        raise UserError(f"{path}: `base_model_id` must be a string (a model id); fix the file.")
    order = _strings(raw.get("order", []), path, "order")
    layers = raw.get("layers", {})
    # integers; digit strings too (mistral.rs's docs show `"layers": {"...": "123"}`)
    ok = isinstance(layers, dict) and all((isinstance(v, int) and not isinstance(v, bool))
                                          or (isinstance(v, str) and v.isdigit()) for v in layers.values())
    if not ok:
        raise UserError(f"{path}: `layers` must map module names to integers; regenerate it with scripts/create_ordering.py.")
    layers = {k: int(v) for k, v in layers.items()}
    preload = _preloads(raw.get("preload_adapters"), path)
    clash = set(order) & {p.name for p in preload}
    if clash:
        raise UserError(f"{path}: {', '.join(sorted(clash))} is both in `order` and in `preload_adapters`; "
                        "name each adapter once.")
    if not order and not preload:
        raise UserError(f"{path} names no adapters (`order` and `preload_adapters` are empty); add some.")
    return Ordering(path, base or None, order, layers, preload)


def model_key(model_id: str) -> str:
    """The part of a model id the base_model_id check compares (see the module docstring)."""
    name = re.split(r"[\\/]", model_id.rstrip("/\\"))[-1].lower()
    name = re.sub(r"\.(gguf|bin)$", "", name).split(".", 1)[0]
    return re.sub(r"[-_](gguf|ggml)$", "", name)


def check_base(ordering: Ordering, model_ids: list[str], flag: str) -> None:
    """base_model_id names the model loaded (any of its ids: repo or directory, file name)."""
    if ordering.base_model_id is None:
        return
    want = model_key(ordering.base_model_id)
    if any(model_key(m) == want for m in model_ids if m):
        return
    raise UserError(f"the ordering file {ordering.path} is for base model {ordering.base_model_id} but "
                    f"{flag} loads {model_ids[0]}; load that model, or set base_model_id in the ordering "
                    "to this model if its adapters were trained on it.")


def adapter_folder(ordering: Ordering, adapters_dir: Path, name: str) -> Path:
    """The folder of adapter `name` inside the adapters model directory (-a)."""
    folder = adapters_dir / name
    if folder.is_dir():
        return folder
    found = sorted(p.name for p in adapters_dir.iterdir() if (p / CONFIG).is_file()) if adapters_dir.is_dir() else []
    listed = ", ".join(found) if found else "no adapter folders (none holds adapter_config.json)"
    raise UserError(f"the ordering file {ordering.path} names adapter {name} but -a/--adapters-model-id "
                    f"{adapters_dir} has no folder {name} (found: {listed}); fix `order` or the adapters directory.")


def check_targets(ordering: Ordering, adapters: list[tuple[str, set[str]]]) -> None:
    """Every adapted module is in the ordering's `layers` (when it has any), and every adapter
    adapts the same modules."""
    if ordering.layers:
        for name, modules in adapters:
            missing = sorted(modules - set(ordering.layers))
            if missing:
                more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
                raise UserError(f"adapter {name} adapts {missing[0]}{more}, which the ordering file {ordering.path} "
                                "does not list in `layers`; regenerate the ordering for these adapters with "
                                "scripts/create_ordering.py.")
    first, first_modules = adapters[0]
    for name, modules in adapters[1:]:
        if modules != first_modules:
            diff = sorted(modules ^ first_modules)
            raise UserError(f"adapters {first} and {name} adapt different modules ({diff[0]} is adapted by only "
                            f"one of them); every adapter of an ordering must target the same modules.")
