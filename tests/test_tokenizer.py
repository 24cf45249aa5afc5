"""Tokenizers from GGUF metadata against llama.cpp's recorded ids (tests/fixtures), plus tiny
GGUF vocabs written here and tokenizer.json files saved by `tokenizers`.

The real-model tokenizers are cached under the model cache, keyed by the GGUF file and by this
package's tokenizer source, so only the first run pays for reading the Gemma vocab."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

import mistralrs_cli.loaders.tokenizer as tokmod
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.spm_vocab import SpmVocab
from mistralrs_cli.loaders.tokenizer import (Tokenizer, load_cache, tokenizer_from_file,
                                             tokenizer_from_gguf)

FIXTURES = Path(__file__).parent / "fixtures"
CACHE_ROOT = Path(os.environ.get("MISTRALRS_CLI_CACHE") or Path.home() / ".cache" / "mistralrs-cli")
MODEL_FILES = {"smollm2": "SmolLM2-135M-Instruct.Q4_1.gguf", "gemma3": "gemma-3-270m-q4_k_m.gguf"}
TOKENS = json.loads((FIXTURES / "llamacpp_tokens.json").read_text(encoding="utf-8"))
TEXTS: list[str] = TOKENS["texts"]


def gguf_meta(path: Path) -> dict:
    """GGUF metadata as the runtime hands it over: numeric arrays as numpy, strings as str."""
    import gguf

    meta = {}
    for key, fld in gguf.GGUFReader(path).fields.items():
        value = fld.contents()
        if isinstance(value, list) and value and not isinstance(value[0], str):
            value = np.asarray(value)
        meta[key] = value
    return meta


def model_path(name: str) -> Path:
    path = CACHE_ROOT / "models" / MODEL_FILES[name]
    if not path.exists():
        pytest.skip(f"{path} is absent: run scripts/fetch_models.py to test on real models")
    return path


def cache_dir(path: Path) -> Path:
    """Keyed by the GGUF file and tokenizer.py, so a code change rebuilds the cached tokenizer."""
    code = hashlib.sha1(Path(tokmod.__file__).read_bytes()).hexdigest()[:12]
    st = path.stat()
    return CACHE_ROOT / "test-tokenizers" / f"{path.stem}-{st.st_size}-{st.st_mtime_ns}-{code}"


@pytest.fixture(scope="module", params=sorted(MODEL_FILES))
def real(request) -> tuple[str, Tokenizer]:
    path = model_path(request.param)
    cached = load_cache(cache_dir(path))
    return request.param, cached or tokenizer_from_gguf(gguf_meta(path), cache_dir(path))


def body(tok: Tokenizer, ids: list[int]) -> list[int]:
    """Ids without the BOS that encode() adds, as llama.cpp's detokenized fixture text has."""
    return ids[1:] if tok.add_bos and ids[:1] == [tok.bos_id] else ids


def stream_text(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    sd = tok.stream(skip_special_tokens)
    return [sd.push(i) for i in ids] + [sd.flush()]


# ---- real models against llama.cpp ------------------------------------------------------------

def test_ids_match_llamacpp(real):
    name, tok = real
    cases = TOKENS["models"][name]["cases"]
    assert tok.add_bos == TOKENS["models"][name]["add_bos"]
    bad = [(s, tok.encode(s), c["ids"]) for s, c in zip(TEXTS, cases) if tok.encode(s) != c["ids"]]
    assert not bad, f"{len(bad)}/{len(TEXTS)} differ from llama.cpp, first: {bad[0]!r}"


def test_decode_roundtrips_like_llamacpp(real):
    name, tok = real
    for text, case in zip(TEXTS, TOKENS["models"][name]["cases"]):
        got = tok.decode(body(tok, case["ids"]))
        assert got == case["detok"], text
        if case["roundtrip"]:
            assert tok.decode(body(tok, tok.encode(text))) == text


def test_stream_deltas_concatenate_to_decode(real):
    name, tok = real
    for text, case in zip(TEXTS, TOKENS["models"][name]["cases"]):
        for skip in (False, True):
            full = tok.decode(case["ids"], skip_special_tokens=skip)
            deltas = stream_text(tok, case["ids"], skip)
            assert "".join(deltas) == full, text
            if "\ufffd" not in full:
                assert not any("\ufffd" in d for d in deltas), text


def test_special_ids_and_eos(real):
    name, tok = real
    expect = {"smollm2": (1, 2, {0, 2}, "<|im_start|>"), "gemma3": (2, 1, {1, 106}, "<start_of_turn>")}
    bos, eos, eos_ids, turn = expect[name]
    assert (tok.bos_id, tok.eos_id) == (bos, eos)
    assert eos_ids <= tok.eos_ids
    assert tok.encode(turn, add_special_tokens=False) == [tok.token_to_id(turn)]
    assert tok.id_to_token(tok.token_to_id(turn)) == turn
    assert tok.vocab_size == {"smollm2": 49152, "gemma3": 262144}[name]


def test_stream_window_stays_small(real):
    _, tok = real
    sd = tok.stream()
    ids = tok.encode("The quick brown fox 🦊 jumps over the lazy dog. " * 40, False)
    out = "".join(sd.push(i) for i in ids) + sd.flush()
    assert out == tok.decode(ids)
    assert len(sd._window) <= 2


@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_runtime_reader_cold_build_and_cache(name, tmp_path):
    """The runtime's GGUF reader gives the same tokenizer; its cache reloads it identically."""
    from mistralrs_cli.loaders.gguf_file import GGUFFile

    meta = GGUFFile(model_path(name)).metadata
    cold = tokenizer_from_gguf(meta, tmp_path)
    cached = tokenizer_from_gguf({}, tmp_path)  # metadata unused on a cache hit
    for text, case in zip(TEXTS, TOKENS["models"][name]["cases"]):
        assert cold.encode(text) == case["ids"], text
        assert cached.encode(text) == case["ids"], text
    assert (cached.bos_id, cached.eos_id, cached.add_bos, cached.eos_ids) == (
        cold.bos_id, cold.eos_id, cold.add_bos, cold.eos_ids)
    assert type(cached.hf) is type(cold.hf) is (SpmVocab if name == "gemma3" else HFTokenizer)


# ---- tiny GGUF vocabs written here --------------------------------------------------------------

def write_gguf(path: Path, tokens: list[str], types: list[int], **kv) -> Path:
    import gguf

    w = gguf.GGUFWriter(path, "llama")
    w.add_tokenizer_model(kv.pop("model"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    for key, value in kv.items():
        getattr(w, f"add_{key}")(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """LLaMA layout: <unk> <s> </s>, byte tokens at 3..258, then pieces (higher score first)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["▁", "a", "b", "l", "o", "h", "e", "é", "▁a", "ab", "▁ab", "▁h", "ll", "▁he", "llo",
              "▁hello", "▁b", "lo", "<|user|>", "  "]
    tokens += pieces
    types += [1] * (len(pieces) - 2) + [3, 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


@pytest.mark.parametrize("prefix", [None, False])
def test_tiny_spm_gguf(tmp_path, prefix):
    tokens, scores, types = spm_vocab()
    extra = {} if prefix is None else {"add_space_prefix": prefix}
    path = write_gguf(tmp_path / "spm.gguf", tokens, types, model="llama", token_scores=scores,
                      bos_token_id=1, eos_token_id=2, **extra)
    tok = tokenizer_from_gguf(gguf_meta(path))
    ids = {t: i for i, t in enumerate(tokens)}
    assert tok.add_bos and tok.strip_space == (prefix is None)  # SPM defaults: BOS, '▁' prefix
    assert isinstance(tok.hf, SpmVocab)  # on the sentencepiece library
    lead = ["▁ab"] if prefix is None else ["ab"]
    assert tok.encode("ab") == [1] + [ids[t] for t in lead]
    assert tok.encode("<|user|>ab  b", False)[:1] == [ids["<|user|>"]]
    assert ids["  "] in tok.encode("ab  b", False)
    # After a special or user-defined token llama.cpp prefixes the next text with '▁' again.
    expect = [ids[t] for t in (lead + ["  ", "▁hello" if prefix is None else "h"])]
    assert tok.encode("ab  hello", False)[:3] == expect
    texts = ["hello", "héllo € 日本", "a\nb\t", "  x", ""]
    for text in texts + (["ab ab  hello", "<|user|>hello"] if prefix is False else []):
        got = tok.encode(text)
        assert tok.decode(got[1:]) == text
        assert "".join(stream_text(tok, got)) == tok.decode(got)
        assert not any("\ufffd" in d for d in stream_text(tok, got))
    assert tok.decode([ids[f"<0x{b:02X}>"] for b in "€".encode()]) == "€"


@pytest.mark.parametrize("extra", [("▁he", 1)])
def test_tiny_spm_vocab_sentencepiece_refuses(tmp_path, extra):
    """A duplicated piece (sentencepiece refuses it) still loads, as `tokenizers` BPE merges.
    (A 3,000-character added token, which a split regex once refused, loads on sentencepiece:
    tests/test_tokenizer_cache.py.)"""
    tokens, scores, types = spm_vocab()
    tokens, scores, types = tokens + [extra[0]], scores + [-99.0], types + [extra[1]]
    path = write_gguf(tmp_path / "dup.gguf", tokens, types, model="llama", token_scores=scores,
                      bos_token_id=1, eos_token_id=2)
    tok = tokenizer_from_gguf(gguf_meta(path), tmp_path / "cache")
    assert isinstance(tok.hf, HFTokenizer)
    ids = {t: i for i, t in enumerate(tokens[:-1])}
    # best-scored pair first: ▁h ll ▁he llo ▁hello (a duplicate ▁he: ▁he later), ▁a ▁ab
    assert tok.encode("hello ab") == [1, ids["▁hello"], ids["▁ab"]]
    assert tok.decode(tok.encode("hello ab")[1:]) == "hello ab"
    assert load_cache(tmp_path / "cache").encode("hello ab") == tok.encode("hello ab")


CORPUS = ["Hello world, this is a tiny corpus.", "Tokenizers build byte-level BPE merges.",
          "Numbers 12345 and 2024; symbols !? — and ünïcödé, 日本語, emoji 🙂.",
          "def f(x):\n    return x * 2\n"] * 20


def trained_bytelevel() -> HFTokenizer:
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                  "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(CORPUS, trainer)
    return hf


def test_tiny_gpt2_gguf_matches_tokenizers(tmp_path):
    hf = trained_bytelevel()
    spec = json.loads(hf.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    merges = [" ".join(m) if isinstance(m, list) else m for m in spec["merges"]]
    types = [3 if t.startswith("<|") else 1 for t in tokens]
    path = write_gguf(tmp_path / "bpe.gguf", tokens, types, model="gpt2", tokenizer_pre="gpt2",
                      token_merges=merges, bos_token_id=0, eos_token_id=2)
    tok = tokenizer_from_gguf(gguf_meta(path))
    assert not tok.add_bos and tok.eos_ids == {0, 2}
    for text in CORPUS[:4] + ["  spaced   out  ", "新しい 🙂🙂 <|im_start|>user\nhi<|im_end|>", ""]:
        ids = tok.encode(text)
        if "<|" not in text:
            assert ids == hf.encode(text).ids  # same GPT-2 regex, so the same ids
        assert tok.decode(ids) == text
        assert "".join(stream_text(tok, ids)) == text


def test_unknown_pre_warns_and_uses_gpt2(caplog):
    hf = trained_bytelevel()
    spec = json.loads(hf.to_str())["model"]
    tokens = [t for t, _ in sorted(spec["vocab"].items(), key=lambda kv: kv[1])]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "no-such-pre",
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": [" ".join(m) for m in spec["merges"]]}
    with caplog.at_level(logging.WARNING):
        tok = tokenizer_from_gguf(meta)
    assert "no-such-pre" in caplog.text
    assert tok.encode(CORPUS[0]) == hf.encode(CORPUS[0]).ids


@pytest.mark.parametrize("meta", [
    {"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]},
    {"tokenizer.ggml.model": "llama"},
    {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a"]},
])
def test_user_errors(meta):
    with pytest.raises(UserError):
        tokenizer_from_gguf(meta)


# ---- tokenizer.json (-t) ------------------------------------------------------------------------

def test_tokenizer_from_file_bytelevel(tmp_path):
    hf = trained_bytelevel()
    hf.save(str(tmp_path / "tokenizer.json"))
    cfg = {"bos_token": "<|im_start|>", "eos_token": {"content": "<|im_end|>"},
           "add_bos_token": True}
    tok = tokenizer_from_file(tmp_path / "tokenizer.json", cfg, generation_eos=[0])
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.add_eos) == (1, 2, True, False)
    assert tok.eos_ids == {0, 2}
    for text in CORPUS[:4] + ["<|im_start|>x<|im_end|>", "  a  "]:
        ids = tok.encode(text)
        assert ids == [1] + hf.encode(text).ids
        assert tok.decode(ids[1:]) == text
        assert "".join(stream_text(tok, ids, True)) == tok.decode(ids, True)


def test_tokenizer_from_file_metaspace_strip(tmp_path):
    """A SentencePiece-style tokenizer.json whose decoder drops the first space."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁": 3, "a": 4, "b": 5, "▁a": 6, "▁b": 7, "ab": 8}
    hf = HFTokenizer(models.BPE(vocab, [("▁", "a"), ("▁", "b"), ("a", "b")], unk_token="<unk>"))
    hf.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    hf.add_special_tokens(["<s>", "</s>"])
    hf.save(str(tmp_path / "tokenizer.json"))
    tok = tokenizer_from_file(tmp_path / "tokenizer.json", {"bos_token": "<s>",
                                                           "add_bos_token": True})
    assert tok.strip_space
    for text in ["a b", "ab  ab", " a", "b"]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids)
        assert "".join(stream_text(tok, ids, True)) == tok.decode(ids, True)
    assert tok.decode([tok.token_to_id("▁"), 6]) == " a"


def test_tokenizer_from_file_bad_path(tmp_path):
    with pytest.raises(UserError):
        tokenizer_from_file(tmp_path / "missing.json")


@pytest.mark.parametrize("pre", sorted(tokmod.PRE_TOKENIZERS))
def test_every_pre_tokenizer_builds(pre):
    """Each llama.cpp split table compiles in `tokenizers` and round-trips mixed text."""
    hf = trained_bytelevel()
    spec = json.loads(hf.to_str())["model"]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": [t for t, _ in sorted(spec["vocab"].items(),
                                                           key=lambda kv: kv[1])],
            "tokenizer.ggml.merges": [" ".join(m) for m in spec["merges"]]}
    tok = tokenizer_from_gguf(meta)
    text = "It's 2024: Hello World, ΑΒΓ 日本語 ｶﾀｶﾅ!\r\n  x\ty  12345 🙂"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
