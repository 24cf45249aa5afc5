"""Every cuda/*.cu kernel, run on the CPU emulator through the CuPy backend's own launch code,
against the torch reference (mistralrs_cli.quant.dequant, itself bit-exact with gguf-py):
dequantization bit for bit, GEMV and GEMM within 1e-5 of f64 products (f32 accumulation). Each
launch runs under forward, reverse and shuffled thread orders and must give identical bytes (the
launcher raises otherwise). Shapes are chosen to leave partial warps, blocks and tiles."""
from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from cuda_emu.fixtures import emu_launcher, random_qweight
from mistralrs_cli.backends import cupy_backend as cb
from mistralrs_cli.quant.dequant import dequantize, block_size
from mistralrs_cli.quant.qweight import QWeight, QWeightGroup

TYPES = list(cb.KERNEL_TAGS)
ROWS = 7  # not a multiple of the 4 rows a GEMV block covers, nor of a 32-row GEMM tile


def _cols(qtype: Q) -> int:
    """Row length: 77 for the float types (no multiple of a 32-wide tile), else a few blocks."""
    return {1: 77, 32: 96, 256: 512}[block_size(qtype)]


@pytest.fixture(scope="module")
def backend() -> cb.CupyBackend:
    return cb.CupyBackend(emu_launcher())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
def test_dequantize_is_bit_exact(backend, qtype):
    w = random_qweight(qtype, ROWS, _cols(qtype), seed=3)
    ref = dequantize(w.raw, qtype, torch.float32)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        got = backend.dequantize(w, dtype)
        assert got.shape == w.shape and got.dtype == dtype
        assert torch.equal(_bits(got), _bits(ref.to(dtype))), f"{qtype.name} -> {dtype}"


def _check_product(y: torch.Tensor, x: torch.Tensor, w: QWeight) -> None:
    dense = w.dequantize(torch.float32).double()
    ref = x.double() @ dense.T
    bound = x.double().abs() @ dense.abs().T  # the sum of |terms|: what f32 rounding scales with
    err = ((y.double() - ref).abs() / bound.clamp_min(1e-30)).max().item()
    assert err <= 1e-5, f"{w.qtype.name}: relative error {err:.2e}"


@pytest.mark.parametrize("qtype", TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("m", [1, 5, 8, 37], ids=lambda m: f"M{m}")
def test_qmatmul_matches_reference(backend, qtype, m):
    """M <= 8 runs the GEMV, 37 the tiled GEMM (two row tiles, the second mostly empty)."""
    w = random_qweight(qtype, ROWS, _cols(qtype), seed=5)
    x = torch.randn(m, w.shape[1], generator=torch.Generator().manual_seed(m))
    y = backend.qmatmul(x, w)
    assert y.shape == (m, ROWS) and y.dtype == torch.float32
    _check_product(y, x, w)


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q5_1, Q.Q3_K], ids=lambda q: q.name)
def test_gemm_over_several_tiles(backend, qtype):
    """45 x 40 outputs: two tiles each way, the last ones partial."""
    w = random_qweight(qtype, 45, _cols(qtype), seed=9)
    x = torch.randn(40, w.shape[1], generator=torch.Generator().manual_seed(9))
    _check_product(backend.qmatmul(x, w), x, w)


def test_group_of_mixed_types_writes_column_slices(backend):
    """A fused q/k/v of three different types: each part's kernel writes its own columns."""
    parts = [random_qweight(q, n, 256, seed=n) for q, n in ((Q.Q4_K, 5), (Q.Q8_0, 3), (Q.Q6_K, 6))]
    group = QWeightGroup(parts)
    for m in (2, 33):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
        y = backend.qmatmul(x, group)
        assert y.shape == (m, 14)
        _check_product(y, x, group)
    assert torch.equal(backend.dequantize(group, torch.float32), group.dequantize(torch.float32))


def test_leading_dims_and_dtypes_round_trip(backend):
    """(B, T, K) bf16 activations come back (B, T, N) bf16: the f32 product rounded once."""
    w = random_qweight(Q.Q4_0, 9, 64, seed=1)
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = backend.qmatmul(x, w)
    assert y.shape == (2, 3, 9) and y.dtype == torch.bfloat16
    ref = (x.double().reshape(6, 64) @ w.dequantize().double().T).view(2, 3, 9)
    assert torch.allclose(y.double(), ref, rtol=1e-2, atol=1e-2)


def test_kernel_table_covers_every_kernel_in_the_module():
    """The Python table and the extern "C" kernels of cuda/*.cu name the same set."""
    names = set(emu_launcher().module.signatures)
    expected = {cb.kernel_name(op, q, dt) for q in TYPES for op, dts in
                (("dequantize", cb.DTYPE_TAGS), ("gemv", [torch.float32]), ("gemm", [torch.float32])) for dt in dts}
    assert names == expected


def test_no_rows_and_types_without_kernels(backend):
    """An empty batch launches nothing; IQ2_XXS (no kernel yet) multiplies through the reference."""
    w = random_qweight(Q.Q4_0, 3, 64)
    assert backend.qmatmul(torch.zeros(0, 64), w).shape == (0, 3)
    raw = torch.randint(0, 256, (4, 66), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    raw[:, :2] = torch.tensor([0x00, 0x1C], dtype=torch.uint8)  # d = fp16 0x1C00 (2^-8): finite
    iq2 = QWeight(raw, Q.IQ2_XXS, (4, 256))
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(1))
    assert torch.equal(backend.qmatmul(x, iq2), x @ dequantize(raw, Q.IQ2_XXS).T)
