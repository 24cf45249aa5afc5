"""`mistralrs speculative`: the target and the draft, each loaded as its own spec; the draft must
share the target's vocabulary (its token ids are what the target verifies)."""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable

from ..errors import UserError
from ..types import GGMLSpec, GGUFSpec, LoadOptions, SpeculativeSpec
from .loaded import Loaded

log = logging.getLogger(__name__)


def check_gamma(gamma: Any, name: str = "-n/--gamma") -> int:
    if isinstance(gamma, bool) or not isinstance(gamma, int) or gamma <= 0:
        raise UserError(f"{name} is {gamma!r}; give the number of draft tokens per step, a whole number of 1 or more.")
    return gamma


def ngram_config(n: Any, name: str = "--spec-ngram"):
    from ..engine.speculative import SpecConfig

    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise UserError(f"{name} is {n!r}; give how many trailing tokens to look up, a whole number of 1 or more.")
    return SpecConfig(ngram=n)


def _is_ggml(filename: str, model_id: str | None) -> bool:
    """A local file is told apart by its first bytes ('ggjt' vs 'GGUF'); a file still on the hub
    by its name (GGML files are .bin, GGUF files .gguf)."""
    from .ggml import GGJT_MAGIC

    for path in ([Path(model_id).expanduser() / filename] if model_id else []) + [Path(filename).expanduser()]:
        if path.is_file():
            with open(path, "rb") as f:
                head = f.read(4)
            return len(head) == 4 and int.from_bytes(head, "little") == GGJT_MAGIC
    return not filename.endswith(".gguf")


def file_spec(filename: str, model_id: str | None, tok: str | None, ggml: tuple[int, float, float],
              draft: bool = False):
    """`-f`/`--draft-file`: a GGUF file, or a GGML v3 .bin (tokenizer from -t; ggml: the
    --gqa/--eps/--rope-theta values, which GGML files do not store). A GGUF draft keeps its own
    tokenizer, so the vocabulary check compares two real vocabularies."""
    tok_json = tok if tok and tok.endswith(".json") and Path(tok).expanduser().is_file() else None
    tok_id = None if tok_json else tok
    if _is_ggml(filename, model_id):
        return GGMLSpec(filename, model_id, tok_id, tok_json, *ggml)
    return GGUFSpec(filename, model_id) if draft else GGUFSpec(filename, model_id, tok_id, tok_json)


def _params(loaded: Loaded) -> int:
    c = loaded.config
    return c.num_hidden_layers * c.hidden_size


def load_speculative(spec: SpeculativeSpec, opts: LoadOptions, load: Callable[..., Loaded]) -> Loaded:
    from ..engine.speculative import SpecConfig

    check_gamma(spec.gamma)
    target = load(spec.target, opts)
    draft = load(spec.draft, dataclasses.replace(opts, isq=spec.draft_isq))
    tv, dv = target.tokenizer.vocab_size, draft.tokenizer.vocab_size
    if tv != dv or target.tokenizer.decode(list(range(min(tv, 1000)))) != draft.tokenizer.decode(list(range(min(dv, 1000)))):
        raise UserError(f"the draft model {draft.model_id} has a different vocabulary ({dv} tokens) than the "
                        f"target {target.model_id} ({tv} tokens); pick a draft of the target's family (same tokenizer).")
    if _params(draft) > _params(target):
        log.warning("the draft model %s is larger than the target %s: speculation will likely be slower "
                    "than the target alone", draft.model_id, target.model_id)
    target.speculative = SpecConfig(gamma=spec.gamma, draft=draft, fixed=spec.gamma_fixed)
    return target
