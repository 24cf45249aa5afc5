"""Chat messages with image parts -> prompt ids with each image's rows, for every surface (the
server's image_url parts, the CLI's --image and \\image, the Python API's messages).

Image parts are OpenAI's {"type": "image_url", "image_url": {"url": ...}} (or the URL as a bare
string) and transformers' {"type": "image", "url"|"image"|"path": ...}; the chat template sees
them as {"type": "image"} and places the model's placeholder. A user may instead type the
placeholder (mistral.rs's `<image>`) in the text: when the template's count is off but the typed
count matches the images, the typed placeholders are used."""
from __future__ import annotations

from typing import Any

from ..errors import UserError
from .prompt import PromptImages

IMAGE_TYPES = ("image_url", "image")


def image_ref(part: dict[str, Any], where: str) -> str:
    value = part.get("image_url") if part.get("type") == "image_url" else next(
        (part[k] for k in ("url", "image", "path") if isinstance(part.get(k), str)), None)
    if isinstance(value, dict):
        value = value.get("url")
    if not isinstance(value, str) or not value:
        raise UserError(f"{where}: an {part.get('type')} part needs a URL (image_url.url: a data: URI or an "
                        "http(s) URL).")
    return value


def has_images(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") in IMAGE_TYPES for p in m["content"]) for m in messages)


def split_images(messages: list[dict[str, Any]], where: str = "messages") -> tuple[list[dict], list[str], list[dict]]:
    """(messages with image parts as {"type": "image"} and string content as one text part,
    the image references in order, the same messages with the image parts dropped)."""
    with_parts, refs, text_only = [], [], []
    for i, m in enumerate(messages):
        content = m.get("content")
        if content is None or isinstance(content, str):
            parts = [{"type": "text", "text": content or ""}]
        elif isinstance(content, list):
            parts = []
            for j, p in enumerate(content):
                if not isinstance(p, dict) or p.get("type") not in ("text", *IMAGE_TYPES):
                    kind = p.get("type") if isinstance(p, dict) else type(p).__name__
                    raise UserError(f"{where}[{i}].content[{j}] is a {kind!r} part; send text and image_url parts.")
                if p["type"] == "text":
                    if not isinstance(p.get("text"), str):
                        raise UserError(f"{where}[{i}].content[{j}].text must be a string.")
                    parts.append({"type": "text", "text": p["text"]})
                else:
                    refs.append(image_ref(p, f"{where}[{i}].content[{j}]"))
                    parts.append({"type": "image"})
        else:
            raise UserError(f"{where}[{i}].content must be a string or an array of parts.")
        with_parts.append({**m, "content": parts})
        text_only.append({**m, "content": [p for p in parts if p["type"] == "text"]})
    return with_parts, refs, text_only


def _render(loaded: Any, messages: list[dict]) -> list[int]:
    if loaded.chat_template is None:
        raise UserError(f"model {loaded.model_id} has no chat template; pass one with -c/--chat-template.")
    text = loaded.chat_template.render(messages, add_generation_prompt=True, bos_token=loaded.bos_token,
                                       eos_token=loaded.eos_token, flatten_content=False)
    vision = getattr(loaded, "vision", None)
    return loaded.tokenizer.encode(vision.prepare_text(text) if vision else text, add_special_tokens=False)


def chat_with_images(loaded: Any, messages: list[dict[str, Any]], allow_paths: bool,
                     where: str = "messages") -> tuple[list[int], PromptImages | None]:
    """Prompt ids (placeholders expanded) and the prompt's images (None without any). Paths are
    read only with allow_paths (the CLI and the Python API; the server never reads them)."""
    vision = getattr(loaded, "vision", None)
    with_parts, refs, text_only = split_images(messages, where)
    if vision is None:
        if refs:
            raise UserError(f"{where}: model {loaded.model_id} takes no images; send text only, or load a "
                            "vision model with vision-plain.")
        return _render(loaded, text_only), None
    if vision.max_images is not None and len(refs) > vision.max_images:
        raise UserError(f"{where}: {len(refs)} images, but this {vision.arch} model takes at most "
                        f"{vision.max_images} per prompt.")
    from .fetch import FetchPolicy, load_image  # here: ssl and http.client cost a text-only start ~20 ms

    policy = FetchPolicy(allow_paths=allow_paths, allow_local=vision.allow_local_images)
    images = [load_image(r, where, policy) for r in refs]
    ids = _render(loaded, with_parts)
    if len(vision.slots(ids)) != len(images):
        typed = _render(loaded, text_only)  # mistral.rs style: the user typed the placeholders
        if len(vision.slots(typed)) == len(images):
            ids = typed
    return vision.expand(ids, images, where)


def cli_prompt(loaded: Any, text: str, refs: list[str], raw: bool,
               where: str = "--image") -> tuple[list[int], PromptImages | None]:
    """--prompt with --image PATH_OR_URL ...: the images first, then the text, in one user turn
    (with --raw the text must hold the placeholders itself)."""
    if not raw:
        parts = [{"type": "image_url", "image_url": {"url": r}} for r in refs] + [{"type": "text", "text": text}]
        return chat_with_images(loaded, [{"role": "user", "content": parts}], allow_paths=True, where=where)
    vision = getattr(loaded, "vision", None)
    if vision is None:
        raise UserError(f"{where}: model {loaded.model_id} takes no images; load a vision model with vision-plain.")
    from .fetch import FetchPolicy, load_image

    policy = FetchPolicy(allow_paths=True, allow_local=vision.allow_local_images)
    images = [load_image(r, f"{where} {r}", policy) for r in refs]
    return vision.expand(loaded.tokenizer.encode(vision.prepare_text(text), add_special_tokens=True), images, where)
