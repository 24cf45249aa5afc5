"""An X-LoRA model folder on a loaded base: its adapters as a bank (one scalings slot per adapted
module), its classifier, and the side paths installed on whichever executor runs the base.

The folder (-x/--xlora-model-id, a directory or a hub repo) holds xlora_config.json,
xlora_classifier.safetensors and one PEFT LoRA folder per adapter, named as in the config's
`adapters` (the classifier's order). An ordering file (-o), when given, must list the same
adapters in the same order; its `layers` map then numbers the slots, as in mistral.rs.
"""
from __future__ import annotations

from pathlib import Path

from ..adapters import xlora
from ..adapters.bank import AdapterBank
from ..adapters.peft_files import CONFIG as ADAPTER_CONFIG
from ..adapters.peft_files import read_adapter
from ..errors import UserError
from .loaded import Loaded


def xlora_dir(model_id: str, token_source: str = "cache") -> Path:
    """Local-first, then the hub (a snapshot of the repo)."""
    from ..hub import resolve_model_dir

    return Path(resolve_model_dir(model_id, token_source, flag="-x/--xlora-model-id"))


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


def attach_xlora(loaded: Loaded, model_id: str, order: str | None = None,
                 tgt_non_granular_index: int | None = None, token_source: str = "cache") -> Loaded:
    """Load the X-LoRA model `model_id` onto `loaded` (its adapters, classifier, side paths)."""
    if tgt_non_granular_index is not None and tgt_non_granular_index < 0:
        raise UserError(f"--tgt-non-granular-index must be 0 or more, got {tgt_non_granular_index}.")
    folder = xlora_dir(model_id, token_source)
    cfg = xlora.read_config(folder)
    hidden = loaded.config.hidden_size
    if cfg.hidden_size != hidden:
        raise UserError(f"{folder / xlora.CONFIG_FILE} says hidden_size {cfg.hidden_size} but the base model "
                        f"has {hidden}; use the X-LoRA model trained for this base model.")
    layers = _ordering_layers(order, cfg, loaded) if order else None
    adapters = [read_adapter(sub, name) for sub, name in zip(adapter_folders(folder, cfg.adapters), cfg.adapters)]
    _check_fits(loaded, adapters, folder)
    modules = sorted({m for a in adapters for m in a.factors})
    slots = xlora.module_slots(modules, layers)
    bank = AdapterBank(adapters, loaded.config.num_hidden_layers, slots)
    clf = xlora.load_classifier(folder, cfg, bank.n_slots)
    clf.tgt_non_granular_index = tgt_non_granular_index
    _install(loaded.model, bank)
    loaded.adapters, loaded.default_adapters, loaded.xlora = bank, [], clf
    return loaded


def _ordering_layers(order: str, cfg: xlora.XLoraConfig, loaded: Loaded) -> dict[str, int] | None:
    from ..adapters.ordering import check_base, read_ordering

    ordering = read_ordering(order)
    check_base(ordering, [loaded.model_id], "the base model option")
    if ordering.order and ordering.order != cfg.adapters:
        raise UserError(f"the ordering file {ordering.path} lists adapters {ordering.order} but the X-LoRA "
                        f"model's {xlora.CONFIG_FILE} has {cfg.adapters}; the classifier needs that order, "
                        "so fix `order` in the ordering file.")
    return ordering.layers or None


def _check_fits(loaded: Loaded, adapters: list, folder: Path) -> None:
    """Every adapted module's sizes against the base: the hidden/intermediate sizes of its config."""
    c = loaded.config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    h, inter = c.hidden_size, c.intermediate_size
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
              "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    for a in adapters:
        for module, (A, B) in a.factors.items():
            leaf = module.rsplit(".", 1)[-1]
            want = shapes.get(leaf)
            layer = int(module.split("layers.", 1)[1].split(".", 1)[0])
            if layer >= c.num_hidden_layers:
                raise UserError(f"adapter {a.name} in {folder} adapts {module} but the base model has "
                                f"{c.num_hidden_layers} layers; use adapters trained for this base model.")
            if want is not None and (B.shape[0], A.shape[1]) != want:
                raise UserError(f"adapter {a.name} in {folder}: {module} maps {A.shape[1]} -> {B.shape[0]} "
                                f"features but the base model's maps {want[1]} -> {want[0]}; the adapter was "
                                "built for another model size.")


def _install(model, bank: AdapterBank) -> None:
    """The side paths on the executor that runs the base: the torch modules, or the native runtime."""
    if hasattr(model, "named_modules"):
        from ..adapters.torch_lora import install

        install(model, bank)  # (CausalLM.forward skips the fused native decoder for adapter rows)
        return
    model.set_adapters(bank)  # the native runtime (backends/native_lora.py)
