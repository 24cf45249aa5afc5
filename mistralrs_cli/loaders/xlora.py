"""The X-LoRA loading step (`x-lora`, `x-lora-gguf`, `x-lora-ggml`): an X-LoRA model folder on a
base model: its adapters as a bank (one scalings slot per adapted module), its classifier, and the
side paths on whichever executor runs the base.

The folder (-x/--xlora-model-id, a directory or a hub repo) holds xlora_config.json,
xlora_classifier.safetensors and one PEFT LoRA folder per adapter, named as in the config's
`adapters` (the classifier's order). An ordering file (-o), when given, must list the same
adapters in the same order; its `layers` map then numbers the slots, as in mistral.rs. The
folder's files are all read and checked before the base model loads.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .. import hub
from ..adapters import xlora
from ..adapters.bank import AdapterBank, AdapterFactors
from ..adapters.peft_files import CONFIG as ADAPTER_CONFIG
from ..adapters.peft_files import check_fits, read_adapter
from ..errors import UserError
from ..types import LoadOptions, PlainSpec, XLoraSpec
from .loaded import Loaded


@dataclass
class XLoraFiles:
    folder: Path
    config: xlora.XLoraConfig
    adapters: list[AdapterFactors]
    layers: dict[str, int] | None  # the ordering's module -> slot map, if one was given


def adapter_folders(folder: Path, names: list[str]) -> list[Path]:
    out = []
    for name in names:
        sub = folder / name
        if not (sub / ADAPTER_CONFIG).is_file():
            found = sorted(p.name for p in folder.iterdir() if (p / ADAPTER_CONFIG).is_file())
            listed = ", ".join(found) if found else "none"
            raise UserError(f"{folder / xlora.CONFIG_FILE} names adapter {name} but {folder} has no folder "
                            f"{name} with {ADAPTER_CONFIG} (adapter folders found: {listed}); put each "
                            "adapter's PEFT files in a folder named as in `adapters`.")
        out.append(sub)
    return out


def read_xlora(model_id: str, order: str | None, base_ids: list[str], base_flag: str,
               token_source: str = "cache") -> XLoraFiles:
    """The X-LoRA folder's config and adapters, and the ordering's slots, all checked."""
    folder = hub.resolve_model_dir(model_id, token_source, flag="-x/--xlora-model-id")
    cfg = xlora.read_config(folder)
    layers = _ordering_layers(order, cfg, base_ids, base_flag) if order else None
    adapters = [read_adapter(sub, name) for sub, name in zip(adapter_folders(folder, cfg.adapters), cfg.adapters)]
    return XLoraFiles(folder, cfg, adapters, layers)


def _ordering_layers(order: str, cfg: xlora.XLoraConfig, base_ids: list[str], flag: str) -> dict[str, int] | None:
    from ..adapters.ordering import check_base, read_ordering

    ordering = read_ordering(order)
    check_base(ordering, base_ids, flag)
    if ordering.order and ordering.order != cfg.adapters:
        raise UserError(f"the ordering file {ordering.path} lists adapters {ordering.order} but the X-LoRA "
                        f"model's {xlora.CONFIG_FILE} has {cfg.adapters}; the classifier needs that order, "
                        "so fix `order` in the ordering file.")
    return ordering.layers or None


def build(loaded: Loaded, files: XLoraFiles, tgt_non_granular_index: int | None) -> Loaded:
    """The bank and classifier on a loaded base (Loaded.adapters / .xlora); the executor gets the
    bank afterwards (loaders/lora.py attach)."""
    from .lora import _shapes

    if tgt_non_granular_index is not None and tgt_non_granular_index < 0:
        raise UserError(f"--tgt-non-granular-index must be 0 or more, got {tgt_non_granular_index}.")
    cfg, hidden = files.config, loaded.config.hidden_size
    if cfg.hidden_size != hidden:
        raise UserError(f"{files.folder / xlora.CONFIG_FILE} says hidden_size {cfg.hidden_size} but the base "
                        f"model has {hidden}; use the X-LoRA model trained for this base model.")
    shapes = _shapes(loaded.model, loaded.config)
    for a, sub in zip(files.adapters, adapter_folders(files.folder, cfg.adapters)):
        check_fits(a, sub, shapes, loaded.config.model_type)
    modules = sorted({m for a in files.adapters for m in a.factors})
    bank = AdapterBank(files.adapters, loaded.config.num_hidden_layers, xlora.module_slots(modules, files.layers))
    clf = xlora.load_classifier(files.folder, cfg, bank.n_slots)
    clf.tgt_non_granular_index = tgt_non_granular_index
    loaded.adapters, loaded.default_adapters, loaded.xlora = bank, [], clf
    return loaded


def _base_from_order(spec: XLoraSpec) -> XLoraSpec:
    """x-lora without -m: the base is the ordering's base_model_id (as mistral.rs and the seed's
    `x-lora-plain -o orderings/xlora-paper-ordering.json -x lamm-mit/x-lora`)."""
    if not isinstance(spec.base, PlainSpec) or spec.base.model_id:
        return spec
    model_id = None
    if spec.order:
        from ..adapters.ordering import read_ordering

        model_id = read_ordering(spec.order).base_model_id
    if not model_id:
        raise UserError("x-lora needs the base model: pass -m/--model-id, or an -o/--order file whose "
                        "base_model_id names it.")
    return replace(spec, base=replace(spec.base, model_id=model_id))


def load_xlora(spec: XLoraSpec, opts: LoadOptions, load_base) -> Loaded:
    """load_base: load.py's loader of the base's spec type, passed down (importing load.py here
    would be an import cycle)."""
    from .lora import _base_ids

    spec = _base_from_order(spec)
    ids, flag = _base_ids(spec.base)
    files = read_xlora(spec.xlora_model_id, spec.order, ids, flag, opts.token_source)
    loaded = load_base(spec.base, opts)
    return build(loaded, files, spec.tgt_non_granular_index)


def attach_xlora(loaded: Loaded, model_id: str, order: str | None = None,
                 tgt_non_granular_index: int | None = None, token_source: str = "cache") -> Loaded:
    """An X-LoRA model onto an already loaded base, side paths installed (the Python API's and
    the tests' way; the subcommands go through load_xlora and load.py)."""
    from .lora import attach

    files = read_xlora(model_id, order, [loaded.model_id], "the base model", token_source)
    build(loaded, files, tgt_non_granular_index)

    def refuse():
        raise UserError("the native runtime does not take this X-LoRA model's adapters; load the base "
                        "on the torch path (LoadOptions(runtime=\"torch\")).")
    return attach(loaded, LoadOptions(device="cpu"), refuse)
