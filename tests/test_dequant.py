"""mistralrs_cli.quant.dequant against gguf-py's numpy dequantization (a port of ggml's reference):
random blocks of every supported type and rows of the real cached models must match bit for bit."""
from __future__ import annotations

import ctypes
import os
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from ggml_reference import ggml_library
from mistralrs_cli.errors import UserError
from mistralrs_cli.quant.dequant import SUPPORTED, block_size, dequantize, row_bytes

# Byte offsets of fp16 scale fields per block; random bytes there could be inf/NaN.
F16_FIELDS = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,), Q.Q8_1: (0, 2),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.IQ4_NL: (0,), Q.IQ4_XS: (0,), Q.IQ2_XXS: (0,), Q.IQ2_XS: (0,), Q.IQ2_S: (0,),
    Q.IQ3_XXS: (0,), Q.IQ3_S: (0,), Q.IQ1_S: (0,),
}
FLOATS = {Q.F32: np.float32, Q.F16: np.float16}
# gguf-py has no dequantizer for these two; ggml's is y = d * qs (Q8_1's s = d*sum(qs) is unused).
OWN_REFERENCE = {Q.Q8_1, Q.Q8_K}


def random_blocks(qtype: Q, n_rows: int, blocks_per_row: int, seed: int = 0) -> np.ndarray:
    """(n_rows, row_bytes) uint8 of random blocks whose scale fields are finite."""
    rng = np.random.default_rng(seed)
    elems = block_size(qtype) * blocks_per_row
    nbytes = row_bytes(qtype, elems) // blocks_per_row
    n = n_rows * blocks_per_row
    if qtype in FLOATS or qtype == Q.BF16:
        vals = rng.standard_normal(n * elems // blocks_per_row).astype(np.float32)
        raw = vals.view(np.uint16)[1::2].copy() if qtype == Q.BF16 else vals.astype(FLOATS[qtype])
        return raw.view(np.uint8).reshape(n_rows, -1)
    b = rng.integers(0, 256, size=(n, nbytes), dtype=np.uint8)
    for off in F16_FIELDS.get(qtype, ()):
        scale = (rng.standard_normal(n) * 0.1).astype(np.float16)
        b[:, off:off + 2] = scale.view(np.uint8).reshape(n, 2)
    if qtype == Q.Q8_K:
        b[:, 0:4] = rng.standard_normal(n).astype(np.float32).view(np.uint8).reshape(n, 4)
    if qtype == Q.IQ1_M:  # fp16 d is spread over the top nibbles of the four u16 scales
        d = rng.standard_normal(n).astype(np.float16).view(np.uint16)
        sc = b[:, 48:56].copy().view(np.uint16)
        for k in range(4):
            sc[:, k] = (sc[:, k] & 0x0FFF) | (((d >> (4 * k)) & 0xF) << 12)
        b[:, 48:56] = sc.view(np.uint8)
    return b.reshape(n_rows, -1)


def reference(raw: np.ndarray, qtype: Q) -> torch.Tensor:
    if qtype in OWN_REFERENCE:
        d_off, q_off, d_type = (0, 4, np.float16) if qtype == Q.Q8_1 else (0, 4, np.float32)
        nbytes = row_bytes(qtype, block_size(qtype))
        b = raw.reshape(-1, nbytes)
        d = b[:, d_off:d_off + np.dtype(d_type).itemsize].copy().view(d_type).astype(np.float32)
        qs = b[:, q_off:q_off + block_size(qtype)].view(np.int8).astype(np.float32)
        out = (qs * d).reshape(*raw.shape[:-1], -1)
    else:
        out = gguf.quants.dequantize(raw, qtype)
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))


@pytest.mark.parametrize("qtype", sorted(SUPPORTED, key=lambda t: t.value), ids=lambda t: t.name)
def test_random_blocks_bit_exact(qtype):
    raw = random_blocks(qtype, n_rows=24, blocks_per_row=3)
    got = dequantize(torch.from_numpy(raw), qtype)
    want = reference(raw, qtype)
    assert got.dtype == torch.float32 and got.shape == want.shape == (24, 3 * block_size(qtype))
    assert not torch.isnan(want).any()
    assert torch.equal(got, want)


def test_supported_types():
    want = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q8_1", "Q2_K", "Q3_K",
            "Q4_K", "Q5_K", "Q6_K", "Q8_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S",
            "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M"}
    assert {t.name for t in SUPPORTED} == want


def test_sizes():
    assert block_size(Q.Q4_K) == 256 and row_bytes(Q.Q4_K, 512) == 288
    assert block_size(Q.F16) == 1 and row_bytes(Q.F16, 10) == 20
    assert row_bytes(Q.Q8_1, 64) == 72  # ggml's 36-byte block_q8_1, not gguf-py's stale 40
    with pytest.raises(UserError, match="Q4_0"):
        row_bytes(Q.Q4_0, 33)


def test_unsupported_type_is_a_user_error():
    with pytest.raises(UserError, match=r"tensor type TQ2_0 is not supported yet; supported: .*Q4_K"):
        dequantize(torch.zeros(2, 66, dtype=torch.uint8), Q.TQ2_0)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_0, Q.IQ2_S, Q.F16], ids=lambda t: t.name)
def test_shapes_layouts_and_dtypes(qtype):
    raw = torch.from_numpy(random_blocks(qtype, n_rows=12, blocks_per_row=2, seed=1))
    flat = dequantize(raw, qtype)
    # leading dims are kept
    assert torch.equal(dequantize(raw.view(3, 4, -1), qtype), flat.view(3, 4, -1))
    # a single row, a row subset (embedding lookup), non-contiguous rows, zero rows
    assert torch.equal(dequantize(raw[5], qtype), flat[5])
    idx = torch.tensor([7, 0, 7, 3])
    assert torch.equal(dequantize(raw[idx], qtype), flat[idx])
    assert torch.equal(dequantize(raw[::3], qtype), flat[::3])
    assert dequantize(raw[:0], qtype).shape == (0, flat.shape[1])
    # bytes at an odd storage offset (scales and float views need alignment)
    shifted = torch.empty(raw.numel() + 1, dtype=torch.uint8)[1:].view(raw.shape)
    shifted.copy_(raw)
    assert torch.equal(dequantize(shifted, qtype), flat)
    for dtype in (torch.float16, torch.bfloat16):
        assert torch.equal(dequantize(raw, qtype, dtype), flat.to(dtype))


def test_runs_on_meta_device():
    """No constant is pinned to the CPU: every type traces on a device-less tensor."""
    for qtype in SUPPORTED:
        nbytes = row_bytes(qtype, 2 * block_size(qtype))
        out = dequantize(torch.empty(3, nbytes, dtype=torch.uint8, device="meta"), qtype)
        assert out.shape == (3, 2 * block_size(qtype)) and out.device.type == "meta", qtype.name


def test_rejects_partial_blocks():
    with pytest.raises(ValueError, match="Q4_K"):
        dequantize(torch.zeros(2, 145, dtype=torch.uint8), Q.Q4_K)


# --- real models -----------------------------------------------------------------------------------

def models_dir() -> Path:
    env = os.environ.get("MISTRALRS_CLI_CACHE")
    return Path(env) / "models" if env else Path.home() / ".cache" / "mistralrs-cli" / "models"


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def tensor_table(path: Path) -> tuple[dict[str, tuple[Q, tuple[int, ...], int]], int]:
    """A minimal GGUF header walk: {name: (type, shape, absolute data offset)}; skips the metadata
    (gguf.GGUFReader parses Gemma's 262k-token vocab, ~16 s)."""
    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # metadata and tensor infos of both models fit well within this
    pos = 0

    def take(fmt):
        nonlocal pos
        vals = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return vals[0] if len(vals) == 1 else vals

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode()

    def skip(vtype):
        nonlocal pos
        if vtype == 8:
            n = take("Q")  # not `pos += take(...)`: that would add to the stale pos
            pos += n
        elif vtype == 9:
            etype, count = take("IQ")
            if etype in _SCALARS:
                pos += struct.calcsize("<" + _SCALARS[etype]) * count
            else:
                for _ in range(count):
                    skip(etype)
        else:
            pos += struct.calcsize("<" + _SCALARS[vtype])

    magic, _version, n_tensors, n_kv = take("4sIQQ")
    assert magic == b"GGUF"
    alignment = 32
    for _ in range(n_kv):
        key, vtype = string(), take("I")
        if key == "general.alignment":
            alignment = take("I")
        else:
            skip(vtype)
    infos = {}
    for _ in range(n_tensors):
        name = string()
        dims = take("I")
        shape = tuple(reversed([take("Q") for _ in range(dims)]))  # GGUF stores ne[0] first
        qtype, offset = Q(take("I")), take("Q")
        infos[name] = (qtype, shape, offset)
    start = -(-pos // alignment) * alignment
    return {k: (t, s, start + o) for k, (t, s, o) in infos.items()}, start


REAL_MODELS = ["SmolLM2-135M-Instruct.Q4_1.gguf", "gemma-3-270m-q4_k_m.gguf"]


@pytest.mark.parametrize("filename", REAL_MODELS)
def test_real_tensors_bit_exact(filename):
    path = models_dir() / filename
    if not path.exists():
        pytest.skip(f"{path} not cached")
    table, _ = tensor_table(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    seen: dict[Q, int] = {}
    for name, (qtype, shape, offset) in table.items():
        if seen.get(qtype, 0) >= 2:  # two tensors of each type, three rows of each
            continue
        seen[qtype] = seen.get(qtype, 0) + 1
        width = row_bytes(qtype, shape[-1])
        n_rows = int(np.prod(shape[:-1]))
        rows = np.array([0, n_rows // 2, n_rows - 1])
        raw = np.stack([data[offset + r * width: offset + (r + 1) * width] for r in rows])
        got = dequantize(torch.from_numpy(raw), qtype)
        assert torch.equal(got, reference(raw, qtype)), f"{filename}: {name} ({qtype.name})"
        assert got.isfinite().all() and got.abs().max() < 1e3, f"{name}: misread offset?"
    assert set(seen) <= SUPPORTED
    expected = {Q.Q4_1, Q.Q8_0, Q.F32} if "SmolLM2" in filename else {Q.Q4_K, Q.Q5_0, Q.Q6_K, Q.Q8_0, Q.F32}
    assert expected <= set(seen), sorted(t.name for t in seen)


# --- llama.cpp itself (tests/ggml_reference.py builds its libggml-base) ---------------------------------------------------

@pytest.mark.parametrize("qtype", sorted(SUPPORTED - {Q.F32, Q.F16, Q.BF16, Q.Q8_1}, key=lambda t: t.value),
                         ids=lambda t: t.name)
def test_random_blocks_match_llama_cpp(qtype):
    """ggml's own dequantize_row_* (libggml-base, tests/ggml_reference.py), where gguf-py's port is
    the only other reference; Q8_K and the IQ types included. ggml has no dequantize_row_q8_1."""
    lib = ggml_library()
    fn = getattr(lib, f"dequantize_row_{qtype.name.lower().replace('_k', '_K')}")
    fn.restype, fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    raw = np.ascontiguousarray(random_blocks(qtype, n_rows=16, blocks_per_row=2, seed=5))
    want = np.zeros((16, 2 * block_size(qtype)), np.float32)
    fn(raw.ctypes.data, want.ctypes.data, want.size)
    assert torch.equal(dequantize(torch.from_numpy(raw), qtype), torch.from_numpy(want))
