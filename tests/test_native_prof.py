"""The kernels' timers (scripts/decode_budget.py): only a build with -DNATIVE_PROF has them
(native.library() makes one when MISTRALRS_CLI_NATIVE_PROF is set); the ordinary build reports
none. They count the calls they time and leave results unchanged, bit for bit."""
from __future__ import annotations

import ctypes

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import quants

from mistralrs_cli.backends import native


@pytest.fixture(scope="module")
def libs(tmp_path_factory):
    lib = native.library()
    if lib is None:
        pytest.skip("no C compiler: the native kernels are optional")
    return lib, native.build(("-DNATIVE_PROF",), tmp_path_factory.mktemp("prof"))


def test_timers_only_in_the_profiling_build_and_results_unchanged(libs):
    plain, prof = libs
    assert plain.native_prof(None, 0) == 0  # the ordinary build: no timers at all
    rng = np.random.default_rng(0)
    raw = quants.quantize(rng.standard_normal((40, 256)).astype(np.float32), Q.Q4_1)
    x = rng.standard_normal((5, 256)).astype(np.float32)
    norm = rng.uniform(0.5, 1.5, 256).astype(np.float32)
    opts = native.qmm_opts(norm, 1e-6, precise=True)
    assert prof.native_prof(None, 1) == 72  # 9 roles x 8 fields, zeroed
    for rows in (x[:1], x):  # a decode row (each thread rounds it itself) and a prompt chunk
        want = native.qmatmul(rows, [(raw, Q.Q4_1, 40)], plain, opts, n_threads=2)
        got = native.qmatmul(rows, [(raw, Q.Q4_1, 40)], prof, opts, n_threads=2)
        assert np.array_equal(got, want)
    buf = (ctypes.c_double * 72)()
    prof.native_prof(buf, 1)
    acc = np.frombuffer(buf, dtype=np.float64).reshape(9, 8)
    calls, wall, prep, busy, busy_max = acc[0, :5]  # role 0: calls from Python
    assert calls == 2 and acc[0, 6] == 4 and acc[1:].sum() == 0  # 2 calls of 2 threads, no layer roles
    assert wall >= busy_max >= busy / 2 > 0 and wall >= prep >= 0  # the slowest thread >= the mean
