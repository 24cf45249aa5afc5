"""llguidance's view of our tokenizer: each token id's bytes, the special ids and the EOS ids.

Built from whatever loaders/tokenizer.py made (a `tokenizers` BPE from a GGUF or tokenizer.json,
or Gemma-3's sentencepiece vocabulary): engine/token_text.py already knows every id's exact
bytes for both kinds, and llguidance needs nothing else but an encoder for its own checks.
Building it walks the whole vocabulary (~0.3 s for SmolLM2's 49k tokens, ~2.5 s for Gemma-3's
262k), so it is done once per model, on the first grammar request, never at load.
"""
from __future__ import annotations

import threading
from typing import Any, Iterable

_LOCK = threading.Lock()


class _Wrapper:
    """The duck-typed object llguidance.TokenizerWrapper reads (tokens, EOS/BOS, specials, encode)."""

    def __init__(self, tokenizer: Any, eos: int, tokens: list[bytes]):
        self._tok = tokenizer
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_id
        self.tokens = tokens
        self.special_token_ids = sorted(tokenizer._special)

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text, add_special_tokens=False)


def _token_bytes(tokenizer: Any) -> list[bytes]:
    from ..engine.token_text import TokenText

    text_of = TokenText(tokenizer)
    return [bytes(text_of(i)[1]) for i in range(tokenizer.vocab_size)]


def ll_tokenizer(tokenizer: Any, eos_ids: Iterable[int]):
    """The llguidance.LLTokenizer for `tokenizer` with `eos_ids` as its end tokens (the mask allows
    them exactly where the grammar accepts); built once and kept on the tokenizer object."""
    import llguidance

    eos = sorted(set(eos_ids) or ({tokenizer.eos_id} - {None}))
    key = tuple(eos)
    with _LOCK:  # two requests arriving together build it once
        cache = tokenizer.__dict__.setdefault("_llguidance", {})
        if key not in cache:
            if not eos:
                from ..errors import UserError

                raise UserError("this model's tokenizer names no end-of-sequence token, so a grammar "
                                "cannot tell it where to stop; use a tokenizer with an EOS token.")
            wrapper = _Wrapper(tokenizer, eos[0], _token_bytes(tokenizer))
            cache[key] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(wrapper), eos_token=eos)
        return cache[key]
