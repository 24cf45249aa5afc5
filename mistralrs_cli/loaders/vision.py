"""`vision-plain`: a vision-language checkpoint = the registered text model, loaded exactly as
`plain` loads it, plus a vision encoder (models/llava.py ...) and the image processor from
preprocessor_config.json (vision/processors.py). The engine replaces the image placeholder rows
of the prompt with the encoder's features (vision/prompt.py)."""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from .. import hub
from ..errors import UserError
from ..types import LoadOptions, PlainSpec, VisionSpec

# --arch / config.json architectures[0] -> (module under models/, encoder class)
ARCHS: dict[str, tuple[str, str]] = {"llava": ("llava", "LlavaVision"),
                                     "llava_next": ("llava_next", "LlavaNextVision"),
                                     "gemma3": ("gemma3_vision", "Gemma3Vision"),
                                     "idefics3": ("idefics3", "Idefics3Vision"),
                                     "idefics2": ("idefics2", "Idefics2Vision"),
                                     "phi3_v": ("phi3_v", "Phi3VVision")}
ARCH_ALIASES = {"phi3v": "phi3_v"}  # mistral.rs's --arch name
# archs whose config.json is the text model's own (no text_config) -> that text model's type
FLAT_TEXT = {"phi3_v": "phi3"}
CONFIG_ARCHS = {"LlavaForConditionalGeneration": "llava", "LlavaNextForConditionalGeneration": "llava_next",
                "Gemma3ForConditionalGeneration": "gemma3", "Idefics3ForConditionalGeneration": "idefics3",
                "Idefics2ForConditionalGeneration": "idefics2", "Phi3VForCausalLM": "phi3_v"}
# the image placeholder text of each arch when the tokenizer config does not name one
PLACEHOLDERS = {"llava": "<image>", "llava_next": "<image>", "gemma3": "<image_soft_token>", "idefics3": "<image>",
                "idefics2": "<image>", "phi3_v": "<|image|>"}


def _read(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError:
        raise UserError(f"{path} is missing; -m must name a vision checkpoint with its {what}.") from None
    except ValueError as e:
        raise UserError(f"cannot read {path} as JSON ({e}); fix the file.") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a JSON object; fix the file.")
    return raw


def vision_arch(arch: str | None, raw: dict[str, Any], config_path: Path) -> str:
    names = ", ".join(sorted(ARCHS))
    if arch is not None:
        arch = ARCH_ALIASES.get(arch.lower(), arch)
        if arch.lower() not in ARCHS:
            raise UserError(f"--arch {arch} is not a vision architecture this build runs (supported: {names}).")
        return arch.lower()
    archs = raw.get("architectures") or []
    name = archs[0] if isinstance(archs, list) and archs else None
    if name not in CONFIG_ARCHS:
        raise UserError(f"{config_path}: architecture {name} is not a supported vision model; name one "
                        f"with --arch (supported: {names}), or load a text model with `plain`.")
    return CONFIG_ARCHS[name]


def _encoder(arch: str, raw: dict[str, Any], text_hidden: int, model_dir: Path, dtype: Any):
    from safetensors import safe_open

    from .plain import _weight_files

    mod, cls = ARCHS[arch]
    encoder = getattr(importlib.import_module(f"..models.{mod}", __package__), cls)(raw, text_hidden)
    only = getattr(encoder, "weight_prefix", "")  # Phi-3-V: the text model's tensors sit beside
    weights = {}
    for path in _weight_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            weights |= {k: f.get_tensor(k) for k in f.keys()
                        if k.startswith(only) and "language_model" not in k and "text_model" not in k}
    try:
        encoder.load(weights)
    except RuntimeError as e:  # load_state_dict: missing, unexpected or mis-shaped tensors
        first = str(e).splitlines()[1:2] or [str(e)]
        raise UserError(f"{model_dir}: the vision weights do not fit a {arch} encoder "
                        f"({first[0].strip()[:200]}); the file is incomplete or not of this architecture.") from None
    return encoder.to(dtype).eval()


def _image_token_id(raw: dict[str, Any], tok: Any, placeholder: str, config_path: Path) -> int:
    tid = raw.get("image_token_id", raw.get("image_token_index"))
    if not isinstance(tid, int) or not 0 <= tid < tok.vocab_size:
        tid = tok.hf.token_to_id(placeholder)
    if tid is None:
        raise UserError(f"{config_path} names no image_token_index and the tokenizer has no {placeholder} "
                        "token; the checkpoint is incomplete.")
    return tid


def load_vision(spec: VisionSpec, opts: LoadOptions):
    from .plain import load_plain
    from ..vision.idefics_processor import PROCESSORS as IDEFICS_PROCESSORS
    from ..vision.phi3v_processor import PROCESSORS as PHI3V_PROCESSORS
    from ..vision.processors import processor_from_config
    from ..vision.prompt import Vision

    model_dir = hub.resolve_model_dir(spec.model_id, opts.token_source,
                                      ["*.json", "model*.safetensors", "chat_template.jinja"], flag="-m/--model-id")
    config_path = model_dir / "config.json"
    raw = _read(config_path, "config.json")
    arch = vision_arch(spec.arch, raw, config_path)
    text = raw if arch in FLAT_TEXT else raw.get("text_config")
    if not isinstance(text, dict):
        raise UserError(f"{config_path} has no text_config; it is not a vision-language checkpoint.")
    text_type = FLAT_TEXT.get(arch) or text.get("model_type") or "llama"
    proc_cfg = _read(model_dir / "preprocessor_config.json", "preprocessor_config.json")
    processor = processor_from_config(proc_cfg, str(model_dir / "preprocessor_config.json"),
                                      IDEFICS_PROCESSORS | PHI3V_PROCESSORS)
    text_spec = PlainSpec(str(model_dir), text_type, spec.tokenizer_json)
    if spec.quantized_filename:  # the language model from a GGUF, the rest from -m
        from .vision_gguf import load_gguf_text

        loaded = load_gguf_text(spec, text_spec, opts, text, config_path)
    else:
        loaded = load_plain(text_spec, opts)
    loaded.model_id = spec.model_id
    encoder = _encoder(arch, raw, loaded.config.hidden_size, model_dir, loaded.model.dtype)
    placeholder = PLACEHOLDERS[arch]
    tid = _image_token_id(raw, loaded.tokenizer, placeholder, config_path)
    if spec.quantized_filename:
        from .vision_gguf import image_token_rows

        image_token_rows(loaded, tid, spec.quantized_filename)
    loaded.vision = Vision(encoder, processor, tid, loaded.tokenizer.id_to_token(tid) or placeholder,
                           encoder.tokens_per_image, arch, dtype=loaded.model.dtype,
                           allow_local_images=opts.allow_local_images)
    if getattr(encoder, "bidirectional", False):
        _text_expanded(loaded.vision, raw, loaded.tokenizer, config_path)
    if hasattr(encoder, "image_text"):  # Idefics: an image's text depends on its tiles
        tok = loaded.tokenizer
        loaded.vision.image_ids = lambda pixels: tok.encode(encoder.image_text(pixels), add_special_tokens=False)
    if hasattr(encoder, "setup"):  # Phi-3-V: <|image_N|> tags, its string-only chat template
        encoder.setup(loaded, str(model_dir / "preprocessor_config.json"))
    if hasattr(encoder, "prompt_text"):  # Idefics2: its processor edits the text (5 frames when it splits)
        encoder.frames_per_image = 5 if getattr(processor, "do_image_splitting", False) else 1
        loaded.vision.text_rewrite, loaded.vision.runs_per_image = encoder.prompt_text, encoder.frames_per_image
    return loaded


def _text_expanded(vision: Any, raw: dict[str, Any], tok: Any, config_path: Path) -> None:
    """Gemma 3: the template writes <start_of_image>; its processor replaces that text with the
    image's rows between begin and end markers, and those rows attend to each other both ways."""
    names = [tok.id_to_token(raw.get(k)) if isinstance(raw.get(k), int) else None
             for k in ("boi_token_index", "eoi_token_index")]
    if None in names:
        raise UserError(f"{config_path} lacks boi_token_index / eoi_token_index in the vocabulary; the "
                        "checkpoint is incomplete.")
    boi, eoi = names
    rows = vision.image_token * vision.tokens_per_image
    vision.image_token, vision.text_expansion, vision.bidirectional = boi, f"\n\n{boi}{rows}{eoi}\n\n", True
