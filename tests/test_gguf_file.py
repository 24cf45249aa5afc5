"""Our GGUF header reader against gguf-py's GGUFReader, field for field: every metadata value
and every tensor's name, type, shape, offset and bytes. (GGUFReader takes ~16 s on Gemma-3's
vocabulary, so the real-file comparison uses SmolLM2; a tiny written file covers the rest.)"""
from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFValueType

import gguf_builder as gb
from mistralrs_cli.loaders.gguf_file import GGUFFile


def _reader_value(field):
    value = field.contents()
    if field.types and field.types[0] == GGUFValueType.ARRAY and field.types[-1] not in (GGUFValueType.STRING,):
        return np.asarray(value)
    return value


def _compare(path):
    ours, ref = GGUFFile(path), GGUFReader(path)
    ref_meta = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert set(ours.metadata) == set(ref_meta)
    for key, field in ref_meta.items():
        expected, got = _reader_value(field), ours.metadata[key]
        if isinstance(expected, np.ndarray):
            assert np.array_equal(np.asarray(got), expected), key
        elif isinstance(expected, float):
            assert got == pytest.approx(expected, rel=0, abs=0), key
        else:
            assert got == expected, key
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.qtype == t.tensor_type and info.shape == tuple(int(d) for d in reversed(t.shape))
        assert info.offset == t.data_offset and info.nbytes == t.n_bytes
        assert np.array_equal(ours.raw(t.name).numpy().reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1))


def test_real_file_matches_gguf_reader(smollm2_path):
    _compare(smollm2_path)


def test_written_file_matches_gguf_reader(tmp_path):
    path = gb.write_gguf(tmp_path / "tiny.gguf", gb.tiny_gemma3(0), gb.gguf_vocab(gb.train_tokenizer()),
                         chat_template="{{ messages }}")
    _compare(path)
