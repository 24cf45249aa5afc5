"""Constrained generation with llguidance: a request's Grammar (types.py) becomes a per-sequence
matcher whose token mask is one more logits processor (engine/sampler.py, after logit_bias and
before temperature).

vocab.py    llguidance's tokenizer from ours (token bytes, specials, EOS ids), once per model
compile.py  Grammar -> checked matcher; one UserError per bad grammar, naming the field
matcher.py  SeqGrammar: consume a token, next mask computed on a worker thread
request.py  the request fields (grammar, response_format) -> a Grammar, one rule for every surface
"""
from __future__ import annotations

from typing import Any

from ..types import Grammar
from .compile import KINDS, json_object, syntax_check


def check(loaded: Any, grammar: Grammar, where: str = "grammar") -> None:
    """Raise UserError naming `where` if `grammar` is invalid for this model (compiles it once;
    the engine later reuses the compiled matcher)."""
    from .compile import compiled
    from .vocab import ll_tokenizer

    compiled(grammar, ll_tokenizer(loaded.tokenizer, loaded.eos_ids), where)


def seq_grammar(loaded: Any, grammar: Grammar, where: str = "grammar"):
    """A new sequence's SeqGrammar; its first mask starts computing at once."""
    from .compile import compiled
    from .matcher import SeqGrammar
    from .vocab import ll_tokenizer

    lltok = ll_tokenizer(loaded.tokenizer, loaded.eos_ids)
    return SeqGrammar(compiled(grammar, lltok, where), lltok.vocab_size)


__all__ = ["Grammar", "KINDS", "check", "json_object", "seq_grammar", "syntax_check"]
