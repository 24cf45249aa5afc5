"""`vision-plain -m DIR -f TEXT.gguf`: the language model's weights from a GGUF (llama.cpp's habit:
a text-model GGUF beside the vision part), loaded as the `gguf` subcommand's torch path loads one
(loaders/gguf.py: the same tensor-name table to HF names, quantized weights kept as blocks), so
the text half runs on the native executor with the image rows as input embeddings, as --isq's
does. Tokenizer, chat template and generation defaults come from -m, as `plain` takes them.
Before any weight is built the file must be of the checkpoint's text model: same architecture,
hidden size, no more token rows than its config's vocabulary; after, a row for every token of the
tokenizer but the image token (image_token_rows)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .. import hub
from ..errors import UserError
from ..types import LoadOptions, PlainSpec, VisionSpec

# text_config model_type -> the GGUF config's model_type for the same weights (llama.cpp writes
# Mistral's as llama)
SAME_TEXT_MODEL = {"mistral": "llama"}


def gguf_path(spec: VisionSpec, opts: LoadOptions) -> Path:
    """-f: a path to a .gguf, else a file name inside -m (a directory or a repo)."""
    name = spec.quantized_filename or ""
    path = Path(name).expanduser()
    if hub.probe(path, "is_file"):
        return path
    if hub.probe(path, "is_dir"):
        raise UserError(f"-f/--quantized-filename {name} is a directory; pass the language model's .gguf file.")
    local = Path(spec.model_id).expanduser()
    if hub.probe(local, "is_dir"):
        if not hub.probe(local / name, "is_file"):
            raise UserError(f"GGUF file {name} does not exist (neither as a path nor in {spec.model_id}); pass the "
                            "language model's .gguf to -f/--quantized-filename.")
        return local / name
    return hub.resolve_file(spec.model_id, name, opts.token_source, flag="-m/--model-id")


def check_text_model(gf: Any, cfg: Any, text: dict[str, Any], text_type: str, config_path: Path) -> None:
    """The GGUF must hold this checkpoint's language model: one `error:` line otherwise."""
    ours, theirs = SAME_TEXT_MODEL.get(text_type, text_type), SAME_TEXT_MODEL.get(cfg.model_type, cfg.model_type)
    fix = "-f/--quantized-filename must be a GGUF of this checkpoint's language model"
    if ours != theirs:
        raise UserError(f"{gf.path}: the GGUF holds a {gf.architecture} model ({cfg.model_type}); {config_path}'s "
                        f"text model is {text_type}; {fix}.")
    hidden = text.get("hidden_size")
    if isinstance(hidden, int) and hidden != cfg.hidden_size:
        raise UserError(f"{gf.path}: hidden size {cfg.hidden_size}, but {config_path}'s text model has "
                        f"{hidden}; {fix}.")
    vocab = text.get("vocab_size")
    if isinstance(vocab, int) and vocab < cfg.vocab_size:  # fewer rows: the tokenizer decides (image_token_rows)
        raise UserError(f"{gf.path}: vocabulary of {cfg.vocab_size} tokens, but {config_path}'s text model has "
                        f"{vocab}; {fix}.")


def image_token_rows(loaded: Any, image_token: int, gguf_file: str) -> None:
    """Every token of the tokenizer needs an embedding row in the GGUF, but the image token: its
    rows are replaced by image features. llama.cpp's converters write only the text vocabulary
    (Gemma 3's drops the rows past it, where <image_soft_token> is), so an image token past the
    file's rows is looked up as token 0, as transformers' Gemma 3 does, before its rows are replaced."""
    rows, tok = loaded.config.vocab_size, loaded.tokenizer
    past = [i for i in range(rows, tok.vocab_size) if i != image_token]
    if past:
        raise UserError(f"{gguf_file}: vocabulary of {rows} tokens, but the tokenizer has {tok.vocab_size} "
                        f"(token {past[0]} {tok.id_to_token(past[0])!r} has no row); -f/--quantized-filename must be a "
                        "GGUF of this checkpoint's language model.")
    if image_token < rows:
        return
    import torch

    embed = loaded.model.model.embed_tokens
    lookup = embed.forward

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return lookup(torch.where(ids >= rows, torch.zeros_like(ids), ids))

    embed.forward = forward  # the module's call, from the torch modules and the native executor alike


def load_gguf_text(spec: VisionSpec, text_spec: PlainSpec, opts: LoadOptions, text: dict[str, Any],
                   config_path: Path):
    """The Loaded bundle of the text half: the GGUF's model, -m's tokenizer and template."""
    from ..quant.isq import parse_isq
    from ..sampling_defaults import from_generation_config
    from .chat_template import resolve_chat_template
    from .gguf import load_gguf_model
    from .gguf_config import gguf_config
    from .gguf_file import GGUFFile
    from .loaded import Loaded
    from .plain import _tokenizer_files
    from .tokenizer import tokenizer_from_file
    from .weights import prepare_weights, set_dtype

    if opts.isq and parse_isq(opts.isq):
        raise UserError("--isq quantizes the checkpoint's language model, but -f/--quantized-filename takes it "
                        "from a GGUF that is already quantized; drop one of them.")
    path = gguf_path(spec, opts)
    gf = GGUFFile(path)
    cfg = gguf_config(gf)  # every metadata value checked before anything is sized from it
    check_text_model(gf, cfg, text, text_spec.arch or "llama", config_path)
    tok_json, tok_cfg, gen_cfg = _tokenizer_files(text_spec, Path(text_spec.model_id))
    eos = gen_cfg.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else [i for i in (eos or []) if isinstance(i, int)]
    tok = tokenizer_from_file(tok_json, tok_cfg, eos)
    model, cfg = load_gguf_model(gf, opts.numerics)
    set_dtype(model, opts.dtype)
    if opts.tp == 1:  # with --tp, each rank prepares its own slices once they are cut
        prepare_weights(model, release=gf.release)
    template = resolve_chat_template(opts.chat_template, tok_cfg, None)
    bos = tok.id_to_token(tok.bos_id) if tok.bos_id is not None else ""
    eos_text = tok.id_to_token(tok.eos_id) if tok.eos_id is not None else ""
    return Loaded(model, tok, template, cfg, spec.model_id, set(tok.eos_ids), bos or "", eos_text or "",
                  from_generation_config(gen_cfg))
