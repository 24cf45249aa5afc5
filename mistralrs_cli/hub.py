"""Local-first model files: an existing path is used as is, anything else goes to huggingface_hub.

huggingface_hub reads HF_HOME / HF_HUB_OFFLINE once, at import; we read them at each call and
pass cache_dir / local_files_only explicitly, so the environment in force when a model is loaded
is the one that counts. Every hub failure a user can fix becomes one UserError sentence.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from mistralrs_cli.errors import UserError

TOKEN_FORMS = "literal:TOKEN, env:VAR, env (HF_TOKEN or HUGGING_FACE_HUB_TOKEN), path:FILE, cache or none"
_TRUE = {"1", "ON", "YES", "TRUE"}


def short_path(path: str | Path, keep: int = 200) -> str:
    """A path for a message: whole, or its start and end around an ellipsis when it is long;
    control characters escaped (a newline in a name must not split the message)."""
    text = str(path)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= keep else f"{text[:keep // 2]}…{text[-keep // 2:]} ({len(text)} characters)"


def probe(path: Path, test: str) -> bool:
    """path.is_file() / is_dir() / exists(), with the OS's refusals (a name too long, a component
    that is not a directory, no permission) as one UserError sentence instead of a traceback."""
    try:
        return getattr(path, test)()
    except OSError as e:
        raise UserError(f"the path {short_path(path)} cannot be used ({e.strerror or e}); check the "
                        "-m/-f/-t paths and file names.") from None


def hf_home() -> Path:
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(os.path.expandvars(os.environ.get("HF_HOME") or str(default))).expanduser()


def hub_cache_dir() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(os.path.expandvars(explicit)).expanduser() if explicit else hf_home() / "hub"


def hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in _TRUE


def _clean(token: str | None) -> str | None:
    return token.strip() or None if token else None


def resolve_token(token_source: str) -> str | None:
    """The Hugging Face token named by --token-source, or None when that source holds none."""
    kind, sep, arg = token_source.partition(":")
    if token_source == "none":
        return None
    if token_source == "cache":  # the file `hf auth login` writes
        path = Path(os.environ.get("HF_TOKEN_PATH") or hf_home() / "token").expanduser()
        return _clean(path.read_text(encoding="utf-8")) if probe(path, "is_file") else None
    if token_source == "env":
        return _clean(os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN"))
    if sep and arg and kind == "env":
        return _clean(os.environ.get(arg))
    if sep and arg and kind == "literal":
        return _clean(arg)
    if sep and arg and kind == "path":
        path = Path(arg).expanduser()
        if not probe(path, "is_file"):
            raise UserError(f"--token-source path:{arg} names a file that does not exist; "
                            f"write the token there or pass another source ({TOKEN_FORMS}).")
        return _clean(path.read_text(encoding="utf-8"))
    raise UserError(f"--token-source {token_source!r} is not understood; use one of {TOKEN_FORMS}.")


def _describe_source(token_source: str, token: str | None) -> str:
    """How to name the token source in a message, without ever printing a literal token."""
    shown = "literal:…" if token_source.startswith("literal:") else token_source
    return f"--token-source {shown} ({'token refused' if token else 'no token found'})"


def _looks_like_path(model_id: str) -> bool:
    # Hub ids are `name` or `org/name` and never start with '.', '/' or '~'.
    return model_id.startswith((".", "/", "~")) or "\\" in model_id or model_id.count("/") > 1


def _check_not_a_missing_path(model_id: str, flag: str) -> None:
    local = Path(model_id).expanduser()
    if probe(local, "exists"):
        raise UserError(f"{flag} {model_id} is a file, not a directory; pass the directory that "
                        f"holds the model files or a Hugging Face repo id.")
    if _looks_like_path(model_id):
        raise UserError(f"{flag} {model_id}: no such local directory; check the path or pass a "
                        f"Hugging Face repo id like org/name.")


def _hub_error(e: Exception, model_id: str, filename: str | None, token_source: str,
               token: str | None, flag: str) -> str | None:
    """One sentence for a huggingface_hub failure, or None for an error that is a bug."""
    from huggingface_hub import errors as hf

    what = f"{filename} from {model_id}" if filename else f"the files of {model_id}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    source = _describe_source(token_source, token)
    how = ("pass a token with --token-source env:HF_TOKEN (or path:FILE, literal:TOKEN, or run "
           "`hf auth login` for cache)")
    if isinstance(e, hf.GatedRepoError):
        return (f"{model_id} is a gated model and {source}; accept its licence at "
                f"https://huggingface.co/{model_id} and {how}.")
    if isinstance(e, hf.RepositoryNotFoundError):
        if status in (401, 403):
            return (f"Model {model_id} was not found on the Hugging Face Hub, or it is private and "
                    f"{source}; check {flag} or {how}.")
        return f"Model {model_id} was not found on the Hugging Face Hub; check {flag}."
    if isinstance(e, hf.RevisionNotFoundError):
        return f"The requested revision of {model_id} was not found on the Hugging Face Hub; check {flag}."
    if isinstance(e, hf.LocalEntryNotFoundError):
        if hub_offline():
            return (f"{what} is not in the Hugging Face cache {hub_cache_dir()} and HF_HUB_OFFLINE=1 "
                    f"forbids downloading it; download it first (`hf download {model_id}`) or pass a "
                    f"local path.")
        return (f"Could not reach the Hugging Face Hub to download {what}, and it is not in the cache "
                f"{hub_cache_dir()}; check the network connection or pass a local path.")
    if isinstance(e, hf.EntryNotFoundError):
        return (f"File {filename} was not found in model repository {model_id}; check the file "
                f"name or pass a local path.")
    if isinstance(e, hf.HFValidationError):
        return (f"{flag} {model_id!r} is neither an existing local directory nor a valid Hugging Face "
                f"repo id (org/name); check the value.")
    if isinstance(e, hf.HfHubHTTPError):
        if status in (401, 403):
            return f"The Hugging Face Hub refused access to {what} ({status}) and {source}; {how}."
        return f"The Hugging Face Hub answered {status} for {what}; try again later or pass a local path."
    if isinstance(e, (ConnectionError, TimeoutError)) or type(e).__module__.split(".")[0] in (
            "httpx", "httpx2", "requests", "urllib3"):
        return (f"Could not reach the Hugging Face Hub to download {what} ({type(e).__name__}); "
                f"check the network connection or pass a local path.")
    return None


def _call_hub(call: Callable[[str | bool], str], model_id: str, filename: str | None,
              token_source: str, required: bool, flag: str) -> Path | None:
    from huggingface_hub import errors as hf

    token = resolve_token(token_source)
    try:
        # False, not None: None would let huggingface_hub pick a token the user did not choose.
        return Path(call(token or False))
    except Exception as e:  # noqa: BLE001 - mapped to a sentence below or re-raised
        if not required and isinstance(e, hf.EntryNotFoundError):  # remote 404 or not cached
            return None
        message = _hub_error(e, model_id, filename, token_source, token, flag)
        if message is None:
            raise
        raise UserError(message) from None


def resolve_file(model_id: str | None, filename: str, token_source: str = "cache",
                 required: bool = True, *, flag: str = "--model-id") -> Path | None:
    """Path of `filename`: itself when it is an existing path (a bare name only when there is no
    model id, so a stray ./config.json never shadows the model's), else inside the local
    directory `model_id`, else downloaded from the Hub repo `model_id` (or found in its cache).
    When required is False a file the model does not have gives None."""
    candidate = Path(filename).expanduser()
    has_dir = candidate.is_absolute() or candidate.parent != Path(".")
    if (model_id is None or has_dir) and probe(candidate, "is_file"):
        return candidate
    if model_id is None:
        raise UserError(f"{short_path(filename)} does not exist; pass an existing file or a model id with {flag}.")
    local = Path(model_id).expanduser()
    if probe(local, "is_dir"):
        path = local / filename
        if probe(path, "is_file"):
            return path
        if required:
            raise UserError(f"{short_path(filename)} is not in the model directory {short_path(local)}; add it there or "
                            f"pass a directory or repo id that has it.")
        return None
    _check_not_a_missing_path(model_id, flag)
    from huggingface_hub import hf_hub_download

    def call(token: str | bool) -> str:
        return hf_hub_download(model_id, filename, token=token, cache_dir=hub_cache_dir(),
                               local_files_only=hub_offline())

    return _call_hub(call, model_id, filename, token_source, required, flag)


def resolve_model_dir(model_id: str, token_source: str = "cache",
                      allow_patterns: list[str] | None = None, *, flag: str = "--model-id") -> Path:
    """A local directory as is, else the Hub snapshot of `model_id` (downloaded if needed and
    allowed), limited to `allow_patterns` (e.g. ["*.json", "*.safetensors"])."""
    local = Path(model_id).expanduser()
    if probe(local, "is_dir"):
        return local
    _check_not_a_missing_path(model_id, flag)
    from huggingface_hub import snapshot_download

    def call(token: str | bool) -> str:
        return snapshot_download(model_id, token=token, cache_dir=hub_cache_dir(),
                                 local_files_only=hub_offline(), allow_patterns=allow_patterns)

    return _call_hub(call, model_id, None, token_source, True, flag)


def resolve_model_file(model_id: str | None, filename: str, token_source: str, kind: str, ext: str) -> Path:
    """-m/-f of the file-based subcommands: a bare path to the file (no -m), or a file in a repo
    or local directory. `kind` and `ext` name the format in messages ("GGUF", ".gguf")."""
    if model_id is None:
        path = Path(filename).expanduser()
        if probe(path, "is_dir"):
            raise UserError(f"-f {short_path(path)} is a directory; pass the {kind} {ext} file inside it (or the "
                            "directory with -m and the file name with -f).")
        if not probe(path, "is_file"):
            raise UserError(f"{kind} file {short_path(path)} does not exist; pass an existing {ext} path to -f "
                            "(or a repo or directory with -m and the file name with -f).")
        return path
    return resolve_file(model_id, filename, token_source, flag="-m/--quantized-model-id")
