"""A token's own text and bytes, as OpenAI's logprobs report them (`token`, `bytes`); and stop
strings found in the generated text (find_stop).

Byte-level BPE vocabs spell bytes as printable characters (GPT-2's table); SentencePiece vocabs
spell a space as '▁' and odd bytes as <0xNN>. Either way the bytes are exact, and the string is
those bytes decoded (a piece of a UTF-8 character shows as U+FFFD)."""
from __future__ import annotations

import json
import re
from bisect import bisect_left
from functools import lru_cache

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    def __init__(self, tokenizer):
        self.tok = tokenizer
        dec = tokenizer.hf.decoder
        self.byte_level = dec is not None and "ByteLevel" in json.dumps(json.loads(dec.__getstate__()))
        self.special = tokenizer._special
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token_id)
        if hit is None:
            raw = self._bytes(token_id)
            hit = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), list(raw))
        return hit

    def _bytes(self, token_id: int) -> bytes:
        piece = self.tok.id_to_token(token_id) or ""
        if token_id in self.special:
            return piece.encode()
        if self.byte_level:
            table = _byte_decoder()
            return b"".join(bytes([table[c]]) if c in table else c.encode() for c in piece)
        m = _BYTE_PIECE.fullmatch(piece)
        if m:
            return bytes([int(m.group(1), 16)])
        return piece.replace("▁", " ").encode()


@lru_cache(maxsize=64)
def _sorted_stops(stops: tuple[str, ...]) -> tuple[list[str], int]:
    return sorted(stops), max(map(len, stops))


def find_stop(text: str, emitted: int, stops: list[str]) -> tuple[int | None, int]:
    """(where text is cut at its first stop string, or None; how many trailing characters to hold
    back because they may begin one). `emitted` characters are out already, and the text before
    them was searched on earlier steps: a new match ends after them, so the search starts one
    stop length before (time per step: stops x (held + new + longest stop) characters, in C).

    The hold is the longest suffix of the unsent text that begins some stop: with the stops
    sorted, a string x begins one exactly when the first stop >= x starts with x, so each
    candidate suffix costs one bisection instead of a scan over every prefix of every stop
    (which made thousands of long stops cost minutes per request)."""
    if not stops:
        return None, 0
    ordered, longest = _sorted_stops(tuple(stops))
    look = max(0, emitted - longest)
    hits = [i for i in (text.find(s, look) for s in ordered) if i >= 0]
    if hits:
        return min(hits), 0
    for start in range(max(emitted, len(text) - longest + 1), len(text)):
        tail = text[start:]
        i = bisect_left(ordered, tail)
        if i < len(ordered) and ordered[i].startswith(tail):
            return None, len(text) - start
    return None, 0
