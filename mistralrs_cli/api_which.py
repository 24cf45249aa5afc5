"""The Python API's model sources, named as in mistral.rs's (Which.GGUF(...), VisionArchitecture),
and the rewording of the loaders' messages into the Python fields a caller sets."""
from __future__ import annotations

import enum
import re
from contextlib import contextmanager
from typing import Any, Iterator

from .errors import UserError
from .types import GGMLSpec, GGUFSpec, LoraSpec, PlainSpec, SpeculativeSpec, VisionSpec, XLoraSpec
from .validation import ParamTypeError


class Which:
    """Model sources, named as in mistral.rs's Python API."""

    @staticmethod
    def GGUF(quantized_model_id: str | None, quantized_filename: str, tok_model_id: str | None = None,
             tokenizer_json: str | None = None, **_ignored: Any) -> GGUFSpec:
        return GGUFSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json)

    @staticmethod
    def GGML(tok_model_id: str | None = None, quantized_model_id: str | None = None,
             quantized_filename: str | None = None, tokenizer_json: str | None = None, gqa: int = 1,
             eps: float = 1e-5, rope_theta: float = 10000.0, **_ignored: Any) -> GGMLSpec:
        if not quantized_filename:
            raise UserError("Which.GGML needs quantized_filename (the GGML .bin file).")
        return GGMLSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json,
                        1 if gqa is None else int(gqa), eps, rope_theta)

    @staticmethod
    def Plain(model_id: str, arch: str | None = None, tokenizer_json: str | None = None,
              **_ignored: Any) -> PlainSpec:
        return PlainSpec(model_id, arch, tokenizer_json)

    @staticmethod
    def VisionPlain(model_id: str, arch: Any = None, tokenizer_json: str | None = None,
                    quantized_filename: str | None = None, **_ignored: Any) -> VisionSpec:
        """A vision-language checkpoint (llava); arch may be a name or an enum with that value;
        quantized_filename: the language model's weights from this GGUF (as vision-plain -f)."""
        arch = getattr(arch, "value", arch)
        return VisionSpec(model_id, None if arch is None else str(arch), tokenizer_json, quantized_filename)

    @staticmethod
    def Lora(model_id: str, adapters_model_id: str, order: str, arch: str | None = None,
             tokenizer_json: str | None = None, **_ignored: Any) -> LoraSpec:
        """A plain checkpoint with the PEFT LoRA adapters the ordering file `order` names."""
        return LoraSpec(PlainSpec(model_id, arch, tokenizer_json), adapters_model_id, order)

    @staticmethod
    def LoraGGUF(quantized_model_id: str | None, quantized_filename: str, adapters_model_id: str, order: str,
                 tok_model_id: str | None = None, tokenizer_json: str | None = None, **_ignored: Any) -> LoraSpec:
        return LoraSpec(GGUFSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json),
                        adapters_model_id, order)

    @staticmethod
    def LoraGGML(adapters_model_id: str, order: str, tok_model_id: str | None = None,
                 quantized_model_id: str | None = None, quantized_filename: str | None = None,
                 tokenizer_json: str | None = None, gqa: int = 1, eps: float = 1e-5, rope_theta: float = 10000.0,
                 **_ignored: Any) -> LoraSpec:
        if not quantized_filename:
            raise UserError("Which.LoraGGML needs quantized_filename (the GGML .bin file).")
        return LoraSpec(GGMLSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json,
                                 1 if gqa is None else int(gqa), eps, rope_theta), adapters_model_id, order)

    @staticmethod
    def XLora(xlora_model_id: str, order: str | None = None, tgt_non_granular_index: int | None = None,
              model_id: str | None = None, tokenizer_json: str | None = None, arch: str | None = None,
              **_ignored: Any) -> XLoraSpec:
        """A plain checkpoint with an X-LoRA model; model_id defaults to the ordering's base_model_id."""
        return XLoraSpec(PlainSpec(model_id, arch, tokenizer_json), xlora_model_id, order, tgt_non_granular_index)

    @staticmethod
    def XLoraGGUF(quantized_model_id: str | None, quantized_filename: str, xlora_model_id: str,
                  order: str | None = None, tgt_non_granular_index: int | None = None,
                  tok_model_id: str | None = None, tokenizer_json: str | None = None, **_ignored: Any) -> XLoraSpec:
        return XLoraSpec(GGUFSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json),
                         xlora_model_id, order, tgt_non_granular_index)

    @staticmethod
    def XLoraGGML(xlora_model_id: str, order: str | None = None, tgt_non_granular_index: int | None = None,
                  tok_model_id: str | None = None, quantized_model_id: str | None = None,
                  quantized_filename: str | None = None, tokenizer_json: str | None = None, gqa: int = 1,
                  eps: float = 1e-5, rope_theta: float = 10000.0, **_ignored: Any) -> XLoraSpec:
        if not quantized_filename:
            raise UserError("Which.XLoraGGML needs quantized_filename (the GGML .bin file).")
        return XLoraSpec(GGMLSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json,
                                  1 if gqa is None else int(gqa), eps, rope_theta),
                         xlora_model_id, order, tgt_non_granular_index)


# The loaders' messages name command-line flags; a Python caller set these fields instead.
_COMMON_FIELDS = {"-c/--chat-template": "chat_template", "--chat-template": "chat_template",
                  "--token-source": "token_source", "--numerics": "numerics", "--isq": "isq",
                  "--dtype": "dtype", "--raw": "a CompletionRequest", "--truncate-sequence": "truncate_sequence",
                  "--pa-gpu-mem": "engine_config.kv_mem_mb", "--pa-ctxt-len": "engine_config.kv_tokens",
                  "--tp": "tensor_parallel_size", "--dist-backend": "dist_backend"}
_SPEC_FIELDS = {
    GGUFSpec: {"-m/-f": "quantized_model_id/quantized_filename", "-m/--quantized-model-id": "quantized_model_id",
               "-m": "quantized_model_id", "-f": "quantized_filename", "-t/--tok-model-id": "tok_model_id",
               "-t": "tok_model_id", "--tokenizer-json": "tokenizer_json"},
    PlainSpec: {"-m/--model-id": "model_id", "--model-id": "model_id", "-m": "model_id",
                "-t/--tokenizer-json": "tokenizer_json", "-a/--arch": "arch", "--arch": "arch"},
}
_SPEC_FIELDS[VisionSpec] = {**_SPEC_FIELDS[PlainSpec], "-f/--quantized-filename": "quantized_filename",
                             "--quantized-filename": "quantized_filename", "-f": "quantized_filename"}
_SPEC_FIELDS[GGMLSpec] = {**_SPEC_FIELDS[GGUFSpec], "-t/--tokenizer-json": "tokenizer_json", "--gqa": "gqa",
                          "--eps": "eps", "--rope-theta": "rope_theta"}


_ADAPTER_FIELDS = {"-a/--adapters-model-id": "adapters_model_id", "-o/--order": "order",
                   "-x/--xlora-model-id": "xlora_model_id", "--tgt-non-granular-index": "tgt_non_granular_index"}


def python_field_names(message: str, spec: Any) -> str:
    """message with each command-line flag it names replaced by the Python field it stands for."""
    names = {**_COMMON_FIELDS, **_SPEC_FIELDS.get(type(spec), {})}
    if isinstance(spec, (LoraSpec, XLoraSpec)):  # the base's fields, and the adapters'
        names.update({**_SPEC_FIELDS.get(type(spec.base), {}), **_ADAPTER_FIELDS})
    flags = "|".join(re.escape(f) for f in sorted(names, key=len, reverse=True))
    return re.sub(rf"(?<![\w/-])({flags})(?![\w/-])", lambda m: names[m.group(1)], message)


@contextmanager
def _python_fields(spec: Any) -> Iterator[None]:
    """Re-raise a UserError with the Python field names (the same exception, reworded)."""
    try:
        yield
    except UserError as e:
        e.args = (python_field_names(str(e), spec), *e.args[1:])
        raise


def _speculative(which: Any, which_draft: Any, gamma: Any) -> SpeculativeSpec:
    from .loaders.speculative import check_gamma

    if not isinstance(which, (GGUFSpec, GGMLSpec, PlainSpec)) or not isinstance(which_draft, (GGUFSpec, GGMLSpec, PlainSpec)):
        raise ParamTypeError("which and which_draft must each be Which.GGUF(...), Which.GGML(...) or Which.Plain(...) "
                             "for speculative decoding.", "which_draft")
    return SpeculativeSpec(which, which_draft, check_gamma(gamma, "speculative_gamma"))


def _check_which(which: Any) -> None:
    if not isinstance(which, (GGUFSpec, GGMLSpec, PlainSpec, LoraSpec, XLoraSpec, SpeculativeSpec, VisionSpec)):
        raise ParamTypeError(f"which must be a model source made by Which.GGUF(...), Which.GGML(...) or "
                         f"Which.Plain(...), got {type(which).__name__} {which!r:.80}.", "which")


class VisionArchitecture(str, enum.Enum):
    """mistral.rs's names for Which.VisionPlain(arch=...): the ones this build runs."""
    LLaVA = "llava"
    LLaVANext = "llava_next"
    Gemma3 = "gemma3"
    Idefics3 = "idefics3"
    Idefics2 = "idefics2"
    Phi3V = "phi3v"
