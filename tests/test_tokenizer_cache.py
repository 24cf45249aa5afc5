"""The added-token matcher against a longest-first regex alternation, and the early load of a
cached SentencePiece vocabulary (loaders/tokenizer_cache.py): a prefetched processor must encode
and decode exactly as one the load builds itself, and is used only when its bytes are the
cache's; a changed GGUF file gets a new cache key."""
from __future__ import annotations

import os
import random
import re
import time
from pathlib import Path

import pytest

from mistralrs_cli.loaders import tokenizer_cache
from mistralrs_cli.loaders.spm_vocab import AddedMatcher, SpmVocab
from mistralrs_cli.loaders.tokenizer import load_cache, tokenizer_from_gguf
from mistralrs_cli.types import GGUFSpec, LoadOptions
from test_tokenizer import gguf_meta, model_path, spm_vocab, write_gguf


def regex_matches(words: set[str], text: str) -> list[tuple[int, str]]:
    """The reference: Python's re tries the alternatives in order, so longest first gives the
    longest token at the leftmost position where one starts."""
    alt = re.compile("|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)))
    return [(m.start(), m.group()) for m in alt.finditer(text)]


TRICKY = {"<a", "<ab", "<abc>", "<abd>", "\n", "\n\n", "\n\n\n\n", "  ", "   ", "\t", "[x]", "a-b",
          "^", "\\", "]", "-", "é", "é>", "🙂", "🙂🙂x", "<", "<<<"}


@pytest.mark.parametrize("seed", range(5))
def test_matcher_is_leftmost_longest(seed):
    rng = random.Random(seed)
    pieces = sorted(TRICKY) + list("ab<>c \n\t-x]^\\é🙂") + ["<ab", "<abc", "\n\n\n", "plain"]
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 25)))
        got = list(AddedMatcher(TRICKY).finditer(text))
        assert got == regex_matches(TRICKY, text), repr(text)
    assert list(AddedMatcher([]).finditer("anything <a")) == []


def test_huge_added_token_loads_on_sentencepiece(tmp_path):
    """A 3,000-character added token (too deep for the trie regex this matcher replaced)."""
    tokens, scores, types = spm_vocab()
    huge = "<" + "x" * 3000 + ">"
    path = write_gguf(tmp_path / "huge.gguf", tokens + [huge], types + [3], model="llama",
                      token_scores=scores + [-99.0], bos_token_id=1, eos_token_id=2)
    tok = tokenizer_from_gguf(gguf_meta(path), tmp_path / "cache")
    assert isinstance(tok.hf, SpmVocab)
    ab = tok.encode("ab", add_special_tokens=False)
    ids = tok.encode("ab" + huge + "ab" + huge[:-1], add_special_tokens=False)
    assert ids[:len(ab) + 1] == ab + [len(tokens)]
    assert ids.count(len(tokens)) == 1  # the cut-off copy at the end is text
    assert tok.decode(ids[:len(ab) + 1]) == "ab" + huge


GEMMA_TEXTS = ["<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n", "<unused0><unused12>x<unused",
               "a  b   c\n\n\nd\t\te    ", "[multimodal] <start_of_image> <b>bold</b><table>", "", " ", "<",
               "héllo € 日本 🙂 <eos><bos><pad>", "end with tag <end_of_turn>", "<<start_of_turn>>"]


def test_gemma_split_and_cached_tokenizer(tmp_path):
    """On Gemma-3's 6,400 added tokens: the split is the regex's, and the cached tokenizer (with
    and without a prefetched processor) encodes and decodes as the freshly built one."""
    from mistralrs_cli.loaders.gguf_file import GGUFFile

    path = model_path("gemma3")
    meta = GGUFFile(path).metadata
    fresh = tokenizer_from_gguf(meta)
    words = set(fresh.hf._added_ids)
    assert len(words) > 6000
    for text in GEMMA_TEXTS:
        assert list(fresh.hf._split.finditer(text)) == regex_matches(words, text), repr(text)
    cache = tmp_path / "cache"
    tokenizer_from_gguf(meta, cache)  # builds and saves
    cached = load_cache(cache)
    tokenizer_cache._pending = pending = tokenizer_cache._Prefetch(cache)
    prefetched = load_cache(cache)
    assert tokenizer_cache._pending is None and prefetched.hf.sp is pending.sp is not None
    for text in GEMMA_TEXTS:
        ids = fresh.encode(text)
        assert cached.encode(text) == ids and prefetched.encode(text) == ids, repr(text)
        for skip in (False, True):
            want = fresh.decode(ids, skip_special_tokens=skip)
            assert cached.decode(ids, skip) == want and prefetched.decode(ids, skip) == want


def tiny_gguf(path: Path) -> Path:
    tokens, scores, types = spm_vocab()
    return write_gguf(path, tokens, types, model="llama", token_scores=scores, bos_token_id=1,
                      eos_token_id=2)


def test_prefetch_from_the_command_line_spec(tmp_path, monkeypatch):
    """prefetch_gguf_tokenizer starts for a local GGUF whose tokenizer is cached, and only then;
    a changed file has another cache key, so the stale prefetch is not used."""
    monkeypatch.setenv("MISTRALRS_CLI_CACHE", str(tmp_path / "home"))
    path = tiny_gguf(tmp_path / "m.gguf")
    opts = LoadOptions()
    tokenizer_cache.prefetch_gguf_tokenizer(GGUFSpec(str(path)), opts)
    assert tokenizer_cache._pending is None  # nothing cached yet
    cache = tokenizer_cache.tokenizer_cache_dir(path)
    built = tokenizer_from_gguf(gguf_meta(path), cache)
    for spec in (GGUFSpec(str(path), tok_model_id="x"), GGUFSpec(str(tmp_path / "none.gguf"))):
        tokenizer_cache.prefetch_gguf_tokenizer(spec, opts)
        assert tokenizer_cache._pending is None
    tokenizer_cache.prefetch_gguf_tokenizer(GGUFSpec(str(path)), LoadOptions(tp=2))
    assert tokenizer_cache._pending is None
    for spec in (GGUFSpec(str(path)), GGUFSpec(path.name, quantized_model_id=str(tmp_path))):
        tokenizer_cache.prefetch_gguf_tokenizer(spec, opts)
        pending = tokenizer_cache._pending
        assert pending is not None and pending.cache_dir == cache
        tok = load_cache(cache)
        assert tokenizer_cache._pending is None and tok.hf.sp is pending.sp is not None
        assert tok.encode("hello ab") == built.encode("hello ab")
    # the file changes: a new key, and the prefetch for the old one is dropped, not used
    tokenizer_cache.prefetch_gguf_tokenizer(GGUFSpec(str(path)), opts)
    os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns + 1_000_000))
    assert tokenizer_cache.tokenizer_cache_dir(path) != cache
    tokenizer_from_gguf(gguf_meta(path), tokenizer_cache.tokenizer_cache_dir(path))
    assert tokenizer_cache._pending is None


def test_prefetch_used_only_for_the_same_bytes(tmp_path):
    cache = tmp_path / "cache"
    path = tiny_gguf(tmp_path / "m.gguf")
    tokenizer_from_gguf(gguf_meta(path), cache)
    data = (cache / tokenizer_cache.SPM_FILE).read_bytes()
    tokenizer_cache._pending = tokenizer_cache._Prefetch(cache)
    sp = tokenizer_cache.take_prefetched(cache, data)
    assert sp is not None and sp.serialized_model_proto() == data
    tokenizer_cache._pending = tokenizer_cache._Prefetch(cache)
    assert tokenizer_cache.take_prefetched(cache, data + b"\x00") is None
    tokenizer_cache._pending = tokenizer_cache._Prefetch(cache)
    assert tokenizer_cache.take_prefetched(tmp_path / "other", data) is None
    tokenizer_cache._pending = tokenizer_cache._Prefetch(tmp_path / "missing")
    assert tokenizer_cache.take_prefetched(tmp_path / "missing", b"") is None
    assert tokenizer_cache.take_prefetched(cache, data) is None  # nothing pending
