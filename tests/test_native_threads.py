"""The native runtime's threads per step (backends/native_threads.py) under scripted clocks (no
timing): a quiet machine never leaves the full count; a starved pool drops to one thread when one
is faster, stays there while it is, grows back when the neighbour leaves, and backs off probing
when one thread is no faster; a step size first seen beside a busy neighbour starts on one; a due
probe waits while other processes keep a CPU busy at normal priority (not for a niced one), and
runs anyway 2048 steps late. And
that the count never changes results: a tiny GGUF model's prompt and decode logits are the same
bits on 1, 2 and 3 threads."""
from __future__ import annotations

import io
import time

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.backends import native, native_threads
from mistralrs_cli.backends.native_model import NativeModel
from mistralrs_cli.engine.kv_cache import cache_for
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.batch import Batch, SeqSlice
from mistralrs_cli.types import GGUFSpec, LoadOptions


class _Machine:
    """Scripted step costs: wall seconds per step and the CPU share a thread gets."""

    def __init__(self, monkeypatch):
        self.wall = self.cpu = self.theirs = 0.0
        self.others = 0  # runnable threads of other processes at a size's first step
        self.load = 0.0  # CPUs' worth of other processes' normal-priority (not niced) work
        monkeypatch.setattr(native_threads.time, "perf_counter", lambda: self.wall)
        monkeypatch.setattr(native_threads.time, "process_time", lambda: self.cpu)
        monkeypatch.setattr(native_threads.os, "cpu_count", lambda: 2)  # this machine's

    def run(self, policy, cost: dict, share: dict, steps: int, rows: int = 1) -> list[int]:
        """cost[threads]: a step's wall time; share[threads]: CPU time per wall second per thread."""
        used = []
        for _ in range(steps):
            n = policy.pick(rows)
            started = policy.start()
            self.wall += cost[n]
            self.cpu += cost[n] * n * share[n]
            self.theirs += cost[n] * self.load
            policy.record(rows, n, started)
            used.append(n)
        return used

    def policy(self, threads=2):
        return native_threads.ThreadPolicy(lambda: threads, lambda: self.others, lambda: self.cpu + self.theirs)


QUIET = ({1: 9.3e-3, 2: 6.5e-3}, {1: 1.0, 2: 1.0})      # SmolLM2's decode step here
BUSY = ({1: 9.3e-3, 2: 45e-3}, {1: 1.0, 2: 0.45})       # a neighbour spinning on one core


def test_a_quiet_machine_never_probes(monkeypatch):
    m = _Machine(monkeypatch)
    p = m.policy()
    assert set(m.run(p, *QUIET, 2000)) == {2}
    assert set(m.run(p, *QUIET, 20, rows=300)) == {2}  # prompt chunks too


def test_a_busy_neighbour_drops_to_one_thread_and_the_pool_grows_back(monkeypatch):
    m = _Machine(monkeypatch)
    p = m.policy()
    m.run(p, *QUIET, 50)
    m.load = 1.0
    busy = m.run(p, *BUSY, 2000)
    assert busy[1] == 1 and busy[2:].count(2) == 0  # switched at once; no probe while it spins
    m.load = 0.0
    quiet = m.run(p, *QUIET, 300)
    assert quiet[-150:] == [2] * 150  # back to two soon after the neighbour left


def test_a_size_first_seen_beside_a_busy_neighbour_starts_on_one_thread(monkeypatch):
    m = _Machine(monkeypatch)
    m.others = 1
    p = m.policy()
    assert m.run(p, *BUSY, 1, rows=200) == [1]  # a one-shot prompt
    m.others = 0
    assert m.run(p, *QUIET, 1, rows=1) == [2]  # decode, first seen on a quiet machine
    used = m.run(p, *QUIET, 300, rows=200)  # a wrong start is probed away
    assert used[:120] == [1] * 120 and used[-150:] == [2] * 150


def test_a_due_probe_waits_while_a_neighbour_keeps_a_cpu_busy(monkeypatch):
    m = _Machine(monkeypatch)
    m.others, m.load = 1, 1.0
    p = m.policy()
    reads = []
    busy = p.busy
    p.busy = lambda: reads.append(m.wall) or busy()
    used = m.run(p, *BUSY, 4000)
    assert len(reads) <= m.wall / native_threads.WINDOW + 2  # one /proc/stat read per window
    # one probe (2048 steps past the due one), then the back-off: >= 20 x its cost later
    assert used.count(2) == 1 and used.index(2) == 128 + 2048 - 1  # step i is the (i+1)th


def test_busy_seconds_counts_this_process_s_own_cpu_time():
    """/proc/stat's normal-priority time includes what this process burns (checked against the
    kernel's own per-process clock; ticks are 10 ms, so the bar is loose)."""
    if native_threads._busy_seconds() is None:
        pytest.skip("no /proc/stat")
    b0, c0 = native_threads._busy_seconds(), time.process_time()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        pass
    b1, c1 = native_threads._busy_seconds(), time.process_time()
    assert b1 - b0 >= 0.7 * (c1 - c0) > 0


def test_a_niced_neighbour_does_not_hold_the_pool_on_one_thread(monkeypatch):
    m = _Machine(monkeypatch)
    m.others = 1  # runnable at the first step, so it starts on one thread; its time is nice time
    p = m.policy()
    used = m.run(p, *QUIET, 400)
    assert used[:100] == [1] * 100 and used[-200:] == [2] * 200


def test_probes_back_off_when_one_thread_is_not_faster(monkeypatch):
    m = _Machine(monkeypatch)
    p = m.policy()
    starved_but_faster = ({1: 9.3e-3, 2: 7.5e-3}, {1: 1.0, 2: 0.5})
    used = m.run(p, *starved_but_faster, 3000)
    assert used.count(1) <= 16  # 4, 8, ... 512 steps apart: ~12 probes, not 750


def test_one_thread_configured_is_one_thread(monkeypatch):
    m = _Machine(monkeypatch)
    p = m.policy(threads=1)
    assert set(m.run(p, *BUSY, 100)) == {1}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    if native.library() is None:
        pytest.skip("no C compiler: the native kernels are optional")
    d = tmp_path_factory.mktemp("threads")
    path = gb.write_gguf(d / "gemma3.gguf", gb.tiny_gemma3(1), vocab=gb.gguf_vocab(gb.train_tokenizer()),
                         qtype=Q.Q8_0)
    m = load(GGUFSpec(str(path)), LoadOptions(token_source="none")).model
    assert isinstance(m, NativeModel)
    return m


def _logits(model, prompt, n):
    cache, outs = cache_for(model), []
    out = model(np.asarray(prompt), Batch(torch.arange(len(prompt)), [SeqSlice(0, len(prompt), cache)]))
    outs.append(np.asarray(out))
    for i in range(n):
        tok = int(outs[-1][-1].argmax())
        outs.append(np.asarray(model(np.asarray([tok]), Batch(torch.tensor([len(prompt) + i]),
                                                            [SeqSlice(0, 1, cache)]))))
    return outs


@pytest.mark.parametrize("numerics", ["fast", "precise"])
def test_logits_are_the_same_bits_on_any_thread_count(model, numerics, monkeypatch):
    from mistralrs_cli.backends import native_model

    prompt = list(range(3, 40))
    runs = {}
    for n in (1, 2, 3):
        monkeypatch.setattr(native_model.native, "threads", lambda n=n: n)
        model.pool = native_threads.ThreadPolicy(lambda n=n: n, lambda: 0, lambda: 0.0)
        for L in model.layers:
            for opts in (L.qkv_opts, L.o_opts, L.gate_up_opts, L.down_opts):
                opts.precise = int(numerics == "precise")
        model.head_opts.precise = int(numerics == "precise")
        runs[n] = _logits(model, prompt, 6)
    for n in (2, 3):
        assert all(np.array_equal(a, b) for a, b in zip(runs[1], runs[n]))


def test_the_busy_neighbour_bench_runs_ours_1t_right_beside_ours(monkeypatch):
    """scripts/bench.py --busy-neighbour: ours-1t runs next to ours in every repeat (alternately
    before and after), so that a shared machine's other work loads the two alike."""
    import sys
    from pathlib import Path
    from types import SimpleNamespace

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent.parent / "scripts"))
    bench = __import__("bench")
    order = []
    monkeypatch.setattr(bench, "one_run", lambda e, *a: order.append(e) or {"engine": e, "error": "x"})
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    live = ["ours", "ours-fast", "llama.cpp", "ours-1t"]
    args = SimpleNamespace(repeats=4, busy_neighbour=True, contexts=["short"])
    bench.run_all(args, live, {"smollm2": None}, {("smollm2", "short"): None})
    reps = [order[i:i + 4] for i in range(0, 16, 4)]
    assert all(sorted(r) == sorted(live) for r in reps)
    assert [r.index("ours-1t") - r.index("ours") for r in reps] == [-1, 1, -1, 1]
    assert [r[0] for r in reps] != [reps[0][0]] * 4  # still rotated
