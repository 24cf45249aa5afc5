"""The LoRA loading step (`lora`, `lora-gguf`, `lora-ggml`): ordering file -> adapter folders ->
the base model -> merged weights, or an AdapterBank served beside the base weights.

Everything about the ordering and the adapter files is checked before the base model loads, so
a mistake costs no load time. A float checkpoint with no preload_adapters gets its adapters merged
(W += scale B A, peft's merge_and_unload) and is served as a plain model. A quantized base (GGUF,
GGML, --isq) keeps them unmerged: merged into re-quantized blocks the delta of a small adapter
mostly falls below a quantization step. So do preloads (requests choose among adapters).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from .. import hub
from ..adapters.bank import AdapterBank, AdapterFactors
from ..adapters.ordering import Ordering, adapter_folder, check_base, check_targets, read_ordering
from ..adapters.peft_files import CONFIG, check_fits, read_adapter
from ..errors import UserError
from ..models.config import ModelConfig
from ..types import LoadOptions, LoraSpec, PlainSpec
from .loaded import Loaded

log = logging.getLogger(__name__)


def _base_ids(base) -> tuple[list[str], str]:
    """The names the model to load goes by (for base_model_id), and the flag that gave them."""
    if isinstance(base, PlainSpec):
        return [base.model_id], "-m/--model-id"
    return [base.quantized_model_id or base.quantized_filename, base.quantized_filename], "-m/-f"


def _preload_dir(ordering: Ordering, name: str, model_id: str, opts: LoadOptions) -> Path:
    folder = hub.resolve_model_dir(model_id, opts.token_source, flag=f"preload_adapters {name} in {ordering.path}")
    if not (folder / CONFIG).is_file() and (folder / name / CONFIG).is_file():
        folder = folder / name  # an adapters directory holding this adapter's folder
    return folder


def read_adapters(spec: LoraSpec, opts: LoadOptions) -> tuple[Ordering, list[tuple[AdapterFactors, Path]]]:
    """The ordering and every adapter it names (order first, then the preloads), all checked
    against each other."""
    ordering = read_ordering(spec.order)
    ids, flag = _base_ids(spec.base)
    check_base(ordering, ids, flag)
    folders = []
    if ordering.order:
        wanted = [f"{n}/*" for n in ordering.order]  # from the Hub: only the folders the ordering names
        adapters_dir = hub.resolve_model_dir(spec.adapters_model_id, opts.token_source, wanted,
                                             flag="-a/--adapters-model-id")
        folders = [(n, adapter_folder(ordering, adapters_dir, n)) for n in ordering.order]
    folders += [(p.name, _preload_dir(ordering, p.name, p.adapter_model_id, opts)) for p in ordering.preload]
    adapters = [(read_adapter(folder, name), folder) for name, folder in folders]
    check_targets(ordering, [(a.name, set(a.factors)) for a, _ in adapters])
    return ordering, adapters


def config_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of a llama-family model's seven projections, from its config (the
    native runtime has no torch modules to ask)."""
    d, q, kv, inter = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, \
        cfg.num_key_value_heads * cfg.head_dim, cfg.intermediate_size
    per = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
           "self_attn.o_proj": (d, q), "mlp.gate_proj": (inter, d), "mlp.up_proj": (inter, d),
           "mlp.down_proj": (d, inter)}
    return {f"model.layers.{i}.{m}": s for i in range(cfg.num_hidden_layers) for m, s in per.items()}


def _shapes(model, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    if hasattr(model, "named_modules"):
        from ..adapters.torch_lora import module_shapes

        return module_shapes(model)
    return config_shapes(cfg)


def load_lora(spec: LoraSpec, opts: LoadOptions, load_base: Callable[..., Loaded]) -> Loaded:
    """load_base: the base spec's loader (load.LOADERS)."""
    ordering, adapters = read_adapters(spec, opts)
    merge = not ordering.preload and isinstance(spec.base, PlainSpec) and not opts.isq
    loaded = load_base(spec.base, opts)
    shapes = _shapes(loaded.model, loaded.config)
    for a, folder in adapters:
        check_fits(a, folder, shapes, loaded.config.model_type)
    factors = [a for a, _ in adapters]
    if merge:
        from ..adapters.torch_lora import merge_into

        merge_into(loaded.model, factors)  # no bank: default_adapters then names what was merged
    else:
        loaded.adapters = AdapterBank(factors, loaded.config.num_hidden_layers)
    loaded.default_adapters = list(ordering.order)
    return loaded


def attach(loaded: Loaded, opts: LoadOptions, reload: Callable[[], Loaded]) -> Loaded:
    """Hand the bank to the executor, last of all loading steps (after --isq and the native
    decoder): the native runtime's own side path (NativeModel.set_adapters) where it takes these
    adapters, else the torch model's (adapters/torch_lora.py), loading the base on torch if the
    native runtime refuses."""
    bank = loaded.adapters
    if bank is None:
        return loaded
    if opts.device == "cuda":
        raise UserError("LoRA adapters served unmerged run on the CPU; pass --device cpu.")
    if opts.tp != 1:  # each rank installs its slices once the model is split (distributed/tp_lora.py)
        return loaded
    model = loaded.model
    if not hasattr(model, "named_modules"):  # the native runtime
        try:
            model.set_adapters(bank)
            return loaded
        except (ValueError, NotImplementedError) as e:
            log.info("the native runtime does not take these adapters (%s); loading the torch model", e)
            return reload()
    from ..adapters.torch_lora import install

    install(model, bank)
    return loaded
