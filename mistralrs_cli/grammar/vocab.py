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


def _pieces(tokenizer: Any) -> list[str]:
    """Every id's vocabulary string, in one call per vocabulary rather than one per id."""
    n, hf = tokenizer.vocab_size, tokenizer.hf
    if hasattr(hf, "sp"):  # loaders/spm_vocab.SpmVocab
        return list(hf.sp.id_to_piece(list(range(n))))
    pieces = [""] * n
    for piece, i in hf.get_vocab(with_added_tokens=True).items():
        if 0 <= i < n:
            pieces[i] = piece
    return pieces


def _token_bytes(tokenizer: Any) -> list[bytes]:
    """Each id's exact bytes, by engine/token_text.TokenText's rules (GPT-2 byte characters, or
    SentencePiece's '▁' and <0xNN> pieces; special tokens as their text), at C speed per token:
    Gemma-3's 262k pieces take ~0.2 s instead of ~1 s."""
    from ..engine.token_text import _BYTE_PIECE, TokenText, _byte_decoder

    text_of = TokenText(tokenizer)
    pieces, special = _pieces(tokenizer), tokenizer._special
    if text_of.byte_level:
        table = {ord(c): chr(b) for c, b in _byte_decoder().items()}
        chars = set(_byte_decoder())
        out = [p.translate(table).encode("latin-1") if set(p) <= chars else bytes(text_of(i)[1])
               for i, p in enumerate(pieces)]
    else:
        out = [bytes([int(p[3:5], 16)]) if _BYTE_PIECE.fullmatch(p) else p.replace("▁", " ").encode()
               for p in pieces]
    for i in special:
        if 0 <= i < len(out):
            out[i] = pieces[i].encode()
    return out


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
