"""load(spec) -> Loaded: every source format ends as the same bundle the engine consumes.

A GGUF file the native runtime serves loads without importing torch (backends/native_model.py);
every torch-backed loader is imported only when used."""
from __future__ import annotations

import ctypes
import dataclasses
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from .. import hub
from ..errors import UserError
from ..sampling_defaults import from_generation_config
from ..types import GGMLSpec, GGUFSpec, LoadOptions, LoraSpec, PlainSpec, SpeculativeSpec, VisionSpec, XLoraSpec
from .gguf_file import GGUFFile
from .loaded import Loaded, read_json as _read_json  # noqa: F401 (Loaded: re-exported)
from .tokenizer import Tokenizer, tokenizer_from_file, tokenizer_from_gguf
from .tokenizer_cache import cache_root, tokenizer_cache_dir  # noqa: F401 (cache_root: re-exported)


log = logging.getLogger(__name__)


def trim_heap() -> None:
    """Return freed heap pages to the OS (glibc keeps them otherwise); a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _tokenizer(spec: GGUFSpec, gf: GGUFFile, opts: LoadOptions) -> tuple[Tokenizer, dict | None, dict | None]:
    tok_json = Path(spec.tokenizer_json) if spec.tokenizer_json else None
    tok_cfg = gen_cfg = None
    if spec.tok_model_id:
        src = spec.tok_model_id
        tok_json = tok_json or hub.resolve_file(src, "tokenizer.json", opts.token_source, flag="-t/--tok-model-id")
        tok_cfg = _read_json(hub.resolve_file(src, "tokenizer_config.json", opts.token_source, required=False, flag="-t/--tok-model-id"))
        gen_cfg = _read_json(hub.resolve_file(src, "generation_config.json", opts.token_source, required=False, flag="-t/--tok-model-id"))
    if tok_json is not None:
        if not hub.probe(tok_json, "is_file"):
            raise UserError(f"tokenizer file {tok_json} does not exist; check --tokenizer-json.")
        tok_cfg = tok_cfg or _special_tokens_from_gguf(gf.metadata)
        eos = (gen_cfg or {}).get("eos_token_id")
        eos = [eos] if isinstance(eos, int) else (eos or [])
        return tokenizer_from_file(tok_json, tok_cfg, eos), tok_cfg, gen_cfg
    cache = tokenizer_cache_dir(gf.path)
    return tokenizer_from_gguf(gf.metadata, cache_path=cache, source=str(gf.path)), None, None


def _special_tokens_from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """A bare tokenizer.json says nothing about BOS/EOS: take them from the GGUF's metadata."""
    tokens = meta.get("tokenizer.ggml.tokens")
    tokens = tokens if isinstance(tokens, Sequence) and not isinstance(tokens, str) else []
    cfg: dict[str, Any] = {}
    for key, name in (("bos", "bos_token"), ("eos", "eos_token")):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        if isinstance(i, (int, np.integer)) and 0 <= int(i) < len(tokens):  # else: not a usable id
            cfg[name] = tokens[int(i)]
    if "tokenizer.ggml.add_bos_token" in meta:
        cfg["add_bos_token"] = bool(meta["tokenizer.ggml.add_bos_token"])
    return cfg


def load_gguf(spec: GGUFSpec, opts: LoadOptions) -> Loaded:
    path = hub.resolve_model_file(spec.quantized_model_id, spec.quantized_filename, opts.token_source,
                                  "GGUF", ".gguf")
    gf = GGUFFile(path)
    # every metadata value checked against the others and the tensors before the tokenizer or
    # any weight is built (the builders below run it again: it is cheap)
    from .gguf_config import gguf_config

    gguf_config(gf)
    _check_template(gf)
    # The weights are repacked on a second thread (its C does not hold Python's lock) while this
    # one builds the tokenizer and compiles the chat template: the tokenizer's CPU time (~0.02 s
    # for Gemma-3's cached one, whose sentencepiece load run.py started on a thread; more when
    # built) and the template's (jinja2 included) then overlap the repack. The order matters: loading a
    # cached tokenizer.json (`tokenizers`' Tokenizer.from_file, ~0.1 s for SmolLM2) keeps Python's
    # lock nearly all along, which used to hold the repack's own Python set-up back until the
    # tokenizer was done; it now starts after the template code's import, by when the repack
    # normally runs in C. Errors are raised in the order of a sequential load: the native
    # model's, the tokenizer's, the torch model's, the template's.
    with ThreadPoolExecutor(1) as pool:
        job = pool.submit(_native_model, gf, opts)
        tokenized = _settle(_template_code)  # imports jinja2: Python work the repack's set-up shares
        if tokenized.error is None:
            tokenized = _settle(_tokenizer, spec, gf, opts)
        if tokenized.error is None:
            tok, tok_cfg, _ = tokenized.value
            templated = _settle(_chat_template, opts, tok, tok_cfg, gf, path)
        model = job.result()
    tok, tok_cfg, gen_cfg = tokenized.get()
    trim_heap()
    if model is not None:
        cfg = model.config
    else:
        from .gguf import load_gguf_model
        from .weights import prepare_weights, set_dtype

        model, cfg = load_gguf_model(gf, opts.numerics)
        set_dtype(model, opts.dtype)
        if opts.tp == 1:  # with --tp, each rank prepares its own slices once they are cut
            prepare_weights(model, release=gf.release)
    template = templated.get()
    name = spec.quantized_model_id or path.name
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
    return Loaded(model, tok, template, cfg, name, set(tok.eos_ids), bos or "", eos or "",
                  from_generation_config(gen_cfg))


@dataclasses.dataclass
class _Settled:
    """A call's result or the exception it raised, to be raised later (load_gguf's error order)."""
    value: Any = None
    error: BaseException | None = None

    def get(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


def _settle(fn, *args) -> _Settled:
    try:
        return _Settled(fn(*args))
    except Exception as e:  # noqa: BLE001 (re-raised by _Settled.get)
        return _Settled(error=e)


def _template_code() -> None:
    """Import the chat-template modules (jinja2), which only the template needs."""
    from . import builtin_templates, chat_template  # noqa: F401


def _chat_template(opts: LoadOptions, tok: Tokenizer, tok_cfg: dict | None, gf: GGUFFile, path: Path):
    """--chat-template, tokenizer_config.json's or the file's template, else the built-in one of
    the file's architecture."""
    from .builtin_templates import builtin_template
    from .chat_template import resolve_chat_template

    template = resolve_chat_template(opts.chat_template, tok_cfg, gf.metadata.get("tokenizer.chat_template"))
    if template is None:
        template = builtin_template(gf.architecture, lambda t: tok.hf.token_to_id(t) is not None, path.name)
    return template


def _check_template(gf: GGUFFile) -> None:
    """The embedded chat template is text; anything else is a broken file, said before loading."""
    value = gf.metadata.get("tokenizer.chat_template")
    if value is not None and not isinstance(value, str):
        kind = "an array" if hasattr(value, "__len__") else f"the number {str(value)[:40]}"
        raise UserError(f"{gf.path}: tokenizer.chat_template is {kind}, not text; pass a template "
                        "with --chat-template, or use an undamaged file.")


def _native_model(gf: GGUFFile, opts: LoadOptions):
    """The torch-free model when this file and these options allow it, else None."""
    if (opts.runtime != "auto" or opts.device != "cpu" or opts.numerics not in ("fast", "precise")
            or opts.dtype not in ("auto", "f32") or opts.isq):
        return None
    from ..backends.native_model import ARCHS, NativeModel
    from .gguf_config import gguf_config

    if gf.architecture not in ARCHS:
        return None
    return NativeModel.build(gf, gguf_config(gf), release=gf.release, numerics=opts.numerics)


def load_ggml(spec: GGMLSpec, opts: LoadOptions) -> Loaded:
    from .ggml import load_ggml as load

    return load(spec, opts)


def load_plain(spec: PlainSpec, opts: LoadOptions) -> Loaded:
    from .plain import load_plain as load

    return load(spec, opts)


def load_lora(spec: LoraSpec, opts: LoadOptions) -> Loaded:
    from .lora import load_lora as load

    return load(spec, opts, LOADERS[type(spec.base)])  # passed down: lora.py importing us would be a cycle


def load_xlora(spec: XLoraSpec, opts: LoadOptions) -> Loaded:
    from .xlora import load_xlora as load

    return load(spec, opts, lambda base, o: LOADERS[type(base)](base, o))  # as load_lora


def load_vision(spec: VisionSpec, opts: LoadOptions) -> Loaded:
    from .vision import load_vision as load

    return load(spec, opts)


LOADERS = {GGUFSpec: load_gguf, GGMLSpec: load_ggml, PlainSpec: load_plain, LoraSpec: load_lora,
           XLoraSpec: load_xlora, VisionSpec: load_vision}


def _no_nvidia_device() -> bool:
    """True when this machine certainly has no NVIDIA GPU (no driver): --device auto then needs
    neither CuPy nor torch to decide."""
    return not (Path("/proc/driver/nvidia").exists() or Path("/dev/nvidiactl").exists()
                or Path("/dev/dxg").exists())  # WSL's GPU node


def _resolve_device(opts: LoadOptions) -> LoadOptions:
    """auto -> cuda when CuPy finds a GPU, else cpu (a one-line notice at info level); cuda with
    no usable GPU is an error. The CUDA kernels multiply exactly
    dequantized weights, so a GPU load uses numerics="exact"."""
    if opts.device == "cpu" or (opts.device == "auto" and _no_nvidia_device()):
        if opts.device == "auto":
            log.info("--device auto: no NVIDIA GPU on this machine; running on the CPU")
        if opts.num_device_layers:
            log.warning("-n/--num-device-layers %d: there is no GPU; every layer runs on the CPU",
                        opts.num_device_layers)
        return dataclasses.replace(opts, device="cpu")
    from ..backends.cupy_backend import resolve_device

    device, notice = resolve_device("cuda" if opts.device.startswith("cuda") else opts.device)
    if notice:  # auto on a machine without a GPU: expected, so only with --log info / -v
        log.info(notice)
    if device == "cpu":
        if opts.num_device_layers:
            log.warning("-n/--num-device-layers %d: there is no GPU; every layer runs on the CPU",
                        opts.num_device_layers)
        return dataclasses.replace(opts, device="cpu")
    return dataclasses.replace(opts, device="cuda", numerics="exact")


def _place_on_gpu(model, opts: LoadOptions) -> None:
    from ..backends import cupy_backend, placement

    p = placement.place_layers(model.config.num_hidden_layers, opts.num_device_layers)
    if p.warning:
        log.warning(p.warning)
    placement.assign_backends(model, p, cupy_backend.CupyBackend())
    model.native = None  # the CPU executor would bypass the GPU backend


def load(spec: Any, opts: LoadOptions | None = None) -> Loaded:
    if opts is not None and opts.tp != 1:  # every rank loads, then shards (distributed/launch.py)
        from ..distributed.launch import load_sharded

        # the device first: --device auto on a GPU machine means NCCL, and every rank loads alike
        return load_sharded(spec, _resolve_device(opts), _load_one)
    return _load_one(spec, opts)


def _load_one(spec: Any, opts: LoadOptions | None = None) -> Loaded:
    if isinstance(spec, SpeculativeSpec):  # two models, each loaded as its own spec
        from .speculative import load_speculative

        return load_speculative(spec, opts or LoadOptions(), load)
    opts = opts or LoadOptions()
    if isinstance(spec, LoraSpec) and opts.device == "auto":  # the side paths run on the CPU executors
        opts = dataclasses.replace(opts, device="cpu")
    opts = _resolve_device(opts)
    if opts.isq:
        from ..quant.isq import isq_model, parse_isq
    base = spec.base if isinstance(spec, (LoraSpec, XLoraSpec)) else spec
    if opts.isq and parse_isq(opts.isq) and isinstance(base, (GGUFSpec, GGMLSpec)):  # as mistral.rs
        kind = "GGUF" if isinstance(base, GGUFSpec) else "GGML"
        raise UserError(f"--isq applies to plain (safetensors) models; this {kind} file is already "
                        "quantized, so run it without --isq.")
    loaded = LOADERS[type(spec)](spec, opts)
    if opts.isq:
        isq_model(loaded.model, opts.isq, opts.numerics)
    if opts.device == "cuda":
        _place_on_gpu(loaded.model, opts)
    elif getattr(loaded.model, "native", False) is None and opts.tp == 1:  # a torch model: GGML files and ISQ'd checkpoints qualify as GGUF ones do
        from ..backends.native_decoder import NativeDecoder

        loaded.model.native = NativeDecoder.build(loaded.model)
    if isinstance(spec, (LoraSpec, XLoraSpec)):  # adapters served unmerged go to the executor last
        from .lora import attach

        loaded = attach(loaded, opts, lambda: load(spec, dataclasses.replace(opts, runtime="torch")))
    if opts.spec_ngram is not None:  # draft-free speculation (engine/drafts.py NgramDraft)
        from .speculative import ngram_config

        loaded.speculative = ngram_config(opts.spec_ngram)
    return loaded
