"""Tokenizers built from GGUF tokenizer metadata (or a tokenizer.json), matching llama.cpp's ids.

Two GGUF vocab kinds are supported, as llama.cpp defines them:
  gpt2   byte-level BPE: ranked merges from `tokenizer.ggml.merges`, split regexes chosen by
         `tokenizer.ggml.pre` (bpe_splits.py), ByteLevel bytes<->chars.
  llama  SentencePiece BPE: no merges in the file; a pair merges when its concatenation is a
         token, best score first. Built on the `sentencepiece` library (spm_vocab.py); where
         it refuses the vocabulary, as `tokenizers` BPE with merges derived from the scores.
         Spaces become '▁', optional '▁' prefix, <0xNN> byte fallback.
Control (type 3) and user-defined (type 4) tokens are added tokens matched on the raw text,
the way llama.cpp partitions text before tokenizing (control ones are `special`).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from mistralrs_cli.errors import UserError

from .bpe_splits import PRE_TOKENIZERS, SPLITS, PreTokenizer
from .gguf_values import BadValue, flag, numbers, strings, text, token_id
from .spm_vocab import SpmVocab, spm_vocab
from .tokenizer_cache import SPM_FILE as _SPM_FILE, discard_prefetched, take_prefetched

log = logging.getLogger(__name__)

# llama.cpp ends generation on these when the vocab has them, whatever the metadata says.
EOG_NAMES = ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
             "<|eom_id|>", "<|end_of_text|>")
_CONTROL, _USER_DEFINED, _UNKNOWN = 3, 4, 2
_CACHE_FORMAT = 2  # 2: SentencePiece vocabs cached as tokenizer.model
_SIDECAR = "mistralrs_tokenizer.json"


@dataclass
class Tokenizer:
    """A `tokenizers.Tokenizer` plus the few facts llama.cpp keeps beside the vocab."""
    hf: HFTokenizer = field(repr=False)
    bos_id: int | None
    eos_id: int | None
    add_bos: bool = False
    add_eos: bool = False
    strip_space: bool = False  # SentencePiece '▁' prefix: decode drops the first token's space
    eos_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        self._special = {i for i, t in self.hf.get_added_tokens_decoder().items() if t.special}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Ids for `text`; special-token text is always parsed, BOS/EOS added per metadata."""
        ids = self.hf.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and self.bos_id is not None:
            ids.insert(0, self.bos_id)
        if add_special_tokens and self.add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        text = self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        return text[1:] if self._strips(ids, skip_special_tokens) and text[:1] == " " else text

    def _strips(self, ids: list[int], skip_special_tokens: bool) -> bool:
        """llama.cpp drops the '▁' prefix's space only when the first shown token is ordinary."""
        shown = [i for i in ids if not (skip_special_tokens and i in self._special)]
        return self.strip_space and bool(shown) and shown[0] not in self._special

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, token_id: int) -> str:
        return self.hf.id_to_token(int(token_id))

    def stream(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Text deltas per pushed token; a UTF-8 character split over tokens waits until complete.

    Decodes a short window (one token of context plus the pending ones) per push, so each push
    costs O(1) amortized; the deltas plus flush() concatenate to Tokenizer.decode(all ids)."""

    def __init__(self, tok: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok, self._skip = tok, skip_special_tokens
        self._window: list[int] = []  # [context token?, pending tokens...]
        self._context = ""  # the context token's text (already emitted)
        self._started = False  # has any text been emitted (the '▁' strip happens once)

    def push(self, token_id: int) -> str:
        self._window.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        hf, skip = self._tok.hf, self._skip
        text = hf.decode(self._window, skip_special_tokens=skip)
        # U+FFFD at the end means an incomplete character: wait for its remaining bytes.
        if not final and text.endswith("\ufffd"):
            return ""
        delta = text[len(self._context):] if text.startswith(self._context) else text
        if not self._started and delta:
            if self._tok._strips(self._window, skip) and delta[:1] == " ":
                delta = delta[1:]
            self._started = True
        # Keep one token of context, unless it is a lone piece of a character: ByteFallback
        # turns a whole run of byte tokens into U+FFFDs when the run starts mid-character.
        self._window = self._window[-1:]
        self._context = hf.decode(self._window, skip_special_tokens=skip)
        if "\ufffd" in self._context:
            self._window, self._context = [], ""
        return delta


def _added_tokens(tokens: list[str], kinds: np.ndarray) -> dict[int, bool]:
    """Control/unknown tokens (special: True) and user-defined ones (False) by id: the tokens
    llama.cpp matches on the raw text before tokenizing the rest."""
    out = {int(i): int(kinds[i]) != _USER_DEFINED
           for i in np.flatnonzero(np.isin(kinds, (_CONTROL, _USER_DEFINED, _UNKNOWN)))}
    # llama.cpp promotes end-of-generation names to control even when typed normal.
    missing = set(EOG_NAMES) & set(tokens) - {tokens[i] for i in out}
    for name in sorted(missing):  # the last of duplicates, as a {text: id} vocab keeps it
        out[len(tokens) - 1 - tokens[::-1].index(name)] = True
    return out


def _add_tokens(hf: HFTokenizer, tokens: list[str], added: dict[int, bool]) -> None:
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, s in added.items() if s]
    hf.add_special_tokens(special)
    # add_special_tokens marks all special
    hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                   for i, s in added.items() if not s])


def spm_merges(tokens: list[str], scores: np.ndarray) -> list[tuple[str, str]]:
    """SentencePiece BPE as merges: a pair ranks by its concatenation's score (higher first),
    as in llama.cpp's bigram queue; ties (one token, several splits) by the pieces' scores,
    where llama.cpp takes the leftmost pair (not expressible as merge ranks; rarely matters)."""
    index = {t: i for i, t in enumerate(tokens)}
    found: list[tuple[float, float, float, str, str]] = []
    for token, i in index.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            li, ri = index.get(left), index.get(right)
            if li is not None and ri is not None:
                found.append((-scores[i], -scores[li], -scores[ri], left, right))
    found.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in found]


def _build_spm(tokens: list[str], meta: Mapping[str, Any], kinds: np.ndarray,
               added: dict[int, bool]) -> tuple[HFTokenizer | SpmVocab, bool]:
    """On sentencepiece (fast to load), or as `tokenizers` BPE merges where it refuses the vocab."""
    scores = numbers(meta, "tokenizer.ggml.scores", len(tokens))
    scores = np.zeros(len(tokens), np.float32) if scores is None else scores.astype(np.float64)
    unk = token_id(meta, "tokenizer.ggml.unknown_token_id", 0, len(tokens))
    prefix = flag(meta, "tokenizer.ggml.add_space_prefix", True)
    spm = None if unk is None else spm_vocab(tokens, scores, kinds, added, unk, prefix)
    if spm is not None:
        return spm, prefix
    log.info("sentencepiece refuses this vocabulary: building it as BPE merges (slower)")
    vocab = {t: i for i, t in enumerate(tokens)}
    bpe = models.BPE(vocab, spm_merges(tokens, scores), byte_fallback=True, fuse_unk=True,
                     unk_token=tokens[unk] if unk is not None else None)
    hf = HFTokenizer(bpe)
    steps = [normalizers.Prepend("▁")] if prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse()])
    _add_tokens(hf, tokens, added)
    return hf, prefix


def _pre_tokenizer(name: str | None) -> PreTokenizer:
    if name is None:
        log.warning("GGUF has no tokenizer.ggml.pre: using llama.cpp's 'default' splits")
        return PRE_TOKENIZERS["default"]
    if name not in PRE_TOKENIZERS:
        # Decision: run with GPT-2 splits rather than refuse; most ids still agree.
        log.warning("tokenizer.ggml.pre %r is not known here: using GPT-2 splits, so some "
                    "token ids may differ from llama.cpp (pass -t tokenizer.json to avoid)", name)
        return PRE_TOKENIZERS["gpt2"]
    return PRE_TOKENIZERS[name]


def _build_gpt2(tokens: list[str], meta: Mapping[str, Any]) -> tuple[HFTokenizer, PreTokenizer]:
    merges = strings(meta, "tokenizer.ggml.merges")
    if merges is None:
        raise BadValue("tokenizer.ggml.model is 'gpt2' but tokenizer.ggml.merges is missing")
    cuts = [(m, m.find(" ", 1)) for m in merges]  # llama.cpp: the first space after index 0
    pairs = [(m[:c], m[c + 1:]) for m, c in cuts if c > 0]
    pre = _pre_tokenizer(text(meta, "tokenizer.ggml.pre"))
    vocab = {t: i for i, t in enumerate(tokens)}
    # a merge naming a token the vocabulary lacks could never apply (and `tokenizers` refuses it)
    pairs = [p for p in pairs if p[0] in vocab and p[1] in vocab and p[0] + p[1] in vocab]
    hf = HFTokenizer(models.BPE(vocab, pairs, ignore_merges=pre.ignore_merges))
    splits = [pre_tokenizers.Split(Regex(r), "isolated") for r in SPLITS[pre.splits]]
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        splits + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    return hf, pre


def _special_ids(meta: Mapping[str, Any], kind: str, n: int) -> tuple[int | None, int | None]:
    return (token_id(meta, "tokenizer.ggml.bos_token_id", 1 if kind == "llama" else None, n),
            token_id(meta, "tokenizer.ggml.eos_token_id", 2 if kind == "llama" else None, n))


def _eos_ids(hf: HFTokenizer | SpmVocab, meta: Mapping[str, Any], eos: int | None) -> set[int]:
    n = hf.get_vocab_size(with_added_tokens=True)
    ids = {eos} | {token_id(meta, f"tokenizer.ggml.{k}_token_id", None, n) for k in ("eot", "eom")}
    ids |= {hf.token_to_id(name) for name in EOG_NAMES}
    return {int(i) for i in ids if i is not None}


def _set_post_processor(tok: Tokenizer) -> None:
    """So `tok.hf.encode(text)` adds BOS/EOS the same way `tok.encode` does. The template is a
    list of pieces (a token's text may hold spaces); a text the template syntax would misread
    ('$...', ':'), or an id whose text a duplicate took, leaves hf.encode without them."""
    ids = [(tok.bos_id if tok.add_bos else None), (tok.eos_id if tok.add_eos else None)]
    if isinstance(tok.hf, SpmVocab):
        tok.hf.template = (ids[0], ids[1])
        return
    texts = [None if i is None else tok.id_to_token(i) for i in ids]
    if any(i is not None and (t is None or t.startswith("$") or ":" in t) for i, t in zip(ids, texts)):
        log.warning("BOS/EOS token text %r cannot go in a post-processor template: tok.hf.encode "
                    "will not add it (tok.encode does)", texts)
        return
    special = [(t, i) for t, i in zip(texts, ids) if i is not None]
    if special:
        single = [t for t in texts[:1] if t is not None] + ["$A"] + [t for t in texts[1:] if t is not None]
        tok.hf.post_processor = processors.TemplateProcessing(single=single, special_tokens=special)


def build_from_gguf(meta: Mapping[str, Any], source: str = "GGUF") -> Tokenizer:
    """Build (slowly, for big SentencePiece vocabs) the tokenizer GGUF metadata describes.
    source: the file, as messages name it."""
    try:
        return _build(meta, source)
    except BadValue as e:
        raise UserError(f"{source}: tokenizer metadata {e}; pass the model's tokenizer.json with "
                        "-t, or use an undamaged file.") from None


def _build(meta: Mapping[str, Any], source: str) -> Tokenizer:
    kind = text(meta, "tokenizer.ggml.model")
    tokens = strings(meta, "tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{source} has no tokenizer.ggml.tokens; pass the model's tokenizer.json "
                        "with -t.")
    tokens = list(tokens)
    kinds = numbers(meta, "tokenizer.ggml.token_type", len(tokens))
    kinds = np.zeros(len(tokens), np.int64) if kinds is None else kinds
    added = _added_tokens(tokens, kinds)
    if kind == "llama":
        hf, strip = _build_spm(tokens, meta, kinds, added)
        add_bos_default = True
    elif kind == "gpt2":
        (hf, pre), strip = _build_gpt2(tokens, meta), False
        _add_tokens(hf, tokens, added)
        add_bos_default = pre.add_bos
    else:
        raise UserError(f"{source}: tokenizer.ggml.model {str(kind)[:40]!r} is not supported (only "
                        "'llama' and 'gpt2'); pass the model's tokenizer.json with -t.")
    bos, eos = _special_ids(meta, kind, len(tokens))
    tok = Tokenizer(hf, bos, eos, strip_space=strip, eos_ids=_eos_ids(hf, meta, eos),
                    add_bos=flag(meta, "tokenizer.ggml.add_bos_token", add_bos_default),
                    add_eos=flag(meta, "tokenizer.ggml.add_eos_token", False))
    _set_post_processor(tok)
    return tok


def _sidecar(tok: Tokenizer) -> dict[str, Any]:
    side: dict[str, Any] = {
        "format": _CACHE_FORMAT, "bos_id": tok.bos_id, "eos_id": tok.eos_id, "add_bos": tok.add_bos,
        "add_eos": tok.add_eos, "strip_space": tok.strip_space, "eos_ids": sorted(tok.eos_ids)}
    if isinstance(tok.hf, SpmVocab):
        side["spm"] = {"prefix": tok.hf.prefix, "added": sorted(tok.hf.added_specials().items())}
    return side


def save_cache(tok: Tokenizer, cache_dir: Path) -> None:
    """The vocabulary (tokenizer.json, or tokenizer.model for SentencePiece) + sidecar, each
    written to a temp name and renamed (safe vs. readers)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    spm = isinstance(tok.hf, SpmVocab)
    vocab = ((_SPM_FILE, tok.hf.sp.serialized_model_proto()) if spm
             else ("tokenizer.json", tok.hf.to_str().encode()))
    for name, data in (vocab, (_SIDECAR, json.dumps(_sidecar(tok)).encode())):
        tmp = cache_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        tmp.replace(cache_dir / name)
    if spm:  # a format-1 cache's tokenizer.json (14 MB for Gemma-3) is never read again
        (cache_dir / "tokenizer.json").unlink(missing_ok=True)


def load_cache(cache_dir: Path) -> Tokenizer | None:
    try:
        side = json.loads((cache_dir / _SIDECAR).read_text(encoding="utf-8"))
        if side.get("format") != _CACHE_FORMAT:
            return None
        if "spm" in side:  # the processor run.py may have started loading (tokenizer_cache.py)
            data = (cache_dir / _SPM_FILE).read_bytes()
            hf = SpmVocab(data, dict(side["spm"]["added"]), side["spm"]["prefix"],
                          sp=take_prefetched(cache_dir, data))
        else:
            hf = HFTokenizer.from_file(str(cache_dir / "tokenizer.json"))
        tok = Tokenizer(hf, side["bos_id"], side["eos_id"], side["add_bos"], side["add_eos"],
                        side["strip_space"], set(side["eos_ids"]))
    except Exception:  # a missing or broken cache is rebuilt, never fatal
        return None
    if isinstance(hf, SpmVocab):  # tok.hf.encode's BOS/EOS (a tokenizer.json holds its own)
        _set_post_processor(tok)
    return tok


def tokenizer_from_gguf(meta: Mapping[str, Any], cache_path: Path | None = None,
                        source: str = "GGUF") -> Tokenizer:
    """Tokenizer from GGUF metadata; with `cache_path` (a directory keyed by the file's identity,
    chosen by the caller) the built tokenizer is saved there and loaded from it next time.
    source: the file, as error messages name it."""
    if cache_path is not None and (cached := load_cache(Path(cache_path))) is not None:
        return cached
    discard_prefetched()
    tok = build_from_gguf(meta, source)
    if cache_path is not None:
        try:
            save_cache(tok, Path(cache_path))
        except OSError as exc:  # a read-only cache only costs speed
            log.warning("could not cache tokenizer in %s: %s", cache_path, exc)
    return tok


def _token_id(hf: HFTokenizer, value: Any) -> int | None:
    """tokenizer_config.json spells special tokens as a string or {"content": ...}."""
    content = value.get("content") if isinstance(value, dict) else value
    return hf.token_to_id(content) if isinstance(content, str) else None


def _unstrip_decoder(hf: HFTokenizer) -> bool:
    """Move a decoder's 'drop the first space' step into our flag, so windowed stream decoding
    does not strip the space of each window's first token. True when one was moved."""
    if hf.decoder is None:
        return False
    dec = json.loads(hf.decoder.__getstate__())
    if dec.get("type") == "Metaspace" and dec.get("prepend_scheme", "always") != "never":
        dec = {"type": "Replace", "pattern": {"String": dec.get("replacement", "▁")},
               "content": " "}
    elif dec.get("type") == "Sequence" and any(
            d.get("type") == "Strip" and d.get("content") == " " and d.get("start") == 1
            for d in dec.get("decoders", [])):
        dec["decoders"] = [d for d in dec["decoders"] if d.get("type") != "Strip"]
    else:
        return False
    # `tokenizers` builds decoders from JSON only as part of a tokenizer: use an empty one.
    empty = {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}, "decoder": dec}
    hf.decoder = HFTokenizer.from_str(json.dumps(empty)).decoder
    return True


def _adds(hf: HFTokenizer, token_id: int | None) -> bool:
    """Does the tokenizer.json's own post-processor add this token around a text?"""
    if token_id is None:
        return False
    return token_id in hf.encode("a", add_special_tokens=True).ids


def tokenizer_from_file(tokenizer_json: Path, tokenizer_config: dict | None = None,
                        generation_eos: list[int] | None = None) -> Tokenizer:
    """Tokenizer from a tokenizer.json (+ tokenizer_config.json values), as -t supplies."""
    try:
        hf = HFTokenizer.from_file(str(tokenizer_json))
    except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
        raise UserError(f"cannot read tokenizer file {tokenizer_json}: {exc}") from None
    cfg = tokenizer_config or {}
    bos, eos = _token_id(hf, cfg.get("bos_token")), _token_id(hf, cfg.get("eos_token"))
    add_bos = bool(cfg["add_bos_token"]) if "add_bos_token" in cfg else _adds(hf, bos)
    add_eos = bool(cfg["add_eos_token"]) if "add_eos_token" in cfg else _adds(hf, eos)
    strip = _unstrip_decoder(hf)
    eos_ids = {i for i in [eos, *(generation_eos or [])] if i is not None}
    eos_ids |= {i for i in map(hf.token_to_id, EOG_NAMES) if i is not None}
    return Tokenizer(hf, bos, eos, add_bos, add_eos, strip, eos_ids)
