"""`mistralrs speculative`: the target and the draft, each loaded as its own spec; the draft must
share the target's vocabulary (its token ids are what the target verifies)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

from ..errors import UserError
from ..types import LoadOptions, SpeculativeSpec
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
