"""The repacked-weight cache (backends/repack_cache.py): a start that reads the packed weights
back gives bit-identical logits to one that repacks them; a stale or truncated cache file is
ignored (repacked again, and rewritten); MISTRALRS_CLI_NO_REPACK_CACHE=1 writes and reads none."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.backends import native, repack_cache
from mistralrs_cli.backends.native_model import NativeModel
from mistralrs_cli.engine.kv_cache import cache_for
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.batch import Batch, SeqSlice
from mistralrs_cli.types import GGUFSpec, LoadOptions

PROMPT = [1, 5, 9, 2, 7, 3]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    vocab = gb.gguf_vocab(gb.train_tokenizer())
    return gb.write_gguf(tmp_path_factory.mktemp("repack") / "tiny.gguf", gb.tiny_llama(3), vocab=vocab, qtype=Q.Q4_1)


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    if native.library() is None:
        pytest.skip("no C compiler: no native runtime")
    monkeypatch.setenv("MISTRALRS_CLI_CACHE", str(tmp_path))
    monkeypatch.delenv("MISTRALRS_CLI_NO_REPACK_CACHE", raising=False)
    monkeypatch.setattr(repack_cache, "MIN_BYTES", 0)  # the tiny model is cached too
    return tmp_path / "native" / "repack"


def _logits(path, repacks: list, **opts) -> np.ndarray:
    """The prompt's logits from a fresh load; appends to `repacks` each time repack_jobs runs."""
    lib = native.library()
    real = lib.repack_jobs

    def counted(*args):
        repacks.append(1)
        return real(*args)

    lib.repack_jobs = counted
    try:
        model = load(GGUFSpec(str(path)), LoadOptions(token_source="none", **opts)).model
    finally:
        lib.repack_jobs = real
    assert isinstance(model, NativeModel)
    with torch.inference_mode():
        out = model(torch.tensor(PROMPT), Batch(torch.arange(len(PROMPT)), [SeqSlice(0, len(PROMPT), cache_for(model))]))
    return np.asarray(out, dtype=np.float32)


def _files(d):
    return sorted(d.glob("*.bin")) if d.exists() else []


def test_a_cache_hit_gives_the_logits_of_a_fresh_repack(gguf_path, cache_env, monkeypatch):
    monkeypatch.setenv("MISTRALRS_CLI_NO_REPACK_CACHE", "1")
    repacks = []
    want = _logits(gguf_path, repacks)
    assert repacks and not _files(cache_env)
    monkeypatch.delenv("MISTRALRS_CLI_NO_REPACK_CACHE")
    first = _logits(gguf_path, repacks)  # repacks and writes the file
    assert len(repacks) == 2 and len(_files(cache_env)) == 1
    hit = _logits(gguf_path, repacks)  # reads it back
    assert len(repacks) == 2, "the second start should not repack"
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(hit, want)


@pytest.mark.parametrize("damage", ["truncated", "stale header", "another numerics mode"])
def test_a_truncated_or_stale_cache_file_is_repacked_and_rewritten(gguf_path, cache_env, damage):
    repacks = []
    want = _logits(gguf_path, repacks)
    (f,) = _files(cache_env)
    size = f.stat().st_size
    if damage == "truncated":
        with open(f, "r+b") as fh:
            fh.truncate(size - 100)
    elif damage == "stale header":
        data = bytearray(f.read_bytes())
        data[20] ^= 0xFF  # inside the digest: as if the GGUF file or the kernels had changed
        f.write_bytes(bytes(data))
    if damage == "another numerics mode":
        _logits(gguf_path, repacks, numerics="fast")  # its own key: repacks, replaces the file
        assert len(repacks) == 2
        np.testing.assert_array_equal(_logits(gguf_path, repacks), want)
        assert len(repacks) == 3
        return
    got = _logits(gguf_path, repacks)
    assert len(repacks) == 2, "a damaged cache file must not be used"
    np.testing.assert_array_equal(got, want)
    assert f.stat().st_size == size  # rewritten whole
    _logits(gguf_path, repacks)
    assert len(repacks) == 2
