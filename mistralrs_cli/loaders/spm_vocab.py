"""SentencePiece-BPE vocabularies (GGUF `tokenizer.ggml.model` 'llama') on the `sentencepiece`
library, with llama.cpp's handling of added tokens and spaces around it.

Why not `tokenizers` here: it needs SentencePiece BPE spelled as ranked merges, and Gemma-3's
262k-token vocabulary makes 515k of them, which take ~1.1 s and ~340 MB of passing heap to load
from JSON; the same vocabulary as a SentencePiece model loads in ~0.07 s and ~50 MB. The model is
written in memory from the GGUF's tokens, scores and types (sentencepiece_model.proto's wire
format: a repeated `pieces` field, then the trainer and normalizer settings).

llama.cpp's SPM tokenizer is sentencepiece's BPE encoder (merge the adjacent pair whose
concatenation is the best-scored piece, the leftmost on ties; a character no piece covers becomes
<0xNN> byte pieces). What llama.cpp does around it is done here: control, unknown and user-defined
tokens are cut out of the raw text first (longest match), spaces become '▁', and with
add_space_prefix a text fragment that begins the input or follows an added token gets a '▁'.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from sentencepiece import SentencePieceProcessor

# sentencepiece_model.proto: SentencePiece.Type values, TrainerSpec.ModelType.BPE
_NORMAL, _UNKNOWN, _BYTE, _MODEL_BPE = 1, 2, 6, 2
_GGUF_BYTE = 6


class AddedToken(NamedTuple):
    """What Tokenizer reads of an added token (tokenizers' AddedToken has the same fields)."""
    content: str
    special: bool


class Encoding(NamedTuple):
    ids: list[int]


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    """One protobuf field: length-delimited for bytes, varint for an int."""
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def model_proto(tokens: Sequence[str], scores: np.ndarray, types: np.ndarray, unk: int,
                byte_fallback: bool) -> bytes:
    """A serialized SentencePiece BPE ModelProto of these pieces, normalizing nothing.

    Every piece is NORMAL except <0xNN> bytes and the unknown token: llama.cpp looks a merge up in
    the whole vocabulary, control tokens included. A piece: text (1), score (2, float), type (3)."""
    kinds = np.where(types == _GGUF_BYTE, _BYTE, _NORMAL)
    kinds[unk] = _UNKNOWN
    score_bytes = scores.astype("<f4").tobytes()
    pieces = []
    for i, token in enumerate(tokens):
        raw = token.encode("utf-8", "surrogatepass")
        msg = b"\x0a" + _varint(len(raw)) + raw + b"\x15" + score_bytes[4 * i:4 * i + 4]
        msg += b"\x18" + _varint(int(kinds[i]))
        pieces.append(b"\x0a" + _varint(len(msg)) + msg)
    trainer = _field(3, _MODEL_BPE) + _field(35, int(byte_fallback))
    trainer += _field(44, tokens[unk].encode("utf-8", "surrogatepass"))  # unk_surface: its text
    normalizer = (_field(1, b"identity") + _field(3, 0)  # name, add_dummy_prefix: done here
                  + _field(4, 0) + _field(5, 1))  # remove_extra_whitespaces, escape_whitespaces
    return b"".join(pieces) + _field(2, trainer) + _field(3, normalizer)


class AddedMatcher:
    """Finds the added tokens in a text the way one regex alternation of them would: scanning
    left to right, the longest token that starts at the first position where any does.

    Gemma-3 has 6,400 added tokens; a regex of them (even as a trie) took ~80 ms of CPU to build
    and compile at every start. This needs only sets: the tokens by their first two characters,
    their lengths there (longest first), and one character class of first characters to jump
    between candidate positions."""

    def __init__(self, words: Iterable[str]):
        self.words = {w for w in words if w}
        lengths: dict[str, set[int]] = {}
        for w in self.words:
            lengths.setdefault(w[:2], set()).add(len(w))
        self._lengths = {head: sorted(ns, reverse=True) for head, ns in lengths.items()}
        firsts = "".join(sorted({w[0] for w in self.words}))
        self._next = re.compile(f"[{re.escape(firsts)}]").search if firsts else None

    def longest_at(self, text: str, pos: int) -> str | None:
        """The longest token that starts at text[pos], if any."""
        end = len(text)
        for n in self._lengths.get(text[pos:pos + 2], ()):
            if pos + n <= end and (w := text[pos:pos + n]) in self.words:
                return w
        return text[pos] if text[pos] in self.words else None

    def finditer(self, text: str) -> Iterator[tuple[int, str]]:
        """(start, token) of each match, left to right, none overlapping."""
        pos = 0
        while self._next is not None and (m := self._next(text, pos)) is not None:
            start = m.start()
            word = self.longest_at(text, start)
            if word is None:
                pos = start + 1
            else:
                yield start, word
                pos = start + len(word)


class SpmVocab:
    """The part of `tokenizers.Tokenizer`'s interface that Tokenizer and its callers use."""
    decoder = None  # not a byte-level vocabulary (engine/token_text.py asks)

    def __init__(self, proto: bytes, added: Mapping[int, bool], prefix: bool,
                 sp: SentencePieceProcessor | None = None):
        """added: added token id -> special (control/unknown) or not (user-defined); sp: the
        processor already loaded from `proto`, if one was."""
        self.prefix = prefix  # the model's bytes are not kept: serialized_model_proto() has them
        self.sp = sp if sp is not None else SentencePieceProcessor(model_proto=proto)
        self.size = self.sp.get_piece_size()
        self.added = {i: AddedToken(self.sp.id_to_piece(i), s) for i, s in added.items()}
        self._added_ids = {t.content: i for i, t in self.added.items() if t.content}
        self._split = AddedMatcher(self._added_ids)
        self.template: tuple[int | None, int | None] = (None, None)  # BOS/EOS encode() may add

    def _fragments(self, text: str) -> list[str | int]:
        """The text cut into raw-text pieces and added token ids, in order."""
        out: list[str | int] = []
        pos = 0
        for start, word in self._split.finditer(text):
            if start > pos:
                out.append(text[pos:start])
            out.append(self._added_ids[word])
            pos = start + len(word)
        if pos < len(text):
            out.append(text[pos:])
        return out

    def encode(self, text: str, add_special_tokens: bool = True) -> Encoding:
        frags = self._fragments(text)
        # llama.cpp prefixes '▁' to a fragment at the start or after an added token
        texts = [("▁" if self.prefix and (k == 0 or isinstance(frags[k - 1], int)) else "")
                 + f.replace(" ", "▁") for k, f in enumerate(frags) if isinstance(f, str)]
        encoded = iter(self.sp.encode(texts)) if texts else iter(())
        ids: list[int] = []
        for f in frags:
            if isinstance(f, str):
                ids.extend(next(encoded))
            else:
                ids.append(f)
        bos, eos = self.template if add_special_tokens else (None, None)
        return Encoding(([bos] if bos is not None else []) + ids + ([eos] if eos is not None else []))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        keep = [i for i in map(int, ids) if 0 <= i < self.size
                and not (skip_special_tokens and i in self.added and self.added[i].special)]
        return self.sp.decode(keep)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, token_id: int) -> str | None:
        return self.sp.id_to_piece(token_id) if 0 <= token_id < self.size else None

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.size

    def get_added_tokens_decoder(self) -> dict[int, AddedToken]:
        return dict(self.added)

    def added_specials(self) -> dict[int, bool]:
        """The `added` argument that rebuilds this vocabulary."""
        return {i: t.special for i, t in self.added.items()}


def spm_vocab(tokens: Sequence[str], scores: np.ndarray, types: np.ndarray, added: Mapping[int, bool],
              unk: int, prefix: bool) -> SpmVocab | None:
    """The vocabulary on sentencepiece, or None where sentencepiece refuses it (a duplicate or
    empty piece, a misnamed byte piece): loaders/tokenizer.py then builds it with `tokenizers`."""
    try:
        proto = model_proto(tokens, scores, types, unk, bool((types == _GGUF_BYTE).any()))
        return SpmVocab(proto, added, prefix)
    except (RuntimeError, OSError, UnicodeError):
        return None
