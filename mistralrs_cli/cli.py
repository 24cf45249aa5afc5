"""The `mistralrs` command line (Typer): global options in the callback, one thin function per
subcommand that builds a Spec and hands it to run.run()."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from .cli_help import GroupedHelp, print_version
from .errors import UserError
from .run import RunOptions, run
from .types import GGMLSpec, GGUFSpec, LoadOptions, LoraSpec, PlainSpec, SpeculativeSpec, VisionSpec, XLoraSpec
from .validation import Limits

app = typer.Typer(
    cls=GroupedHelp, add_completion=True, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Fast LLM inference: mistral.rs's command line, in Python.\n\n"
         "Global options go before the subcommand: mistralrs --prompt 'Hi' gguf -f model.gguf",
)

_SAMPLING = "Sampling (for --prompt and -i; unset: the model's generation_config.json, else the defaults shown)"
_SERVER = "Server and engine"
_LIMITS = "Limits (what one request may ask for; raise them for trusted clients)"
_STRUCTURED = "Structured output (--prompt and -i; the server takes grammar / response_format per request)"
NUMERICS_HELP = ("Arithmetic on quantized weights (GGUF, GGML, --isq): precise (activations kept to ~16 bits: "
                 "the exact path's top-1 token at 100% of 512 teacher-forced positions on the test models), fast "
                 "(activations rounded once to 8-bit blocks, as llama.cpp's CPU kernels round: faster, most in "
                 "prefill; the exact path's top-1 at 95-96%), exact (every weight dequantized to f32; slow, large). "
                 "None reproduces llama.cpp's own logits.")


@app.callback()
def global_options(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", is_eager=True, callback=print_version, help="Print the version and exit."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="One-shot: complete TEXT ('-' reads stdin), print to stdout, stats to stderr."),
    interactive: bool = typer.Option(False, "-i", "--interactive", help="Interactive chat in the terminal."),
    raw: bool = typer.Option(False, "--raw", help="Send --prompt as a plain completion (no chat template; BOS per the tokenizer)."),
    image: Optional[list[str]] = typer.Option(None, "--image", metavar="PATH_OR_URL", help="Vision models: an image for --prompt (a file, an http(s) URL or a data: URI); repeat for several."),
    allow_local_images: bool = typer.Option(False, "--allow-local-images", help="Vision models: let image URLs reach loopback, private and link-local addresses (refused otherwise)."),
    grammar_regex: Optional[str] = typer.Option(None, "--grammar-regex", metavar="RE", help="Constrain the output of --prompt / -i to text fully matching RE (llguidance regex syntax).", rich_help_panel=_STRUCTURED),
    grammar_lark: Optional[str] = typer.Option(None, "--grammar-lark", metavar="FILE", help="Constrain the output of --prompt / -i to a Lark grammar read from FILE.", rich_help_panel=_STRUCTURED),
    json_schema: Optional[str] = typer.Option(None, "--json-schema", metavar="FILE", help="Constrain the output of --prompt / -i to JSON valid under the JSON schema in FILE.", rich_help_panel=_STRUCTURED),
    json_mode: bool = typer.Option(False, "--json", help="Constrain the output of --prompt / -i to a JSON object.", rich_help_panel=_STRUCTURED),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after N new tokens [default: until EOS or the context is full].", rich_help_panel=_SAMPLING),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="0 is greedy (and then no default repetition penalty) [default: 0.8].", rich_help_panel=_SAMPLING),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Keep the K likeliest tokens; 0 keeps all [default: 40].", rich_help_panel=_SAMPLING),
    top_p: Optional[float] = typer.Option(None, "--top-p", help="Keep the likeliest tokens up to this probability mass; 1 keeps all [default: 0.95].", rich_help_panel=_SAMPLING),
    min_p: Optional[float] = typer.Option(None, "--min-p", help="Drop tokens less likely than this fraction of the top token's probability; 0 keeps all [default: 0.05].", rich_help_panel=_SAMPLING),
    repetition_penalty: Optional[float] = typer.Option(None, "--repetition-penalty", help="Divide the logits of tokens seen in the last --repeat-last-n by this; 1 is off [default: 1.1 when sampling].", rich_help_panel=_SAMPLING),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", rich_help_panel=_SAMPLING),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", rich_help_panel=_SAMPLING),
    repeat_last_n: int = typer.Option(64, "--repeat-last-n", help="Penalties look at the last N tokens.", rich_help_panel=_SAMPLING),
    ignore_eos: bool = typer.Option(False, "--ignore-eos", help="Keep generating past end-of-sequence tokens.", rich_help_panel=_SAMPLING),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for sampling (reproducible output).", rich_help_panel=_SAMPLING),
    chat_template: Optional[str] = typer.Option(None, "-c", "--chat-template", help="Chat template: a .json with a chat_template key, a .jinja file, or a literal template."),
    token_source: str = typer.Option("cache", "--token-source", help="Hugging Face token: literal:TOKEN, env:VAR, env, path:FILE, cache, none."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when CuPy finds a GPU, else the CPU), cpu, or cuda."),
    num_device_layers: Optional[int] = typer.Option(None, "-n", "--num-device-layers", help="With a GPU: the first N decoder layers on it, the rest on the CPU [default: all]."),
    dtype: str = typer.Option("auto", "--dtype", help="Activation dtype: auto (f32 on the CPU), f32, bf16, f16."),
    numerics: str = typer.Option("precise", "--numerics", help=NUMERICS_HELP),
    isq: Optional[str] = typer.Option(None, "--isq", help="Quantize a plain model's linear layers at load: Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q8_1 Q2K Q3K Q4K Q5K Q6K Q8K HQQ4 HQQ8."),
    tp: int = typer.Option(1, "--tp", "--tensor-parallel-size", help="Tensor parallelism: split the model over N processes (torch.distributed; this host starts them, or run under torchrun). Uses the torch executor, not the native runtime."),
    dist_backend: Optional[str] = typer.Option(None, "--dist-backend", help="With --tp: gloo or nccl [default: nccl with --device cuda, else gloo]."),
    spec_ngram: Optional[int] = typer.Option(None, "--spec-ngram", help="Speculative decoding with no draft model: propose the tokens that followed the latest earlier occurrence of the last N tokens (same output, faster on text that repeats its prompt)."),
    truncate_sequence: bool = typer.Option(False, "--truncate-sequence", help="Keep the end of a prompt longer than the context instead of refusing it."),
    log: Optional[str] = typer.Option(None, "--log", help="A log level (off, error, warn, info, debug, trace), or a FILE to append every request and response to as JSON lines."),
    verbose: bool = typer.Option(False, "-v", "--verbose", help="Debug logging."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No stats or notices on stderr."),
    port: Optional[int] = typer.Option(None, "-p", "--port", help="Serve the OpenAI API on this port (no output mode at all: port 1234).", rich_help_panel=_SERVER),
    host: str = typer.Option("127.0.0.1", "--host", "--serve-ip", help="Address to listen on (0.0.0.0: every interface).", rich_help_panel=_SERVER),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="MISTRALRS_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes.", rich_help_panel=_SERVER),
    request_logging_file: Optional[str] = typer.Option(None, "--request-logging-file", help="Append every request, response and error to FILE as JSON lines.", rich_help_panel=_SERVER),
    max_seqs: int = typer.Option(16, "--max-seqs", help="Sequences running at once (continuous batching).", rich_help_panel=_SERVER),
    no_kv_cache: bool = typer.Option(False, "--no-kv-cache", help="Recompute the whole sequence every step (slow; for checking).", rich_help_panel=_SERVER),
    no_paged_attn: bool = typer.Option(False, "--no-paged-attn", help="One growing KV cache per sequence instead of the paged block pool (no prefix cache).", rich_help_panel=_SERVER),
    pa_blk_size: int = typer.Option(32, "--pa-blk-size", help="Tokens per KV block.", rich_help_panel=_SERVER),
    pa_gpu_mem: Optional[float] = typer.Option(None, "--pa-gpu-mem", help="KV pool size in MB [default: max-seqs full contexts, at most half the free RAM].", rich_help_panel=_SERVER),
    pa_gpu_mem_usage: Optional[float] = typer.Option(None, "--pa-gpu-mem-usage", help="KV pool size as a fraction (0-1] of the free memory (RAM on the CPU).", rich_help_panel=_SERVER),
    pa_ctxt_len: Optional[int] = typer.Option(None, "--pa-ctxt-len", help="KV pool size in tokens (all sequences together).", rich_help_panel=_SERVER),
    prefix_cache_n: int = typer.Option(16, "--prefix-cache-n", help="Finished sequences whose KV blocks stay cached for prompts that share a prefix; 0 disables.", rich_help_panel=_SERVER),
    max_body_bytes: int = typer.Option(Limits.max_body_bytes, "--max-body-bytes", help="Largest request body the server reads (413 above).", rich_help_panel=_LIMITS),
    max_json_depth: int = typer.Option(Limits.max_json_depth, "--max-json-depth", help="Deepest JSON nesting of a request body.", rich_help_panel=_LIMITS),
    max_stop_strings: int = typer.Option(Limits.max_stop_strings, "--max-stop-strings", help="Stop strings per request (OpenAI allows 4).", rich_help_panel=_LIMITS),
    max_stop_length: int = typer.Option(Limits.max_stop_length, "--max-stop-length", help="Characters per stop string.", rich_help_panel=_LIMITS),
    max_n: int = typer.Option(Limits.max_n, "--max-n", help="Choices (n) per request.", rich_help_panel=_LIMITS),
    max_top_logprobs: int = typer.Option(Limits.max_top_logprobs, "--max-top-logprobs", help="top_logprobs (chat) and logprobs (completions) per token.", rich_help_panel=_LIMITS),
    max_logit_bias: int = typer.Option(Limits.max_logit_bias, "--max-logit-bias", help="Entries in one logit_bias map.", rich_help_panel=_LIMITS),
    max_stop_token_ids: int = typer.Option(Limits.max_stop_token_ids, "--max-stop-token-ids", help="Entries in one stop_token_ids list.", rich_help_panel=_LIMITS),
) -> None:
    ctx.obj = RunOptions(
        prompt=prompt, interactive=interactive, raw=raw,
        load=LoadOptions(token_source=token_source, chat_template=chat_template, device=device, dtype=dtype, isq=isq,
                         num_device_layers=num_device_layers, numerics=numerics, spec_ngram=spec_ngram,
                         tp=tp, dist_backend=dist_backend),
        sampling=dict(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                      min_p=min_p, repetition_penalty=repetition_penalty,
                      presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                      repeat_last_n=repeat_last_n, ignore_eos=ignore_eos, seed=seed),
        truncate_sequence=truncate_sequence, log=log, verbose=verbose, quiet=quiet,
        request_logging_file=request_logging_file, port=port, host=host, api_key=api_key,
        max_seqs=max_seqs, no_kv_cache=no_kv_cache, no_paged_attn=no_paged_attn, pa_blk_size=pa_blk_size,
        pa_gpu_mem=pa_gpu_mem, pa_gpu_mem_usage=pa_gpu_mem_usage, pa_ctxt_len=pa_ctxt_len,
        prefix_cache_n=prefix_cache_n,
        limits=Limits(max_body_bytes, max_json_depth, max_stop_strings, max_stop_length, max_n, max_top_logprobs,
                      max_logit_bias, max_stop_token_ids),
    )
    ctx.obj.load.allow_local_images = allow_local_images
    ctx.obj.images = list(image or [])
    ctx.obj.grammar_flags = {"--grammar-regex": grammar_regex, "--grammar-lark": grammar_lark,
                             "--json-schema": json_schema, "--json": json_mode or None}


_DTYPE_HELP = "As the global --dtype (mistral.rs puts it here): auto (f32 on the CPU), f32, bf16, f16."


@app.command("gguf", no_args_is_help=True)
def gguf(
    ctx: typer.Context,
    quantized_model_id: Optional[str] = typer.Option(None, "-m", "--quantized-model-id", help="Hugging Face repo id or local directory holding the GGUF file."),
    quantized_filename: str = typer.Option(..., "-f", "--quantized-filename", help="The .gguf file name in -m, or a path to a .gguf file when -m is not given."),
    tok_model_id: Optional[str] = typer.Option(None, "-t", "--tok-model-id", help="Repo, directory or tokenizer.json to take the tokenizer (and tokenizer_config.json) from [default: the GGUF's own]."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Run a GGUF model (llama.cpp's format): mistralrs --prompt 'Hi' gguf -f model.gguf"""
    tokenizer_json = None
    if tok_model_id and tok_model_id.endswith(".json") and Path(tok_model_id).is_file():
        tokenizer_json, tok_model_id = tok_model_id, None
    _sub_dtype(ctx, dtype)
    _run(ctx, GGUFSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json))


@app.command("ggml", no_args_is_help=True)
def ggml(
    ctx: typer.Context,
    quantized_model_id: Optional[str] = typer.Option(None, "-m", "--quantized-model-id", help="Hugging Face repo id or local directory holding the GGML file."),
    quantized_filename: str = typer.Option(..., "-f", "--quantized-filename", help="The GGML v3 ('ggjt') llama .bin in -m, or a path to one when -m is not given."),
    tok_model_id: Optional[str] = typer.Option(None, "-t", "--tok-model-id", help="Repo, directory or tokenizer.json to take the tokenizer from (required: GGML vocabs have no merges)."),
    tokenizer_json: Optional[str] = typer.Option(None, "--tokenizer-json", help="A tokenizer.json file (instead of -t)."),
    gqa: int = typer.Option(1, "-g", "--gqa", help="Grouped-query factor: KV heads = heads / GQA (8 for LLaMA-2 70B)."),
    eps: float = typer.Option(1e-5, "--eps", help="RMS norm epsilon (not stored in GGML files)."),
    rope_theta: float = typer.Option(10000.0, "--rope-theta", help="RoPE base frequency (not stored in GGML files)."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Run a GGML v3 llama model: mistralrs --prompt 'Hi' ggml -f model.bin -t tokenizer.json"""
    _sub_dtype(ctx, dtype)
    _run(ctx, GGMLSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json, gqa, eps, rope_theta))


@app.command("plain", no_args_is_help=True)
def plain(
    ctx: typer.Context,
    model_id: str = typer.Option(..., "-m", "--model-id", help="Hugging Face repo id or local directory with config.json, *.safetensors and tokenizer.json."),
    tokenizer_json: Optional[str] = typer.Option(None, "-t", "--tokenizer-json", help="A tokenizer.json to use instead of the model's."),
    arch: Optional[str] = typer.Option(None, "-a", "--arch", help="Architecture (HF model_type, e.g. llama) [default: from config.json's architectures]."),
    isq: Optional[str] = typer.Option(None, "--isq", help="As the global --isq (mistral.rs's later guide puts it here)."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Run a Hugging Face safetensors checkpoint: mistralrs --prompt 'Hi' plain -m org/model"""
    ctx.obj.load.isq = isq or ctx.obj.load.isq
    _sub_dtype(ctx, dtype)
    _run(ctx, PlainSpec(model_id, arch, tokenizer_json))


@app.command("vision-plain", no_args_is_help=True)
def vision_plain(
    ctx: typer.Context,
    model_id: str = typer.Option(..., "-m", "--model-id", help="Hugging Face repo id or local directory with config.json, *.safetensors, tokenizer.json and preprocessor_config.json."),
    tokenizer_json: Optional[str] = typer.Option(None, "-t", "--tokenizer-json", help="A tokenizer.json to use instead of the model's."),
    arch: Optional[str] = typer.Option(None, "-a", "--arch", help="Vision architecture: llava, llava_next, gemma3, idefics2, idefics3, phi3_v (or phi3v) [default: from config.json's architectures]."),
    isq: Optional[str] = typer.Option(None, "--isq", help="As the global --isq: quantizes the language model (the vision tower stays as it is)."),
    quantized_filename: Optional[str] = typer.Option(None, "-f", "--quantized-filename", help="The language model's weights from this GGUF (a path, or a file name in -m) instead of -m's safetensors; the vision tower, projector, image processor, tokenizer and chat template stay -m's."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """Run a vision-language checkpoint: mistralrs --prompt 'What is this?' --image cat.png vision-plain -m llava-hf/llava-1.5-7b-hf"""
    ctx.obj.load.isq = isq or ctx.obj.load.isq
    _sub_dtype(ctx, dtype)
    _run(ctx, VisionSpec(model_id, arch, tokenizer_json, quantized_filename))


_ADAPTERS_HELP = ("Directory or Hugging Face repo holding one PEFT adapter folder (adapter_config.json + "
                  "adapter_model.safetensors) per adapter name of the ordering file.")
_ORDER_HELP = ("Ordering file (JSON): base_model_id, the adapters active by default (order), their "
               "modules (layers) and adapters requests may add (preload_adapters); see orderings/README.md.")


@app.command("lora", no_args_is_help=True)
def lora(
    ctx: typer.Context,
    model_id: str = typer.Option(..., "-m", "--model-id", help="Hugging Face repo id or local directory with config.json, *.safetensors and tokenizer.json."),
    adapters_model_id: str = typer.Option(..., "-a", "--adapters-model-id", help=_ADAPTERS_HELP),
    order: str = typer.Option(..., "-o", "--order", help=_ORDER_HELP),
    tokenizer_json: Optional[str] = typer.Option(None, "-t", "--tokenizer-json", help="A tokenizer.json to use instead of the model's."),
    arch: Optional[str] = typer.Option(None, "--arch", help="Architecture (HF model_type, e.g. llama) [default: from config.json's architectures]."),
    isq: Optional[str] = typer.Option(None, "--isq", help="As the global --isq; the adapters then stay beside the quantized weights."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """A safetensors checkpoint with LoRA adapters (merged at load unless the ordering preloads some):
    mistralrs --prompt 'Hi' lora -m org/model -a adapters/ -o ordering.json"""
    ctx.obj.load.isq = isq or ctx.obj.load.isq
    _sub_dtype(ctx, dtype)
    _run(ctx, LoraSpec(PlainSpec(model_id, arch, tokenizer_json), adapters_model_id, order))


@app.command("lora-gguf", no_args_is_help=True)
def lora_gguf(
    ctx: typer.Context,
    quantized_model_id: Optional[str] = typer.Option(None, "-m", "--quantized-model-id", help="Hugging Face repo id or local directory holding the GGUF file."),
    quantized_filename: str = typer.Option(..., "-f", "--quantized-filename", help="The .gguf file name in -m, or a path to a .gguf file when -m is not given."),
    adapters_model_id: str = typer.Option(..., "-a", "--adapters-model-id", help=_ADAPTERS_HELP),
    order: str = typer.Option(..., "-o", "--order", help=_ORDER_HELP),
    tok_model_id: Optional[str] = typer.Option(None, "-t", "--tok-model-id", help="Repo, directory or tokenizer.json to take the tokenizer (and tokenizer_config.json) from [default: the GGUF's own]."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """A GGUF model with LoRA adapters beside its quantized weights:
    mistralrs --prompt 'Hi' lora-gguf -f model.gguf -a adapters/ -o ordering.json"""
    tokenizer_json = None
    if tok_model_id and tok_model_id.endswith(".json") and Path(tok_model_id).is_file():
        tokenizer_json, tok_model_id = tok_model_id, None
    base = GGUFSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json)
    _sub_dtype(ctx, dtype)
    _run(ctx, LoraSpec(base, adapters_model_id, order))


@app.command("lora-ggml", no_args_is_help=True)
def lora_ggml(
    ctx: typer.Context,
    quantized_model_id: Optional[str] = typer.Option(None, "-m", "--quantized-model-id", help="Hugging Face repo id or local directory holding the GGML file."),
    quantized_filename: str = typer.Option(..., "-f", "--quantized-filename", help="The GGML v3 ('ggjt') llama .bin in -m, or a path to one when -m is not given."),
    adapters_model_id: str = typer.Option(..., "-a", "--adapters-model-id", help=_ADAPTERS_HELP),
    order: str = typer.Option(..., "-o", "--order", help=_ORDER_HELP),
    tok_model_id: Optional[str] = typer.Option(None, "-t", "--tok-model-id", help="Repo, directory or tokenizer.json to take the tokenizer from (required: GGML vocabs have no merges)."),
    tokenizer_json: Optional[str] = typer.Option(None, "--tokenizer-json", help="A tokenizer.json file (instead of -t)."),
    gqa: int = typer.Option(1, "-g", "--gqa", help="Grouped-query factor: KV heads = heads / GQA (8 for LLaMA-2 70B)."),
    eps: float = typer.Option(1e-5, "--eps", help="RMS norm epsilon (not stored in GGML files)."),
    rope_theta: float = typer.Option(10000.0, "--rope-theta", help="RoPE base frequency (not stored in GGML files)."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """A GGML v3 llama model with LoRA adapters beside its quantized weights:
    mistralrs --prompt 'Hi' lora-ggml -f model.bin -t tokenizer.json -a adapters/ -o ordering.json"""
    base = GGMLSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json, gqa, eps, rope_theta)
    _sub_dtype(ctx, dtype)
    _run(ctx, LoraSpec(base, adapters_model_id, order))


app.command("lora-plain", no_args_is_help=True, help="Alias of lora.")(lora)

_XLORA_HELP = ("Directory or Hugging Face repo of the X-LoRA model: xlora_config.json, "
               "xlora_classifier.safetensors and one PEFT adapter folder per name in the config's adapters.")
_XORDER_HELP = ("Ordering file (JSON, orderings/README.md): its order must be the X-LoRA config's adapters; "
                "its layers number each adapted module's scalings [default: peft's module order].")
_TGT_HELP = ("Compute the scalings for the prompt and this many generated tokens, then reuse the last "
             "ones and skip the scaling pass (faster, coarser) [default: every token].")


@app.command("x-lora", no_args_is_help=True)
def x_lora(
    ctx: typer.Context,
    model_id: Optional[str] = typer.Option(None, "-m", "--model-id", help="Hugging Face repo id or local directory with config.json, *.safetensors and tokenizer.json [default: the ordering's base_model_id]."),
    xlora_model_id: str = typer.Option(..., "-x", "--xlora-model-id", help=_XLORA_HELP),
    order: Optional[str] = typer.Option(None, "-o", "--order", help=_XORDER_HELP),
    tgt_non_granular_index: Optional[int] = typer.Option(None, "--tgt-non-granular-index", min=0, help=_TGT_HELP),
    tokenizer_json: Optional[str] = typer.Option(None, "-t", "--tokenizer-json", help="A tokenizer.json to use instead of the model's."),
    arch: Optional[str] = typer.Option(None, "-a", "--arch", help="Architecture (HF model_type, e.g. llama) [default: from config.json's architectures]."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """A safetensors checkpoint with an X-LoRA model (a classifier mixing LoRA adapters per token):
    mistralrs --prompt 'Hi' x-lora -m org/model -x org/xlora-model (or -o ordering.json for -m)"""
    _sub_dtype(ctx, dtype)
    _run(ctx, XLoraSpec(PlainSpec(model_id, arch, tokenizer_json), xlora_model_id, order, tgt_non_granular_index))


@app.command("x-lora-gguf", no_args_is_help=True)
def x_lora_gguf(
    ctx: typer.Context,
    quantized_model_id: Optional[str] = typer.Option(None, "-m", "--quantized-model-id", help="Hugging Face repo id or local directory holding the GGUF file."),
    quantized_filename: str = typer.Option(..., "-f", "--quantized-filename", help="The .gguf file name in -m, or a path to a .gguf file when -m is not given."),
    xlora_model_id: str = typer.Option(..., "-x", "--xlora-model-id", help=_XLORA_HELP),
    order: Optional[str] = typer.Option(None, "-o", "--order", help=_XORDER_HELP),
    tgt_non_granular_index: Optional[int] = typer.Option(None, "--tgt-non-granular-index", min=0, help=_TGT_HELP),
    tok_model_id: Optional[str] = typer.Option(None, "-t", "--tok-model-id", help="Repo, directory or tokenizer.json to take the tokenizer (and tokenizer_config.json) from [default: the GGUF's own]."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """A GGUF model with an X-LoRA model, its adapters beside the quantized weights:
    mistralrs --prompt 'Hi' x-lora-gguf -f model.gguf -x xlora-model/"""
    tokenizer_json = None
    if tok_model_id and tok_model_id.endswith(".json") and Path(tok_model_id).is_file():
        tokenizer_json, tok_model_id = tok_model_id, None
    base = GGUFSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json)
    _sub_dtype(ctx, dtype)
    _run(ctx, XLoraSpec(base, xlora_model_id, order, tgt_non_granular_index))


@app.command("x-lora-ggml", no_args_is_help=True)
def x_lora_ggml(
    ctx: typer.Context,
    quantized_model_id: Optional[str] = typer.Option(None, "-m", "--quantized-model-id", help="Hugging Face repo id or local directory holding the GGML file."),
    quantized_filename: str = typer.Option(..., "-f", "--quantized-filename", help="The GGML v3 ('ggjt') llama .bin in -m, or a path to one when -m is not given."),
    xlora_model_id: str = typer.Option(..., "-x", "--xlora-model-id", help=_XLORA_HELP),
    order: Optional[str] = typer.Option(None, "-o", "--order", help=_XORDER_HELP),
    tgt_non_granular_index: Optional[int] = typer.Option(None, "--tgt-non-granular-index", min=0, help=_TGT_HELP),
    tok_model_id: Optional[str] = typer.Option(None, "-t", "--tok-model-id", help="Repo, directory or tokenizer.json to take the tokenizer from (required: GGML vocabs have no merges)."),
    tokenizer_json: Optional[str] = typer.Option(None, "--tokenizer-json", help="A tokenizer.json file (instead of -t)."),
    gqa: int = typer.Option(1, "-g", "--gqa", help="Grouped-query factor: KV heads = heads / GQA (8 for LLaMA-2 70B)."),
    eps: float = typer.Option(1e-5, "--eps", help="RMS norm epsilon (not stored in GGML files)."),
    rope_theta: float = typer.Option(10000.0, "--rope-theta", help="RoPE base frequency (not stored in GGML files)."),
    dtype: Optional[str] = typer.Option(None, "-d", "--dtype", help=_DTYPE_HELP),
) -> None:
    """A GGML v3 llama model with an X-LoRA model:
    mistralrs --prompt 'Hi' x-lora-ggml -f model.bin -t tokenizer.json -x xlora-model/"""
    base = GGMLSpec(quantized_filename, quantized_model_id, tok_model_id, tokenizer_json, gqa, eps, rope_theta)
    _sub_dtype(ctx, dtype)
    _run(ctx, XLoraSpec(base, xlora_model_id, order, tgt_non_granular_index))


app.command("x-lora-plain", no_args_is_help=True, help="Alias of x-lora.")(x_lora)


@app.command("speculative", no_args_is_help=True)
def speculative(
    ctx: typer.Context,
    model_id: Optional[str] = typer.Option(None, "-m", "--model-id", help="The target: a Hugging Face repo id or local directory (with -f: the directory or repo holding its GGUF or GGML file)."),
    quantized_filename: Optional[str] = typer.Option(None, "-f", "--quantized-filename", help="The target is this file (in -m, or a path): a .gguf, or a GGML v3 ('ggjt') llama .bin; a local file is told apart by its first bytes, one on the hub by its name (.gguf or not)."),
    arch: Optional[str] = typer.Option(None, "-a", "--arch", help="The target's architecture when it is a plain checkpoint [default: from config.json]."),
    tok_model_id: Optional[str] = typer.Option(None, "-t", "--tok-model-id", help="Repo, directory or tokenizer.json for the target's file and for a GGML draft (required when either is GGML: GGML vocabs have no merges) [default: a GGUF file's own]."),
    gqa: int = typer.Option(1, "--gqa", help="A GGML target's grouped-query factor: KV heads = heads / GQA (8 for LLaMA-2 70B)."),
    eps: float = typer.Option(1e-5, "--eps", help="A GGML target's RMS norm epsilon (not stored in GGML files)."),
    rope_theta: float = typer.Option(10000.0, "--rope-theta", help="A GGML target's RoPE base frequency (not stored in GGML files)."),
    draft_model_id: Optional[str] = typer.Option(None, "-d", "--draft-model-id", help="The draft: a repo id or local directory of a smaller model with the target's vocabulary (with --draft-file: where its file is)."),
    draft_file: Optional[str] = typer.Option(None, "--draft-file", help="The draft is this file (in -d, or a path): a .gguf (its own tokenizer), or a GGML v3 .bin (tokenizer from -t), told apart as -f."),
    draft_gqa: int = typer.Option(1, "--draft-gqa", help="A GGML draft's grouped-query factor."),
    draft_eps: float = typer.Option(1e-5, "--draft-eps", help="A GGML draft's RMS norm epsilon."),
    draft_rope_theta: float = typer.Option(10000.0, "--draft-rope-theta", help="A GGML draft's RoPE base frequency."),
    gamma: int = typer.Option(5, "-n", "--gamma", help="Draft tokens proposed per step (the most, as gamma adapts per sequence)."),
    gamma_fixed: bool = typer.Option(False, "--gamma-fixed", help="Always propose --gamma tokens (no adapting; for benchmarks)."),
    isq: Optional[str] = typer.Option(None, "--isq", help="Quantize a plain target's linear layers at load (as the global --isq)."),
    draft_isq: Optional[str] = typer.Option(None, "--draft-isq", help="Quantize a plain draft's linear layers at load."),
) -> None:
    """Speculative decoding: the draft proposes, the target verifies (the target's own output distribution):
    mistralrs --prompt 'Hi' speculative -m target-dir -d draft-dir -n 5
    (GGML: speculative -f target.bin -t tokenizer.json --draft-file draft.bin)"""
    from .loaders.speculative import file_spec

    if not model_id and not quantized_filename:
        raise UserError("speculative needs the target: -m DIR_OR_REPO, or -f FILE (.gguf or GGML .bin).")
    if not draft_model_id and not draft_file:
        raise UserError("speculative needs the draft: -d DIR_OR_REPO, or --draft-file FILE (.gguf or GGML .bin).")
    ctx.obj.load.isq = isq or ctx.obj.load.isq
    target = (file_spec(quantized_filename, model_id, tok_model_id, (gqa, eps, rope_theta)) if quantized_filename
              else PlainSpec(model_id, arch))
    draft = (file_spec(draft_file, draft_model_id, tok_model_id, (draft_gqa, draft_eps, draft_rope_theta), draft=True)
             if draft_file else PlainSpec(draft_model_id))
    _run(ctx, SpeculativeSpec(target, draft, gamma, draft_isq, gamma_fixed))


@app.command("toml", no_args_is_help=True)
def toml(
    ctx: typer.Context,
    file: str = typer.Option(..., "-f", "--file", help="The .toml selector (mistral.rs's schema: [model], optional [speculative] with gamma and [speculative.draft_model]; see examples/toml-selectors/)."),
) -> None:
    """Select the model with a TOML file, as mistral.rs's toml subcommand: mistralrs -i toml -f selector.toml"""
    from .toml_selector import for_command_line

    _run(ctx, for_command_line(ctx, file))


def _sub_dtype(ctx: typer.Context, dtype: Optional[str]) -> None:
    """A model subcommand's -d/--dtype (where mistral.rs puts it) wins over the global --dtype."""
    if dtype is not None:
        ctx.obj.load.dtype = dtype


def _run(ctx: typer.Context, spec) -> None:
    """mistralrs runs the spec in the chosen output mode; mistralrs-bench benchmarks it."""
    if hasattr(ctx.obj, "bench"):
        from .outputs.bench import run_bench

        run_bench(ctx.obj, spec)
    else:
        run(ctx.obj, spec)


bench_app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Benchmark a model as mistral.rs's mistralrs-bench does: prompt processing (pp) and text "
         "generation (tg) tokens/s per concurrency.\n\n"
         "mistralrs-bench -p 512 -g 128 -c 1,2,4 -r 5 gguf -f model.gguf",
)


@bench_app.callback()
def bench_options(
    ctx: typer.Context,
    n_prompt: int = typer.Option(512, "-p", "--n-prompt", help="Prompt tokens of the pp test (0 skips it)."),
    n_gen: int = typer.Option(128, "-g", "--n-gen", help="Generated tokens of the tg test (0 skips it)."),
    concurrency: str = typer.Option("1", "-c", "--concurrency", help="Concurrent requests, a comma-separated list."),
    repetitions: int = typer.Option(5, "-r", "--repetitions", help="Rounds per test."),
    json_path: Optional[str] = typer.Option(None, "--json", help="Also write the results to this JSON file."),
    token_source: str = typer.Option("cache", "--token-source", help="Hugging Face token: literal:TOKEN, env:VAR, env, path:FILE, cache, none."),
    dtype: str = typer.Option("auto", "--dtype", help="Activation dtype: auto (f32 on the CPU), f32, bf16, f16."),
    isq: Optional[str] = typer.Option(None, "--isq", help="Quantize a plain model's linear layers at load (Q4_0, Q4K, Q8_0, HQQ4, ...)."),
    numerics: str = typer.Option("precise", "--numerics", help=NUMERICS_HELP),
) -> None:
    from .outputs.bench import BenchOptions, BenchRun, parse_concurrency

    from .numerics import check_numerics

    opts = BenchOptions(n_prompt, n_gen, parse_concurrency(concurrency), repetitions, json_path)
    opts.check()
    check_numerics(numerics)
    ctx.obj = BenchRun(opts, LoadOptions(token_source=token_source, dtype=dtype, isq=isq, numerics=numerics))


for _name, _fn in (("gguf", gguf), ("ggml", ggml), ("plain", plain), ("lora", lora), ("lora-gguf", lora_gguf),
                   ("lora-ggml", lora_ggml), ("speculative", speculative), ("toml", toml)):
    bench_app.command(_name, no_args_is_help=True)(_fn)


def bench_main() -> None:
    _main(bench_app)


def main() -> None:
    _main(app)


def _main(typer_app: typer.Typer) -> None:
    try:
        typer_app()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        sys.exit(130)
