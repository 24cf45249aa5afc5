"""Dataclasses that cross stage boundaries: specs (what to load), sampling and engine settings."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GGUFSpec:
    """`mistralrs gguf`: a .gguf file, from a repo or a local dir (-m) or as a bare path (-f)."""

    quantized_filename: str
    quantized_model_id: str | None = None
    tok_model_id: str | None = None  # tokenizer.json / tokenizer_config.json source
    tokenizer_json: str | None = None


@dataclass
class GGMLSpec:
    """`mistralrs ggml`: a GGML v3 'ggjt' llama .bin (-f, optionally in -m) and a tokenizer (-t)."""

    quantized_filename: str
    quantized_model_id: str | None = None
    tok_model_id: str | None = None  # repo, dir or tokenizer.json (GGML vocabs have no merges)
    tokenizer_json: str | None = None
    gqa: int = 1  # KV heads = heads / gqa (not in the file)
    eps: float = 1e-5
    rope_theta: float = 10000.0


@dataclass
class PlainSpec:
    """`mistralrs plain`: a Hugging Face checkpoint (config.json + safetensors), local or a repo."""

    model_id: str
    arch: str | None = None  # HF model_type (or mistral.rs's name); default: config.json's
    tokenizer_json: str | None = None


@dataclass
class VisionSpec:
    """`mistralrs vision-plain`: a Hugging Face vision-language checkpoint (config.json with a
    vision_config, safetensors, preprocessor_config.json), local or a repo."""

    model_id: str
    arch: str | None = None  # llava; default: config.json's architectures[0]
    tokenizer_json: str | None = None
    # the language model's weights from this GGUF (a path, or a file name in model_id) instead of
    # the checkpoint's safetensors; the vision tower, processor and tokenizer stay model_id's
    quantized_filename: str | None = None


@dataclass
class LoadOptions:
    """Global options that shape loading."""

    token_source: str = "cache"
    chat_template: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    # quantized weights: "precise" (the native kernels with ~16-bit activations, f16 KV cache),
    # "fast" (8-bit activation blocks, f16 KV cache) or "exact" (dequantized to f32, torch)
    numerics: str = "precise"
    isq: str | None = None
    num_device_layers: int | None = None  # -n: the first N decoder layers on the GPU, the rest on the CPU
    # GGUF on the CPU: "auto" runs a file the native runtime serves without torch
    # (backends/native_model.py); "torch" always builds the torch model (tests compare the two)
    runtime: str = "auto"
    # --spec-ngram N: speculative decoding with no draft model (n-gram lookup in the sequence)
    spec_ngram: int | None = None
    # vision: image URLs may point at loopback / private / link-local addresses (off: SSRF guard)
    allow_local_images: bool = False
    # --tp N: tensor parallelism over N ranks (distributed/); --dist-backend: gloo or nccl
    tp: int = 1
    dist_backend: str | None = None


@dataclass(frozen=True)
class Grammar:
    """A constraint on a sequence's output. kind: "regex", "lark", "json_schema" or "llguidance"
    (mistral.rs's request field `grammar`); value: the regex, the Lark text, the JSON schema as JSON
    text, or an llguidance grammar as JSON text."""
    kind: str
    value: str


@dataclass
class SamplingParams:
    temperature: float = 0.0  # < 1e-7: greedy
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_last_n: int = 64
    logit_bias: dict[int, float] = field(default_factory=dict)
    max_tokens: int | None = None  # None: until EOS or the context is full
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # LoRA adapters (by name) this request runs with; None: the engine's active set
    # (adapters/bank.py; a request field `adapters` on the server, mistral.rs's name)
    adapters: list[str] | None = None
    # a constraint on the output (grammar/; masks computed by llguidance); None: free text
    grammar: "Grammar | None" = None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-7


@dataclass
class EngineConfig:
    max_seqs: int = 16
    # tokens per step: decodes first, prompt chunks take the rest; on a CPU a 512-token chunk
    # already runs the matmuls at full speed, and a bigger one only stalls the running streams longer
    max_batch_tokens: int = 512
    truncate_sequence: bool = False
    no_kv_cache: bool = False
    paged_attn: bool = True  # False: one growing contiguous cache per sequence
    block_size: int = 32  # --pa-blk-size
    kv_mem_mb: float | None = None  # --pa-gpu-mem: the KV pool's size in MB
    kv_mem_fraction: float | None = None  # --pa-gpu-mem-usage: of the available RAM
    kv_tokens: int | None = None  # --pa-ctxt-len: the pool holds this many tokens
    prefix_cache_n: int = 16  # finished sequences whose blocks stay cached; 0 disables


@dataclass
class LoraSpec:
    """`mistralrs lora` / `lora-gguf` / `lora-ggml`: a base model (its plain, GGUF or GGML spec)
    with the PEFT LoRA adapters an ordering file names, found as folders in adapters_model_id."""

    base: PlainSpec | GGUFSpec | GGMLSpec
    adapters_model_id: str  # -a: a directory or repo holding one folder per adapter name
    order: str  # -o: the ordering JSON file


@dataclass
class XLoraSpec:
    """`mistralrs x-lora` / `x-lora-gguf` / `x-lora-ggml`: a base model with an X-LoRA model
    (xlora_config.json, xlora_classifier.safetensors, one PEFT folder per adapter)."""

    base: PlainSpec | GGUFSpec | GGMLSpec
    xlora_model_id: str  # -x: a directory or repo
    order: str | None = None  # -o: an ordering JSON (its `order` must be the classifier's)
    tgt_non_granular_index: int | None = None  # reuse the scalings after this many generated tokens


@dataclass
class SpeculativeSpec:
    """`mistralrs speculative`: a target model and a smaller draft model of the same vocabulary
    (each a plain, GGUF or GGML spec); the draft proposes gamma tokens per step."""

    target: PlainSpec | GGUFSpec | GGMLSpec
    draft: PlainSpec | GGUFSpec | GGMLSpec
    gamma: int = 5
    draft_isq: str | None = None
    gamma_fixed: bool = False
