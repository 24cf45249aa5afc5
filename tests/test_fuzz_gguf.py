"""Fuzzing the GGUF loader with hypothesis: random mutations of tiny valid GGUFs (llama, gemma3) --
bytes flipped or overwritten in the header, the key-value section and the tensor table; the file
cut short; integer fields set to extremes; keys duplicated; values given another type; arrays
nested deep; tokens, merges and token types rewritten; another architecture's name -- are each
loaded the way `mistralrs gguf -f FILE` loads them, one in eight by the torch path
(runtime="torch"); a third as many mutations of a tiny GGML v3 file go to the GGML loader. Every
outcome must be a load or one UserError: any other exception, a hang, or an allocation past the
worker's address-space limit fails.

The loads run in a worker subprocess under RLIMIT_AS (an unbounded allocation shows as a
MemoryError there, not as a swapping machine) and a per-example alarm, watched from here with a
timeout (a hang in C kills the worker and fails the example). The seed is fixed (derandomize) and
the default run is 250 examples (about a minute here); for a longer run by hand:

    MISTRALRS_FUZZ_EXAMPLES=20000 .venv/bin/python -m pytest -q tests/test_fuzz_gguf.py -s

(-s prints how many examples ran and how they ended.)
"""
from __future__ import annotations

import copy
import json
import os
import select
import struct
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path

import pytest
from gguf import GGUFValueType as V
from hypothesis import HealthCheck, given, settings, strategies as st

import gguf_builder as gb
import gguf_craft as gc

EXAMPLES = int(os.environ.get("MISTRALRS_FUZZ_EXAMPLES", "250"))
LIMIT_BYTES = 3 << 30
ALARM_SECONDS = 20  # per load inside the worker
WAIT_SECONDS = 60  # the parent's patience for an answer (covers a hang the alarm cannot stop)
OK = {"loaded", "UserError"}
EXTREMES = (0, 1, 2, 3, 255, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1)

_WORKER = textwrap.dedent("""
    import json, resource, signal, sys
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from mistralrs_cli.errors import UserError
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import GGUFSpec, LoadOptions

    def alarm(*_):
        raise TimeoutError("no answer within {seconds} s")

    signal.signal(signal.SIGALRM, alarm)
    load(GGUFSpec(quantized_filename={warm!r}), LoadOptions(device="cpu"))  # compiles the kernels if due
    print("ready", flush=True)
    def load_ggml(path):
        from mistralrs_cli.loaders.ggml import GGMLFile, load_ggml_model
        load_ggml_model(GGMLFile(path))

    for line in sys.stdin:
        runtime, path = line.strip().split(" ", 1)
        signal.alarm({seconds})
        try:
            if runtime == "ggml":
                load_ggml(path)
            else:
                load(GGUFSpec(quantized_filename=path), LoadOptions(device="cpu", runtime=runtime))
            out = ["loaded", ""]
        except UserError as e:
            out = ["UserError", str(e)[:300]]
        except BaseException as e:  # noqa: BLE001 -- reported to the test
            out = [type(e).__name__, str(e)[:300]]
        signal.alarm(0)
        print(json.dumps(out), flush=True)
""")


class Worker:
    """One loader subprocess, restarted after it dies or stops answering."""

    def __init__(self, cache: Path, warm: Path):
        self.cache, self.warm, self.proc = cache, warm, None

    def _start(self) -> None:
        code = _WORKER.format(limit=LIMIT_BYTES, seconds=ALARM_SECONDS, warm=str(self.warm))
        env = {**os.environ, "MISTRALRS_CLI_CACHE": str(self.cache), "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env)
        assert self._line(600) == "ready", "the fuzz worker could not load the valid file"

    def _line(self, seconds: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], seconds)
        return self.proc.stdout.readline().strip() if ready else None

    def load(self, path: Path, runtime: str) -> tuple[str, str]:
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{runtime} {path}\n")
        self.proc.stdin.flush()
        line = self._line(WAIT_SECONDS)
        if not line:  # a hang or a death (a crash prints nothing)
            self.close()
            return ("no answer (hang or crash)", str(path))
        return tuple(json.loads(line))

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> Path:
    return gb.write_gguf(tmp_path_factory.mktemp("fuzz-base") / "valid.gguf", gb.tiny_llama(0),
                         gb.gguf_vocab(gb.train_tokenizer()))


class Base(tuple):
    """(parts, bytes, section bounds); a short repr, for hypothesis's failure reports."""

    def __repr__(self) -> str:
        return "<the valid tiny GGUF>"


@pytest.fixture(scope="module")
def bases(valid) -> dict[str, Base]:
    """Per valid file (llama; gemma3: sandwich norms, q/k norms, sliding layers), its parts, its
    bytes and its section bounds: [0, header, kvs, tensor table]."""
    gemma3 = gb.write_gguf(valid.with_name("gemma3.gguf"), gb.tiny_gemma3(0), gb.gguf_vocab(gb.train_tokenizer()))
    out = {}
    for name, path in (("llama", valid), ("gemma3", gemma3)):
        parts = gc.read_parts(path)
        out[name] = Base((parts, gc.encode(parts), gc.sections(parts)))
    return out


@pytest.fixture(scope="module")
def worker(tmp_path_factory, valid):
    w = Worker(gc.fresh_cache(tmp_path_factory.mktemp("fuzz-cache")), valid)
    yield w
    w.close()


SEEN: Counter = Counter()


# ---- mutations: each takes (parts, bytes, bounds, draw) and returns the file's bytes ----
def _overwrite(parts, data, bounds, draw) -> bytes:
    """Overwrite 1-8 bytes at random places of one section (header, KVs, tensor table)."""
    section = draw(st.integers(0, 2))
    lo, hi = bounds[section], bounds[section + 1]
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        at = draw(st.integers(lo, hi - 1))
        out[at] = draw(st.one_of(st.integers(0, 255), st.sampled_from([0, 0xFF, out[at] ^ (1 << draw(st.integers(0, 7)))])))
    return bytes(out)


def _int_field(parts, data, bounds, draw) -> bytes:
    """A u32/u64 field of the header or tensor table, or an integer KV, set to an extreme."""
    value = draw(st.sampled_from(EXTREMES))
    which = draw(st.sampled_from(["count", "kv", "dim", "offset", "type"]))
    p = copy.deepcopy(parts)
    if which == "count":
        out = bytearray(data)
        at = draw(st.sampled_from([4, 8, 16]))
        out[at:at + (4 if at == 4 else 8)] = struct.pack("<I" if at == 4 else "<Q", value % (2**32 if at == 4 else 2**64))
        return bytes(out)
    if which == "kv":
        ints = [k for k in p.kvs if k.vtype in (V.UINT32, V.INT32, V.UINT64, V.UINT8, V.INT64)]
        k = draw(st.sampled_from(ints))
        k.vtype, k.value = V.UINT64, value % 2**64
    else:
        t = draw(st.sampled_from(p.tensors))
        if which == "dim":
            t.dims[draw(st.integers(0, len(t.dims) - 1))] = value % 2**64
        elif which == "offset":
            t.offset = value % 2**64
        else:
            t.qtype = value % 2**32
    return gc.encode(p)


def _retype(parts, data, bounds, draw) -> bytes:
    """A KV given another type and a value of that type; or duplicated; or a deep array added."""
    p = copy.deepcopy(parts)
    k = draw(st.sampled_from(p.kvs))
    how = draw(st.sampled_from(["retype", "duplicate", "nest"]))
    if how == "duplicate":
        p.kvs.insert(draw(st.integers(0, len(p.kvs))), copy.deepcopy(k))
    elif how == "nest":
        k.raw, k.vtype = gc.nested_array(draw(st.integers(1, 100_000))), V.ARRAY
    else:
        vtype = draw(st.sampled_from([V.UINT32, V.INT32, V.FLOAT32, V.BOOL, V.STRING, V.UINT64, V.FLOAT64]))
        samples = {V.STRING: st.text(max_size=20), V.BOOL: st.booleans(), V.FLOAT32: st.floats(width=32),
                   V.FLOAT64: st.floats(), V.INT32: st.integers(-2**31, 2**31 - 1), V.UINT32: st.integers(0, 2**32 - 1),
                   V.UINT64: st.integers(0, 2**64 - 1)}
        k.vtype, k.value, k.item = vtype, draw(samples[vtype]), None
        if draw(st.booleans()):  # or an array of them
            k.item, k.vtype, k.value = vtype, V.ARRAY, draw(st.lists(samples[vtype], max_size=4))
    return gc.encode(p)


def _truncate(parts, data, bounds, draw) -> bytes:
    return data[:draw(st.integers(0, len(data) - 1))]


def _vocab(parts, data, bounds, draw) -> bytes:
    """Tokens or merges rewritten (empty, duplicated, invalid UTF-8, long), token types extreme;
    half of them read as a SentencePiece (llama) vocab."""
    p = copy.deepcopy(parts)
    key = draw(st.sampled_from(["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"]))
    values = list(p.kv(key).value)
    for _ in range(draw(st.integers(1, 6))):
        i = draw(st.integers(0, len(values) - 1))
        if key == "tokenizer.ggml.token_type":
            values[i] = draw(st.sampled_from([-(2**31), -1, 0, 2, 3, 4, 5, 6, 2**31 - 1]))
        else:
            values[i] = draw(st.one_of(st.sampled_from(["", " ", "  ", b"\xff\xfe", b"\xc3", values[0], values[-1]]),
                                       st.text(max_size=8), st.text(min_size=1, max_size=2).map(lambda t: t * 5000)))
    item = V.INT32 if key == "tokenizer.ggml.token_type" else V.STRING
    p.set(key, V.ARRAY, values, item)
    if draw(st.booleans()):  # read as a SentencePiece vocab: merges derived from scores
        p.set("tokenizer.ggml.model", V.STRING, "llama")
        n = len(p.kv("tokenizer.ggml.tokens").value)
        p.set("tokenizer.ggml.scores", V.ARRAY, [float(-i) for i in range(n)], V.FLOAT32)
        p.set("tokenizer.ggml.unknown_token_id", V.UINT32, draw(st.sampled_from([0, 1, n - 1, n, 2**32 - 1])))
    return gc.encode(p)


def _architecture(parts, data, bounds, draw) -> bytes:
    """The file under another architecture's name (its keys then missing or mismatched)."""
    p = copy.deepcopy(parts)
    old = p.kv("general.architecture").value
    arch = draw(st.sampled_from(["llama", "gemma", "gemma2", "gemma3", "qwen2", "qwen3", "phi2", "phi3", "starcoder2", ""]))
    p.set("general.architecture", V.STRING, arch)
    if draw(st.booleans()):  # the keys renamed too
        for k in p.kvs:
            if k.key.startswith(old + "."):
                k.key = arch + k.key[len(old):]
    return gc.encode(p)


MUTATIONS = {"overwrite": _overwrite, "int-field": _int_field, "retype": _retype, "truncate": _truncate,
             "vocab": _vocab, "architecture": _architecture}


@settings(max_examples=EXAMPLES, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_every_mutation_loads_or_is_one_user_error(bases, worker, tmp_path_factory, data):
    parts, raw, bounds = bases[data.draw(st.sampled_from(sorted(bases)), label="file")]
    kind = data.draw(st.sampled_from(sorted(MUTATIONS)), label="mutation")
    mutated = MUTATIONS[kind](parts, raw, bounds, data.draw)
    path = tmp_path_factory.getbasetemp() / "fuzz" / f"case-{sum(SEEN.values())}.gguf"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(mutated)
    runtime = data.draw(st.sampled_from(["auto"] * 7 + ["torch"]), label="runtime")  # torch: slower
    outcome, message = worker.load(path, runtime)
    SEEN[kind, outcome] += 1
    assert outcome in OK, (kind, outcome, message)
    assert "\n" not in message, message
    path.unlink()


@pytest.fixture(scope="module")
def ggml_file(tmp_path_factory) -> Base:
    from test_ggml import write_ggjt  # the hand-written GGML v3 writer of the GGML tests

    model = gb.tiny_llama(1, num_key_value_heads=4)  # MHA: loads with the default --gqa 1
    path = write_ggjt(tmp_path_factory.mktemp("fuzz-ggml") / "valid.bin", model, gb.gguf_vocab(gb.train_tokenizer()).tokens)
    return Base((path.read_bytes(),))


@settings(max_examples=max(1, EXAMPLES // 3), derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(st.data())
def test_every_ggml_mutation_loads_or_is_one_user_error(ggml_file, worker, tmp_path_factory, data):
    """GGML 'ggjt' files: the seven hyper-parameters set to extremes, bytes overwritten in the
    header, the vocabulary or the first tensor headers, or the file cut short."""
    (raw,) = ggml_file
    out = bytearray(raw)
    kind = data.draw(st.sampled_from(["hparam", "overwrite", "truncate"]), label="mutation")
    if kind == "hparam":
        at = 8 + 4 * data.draw(st.integers(0, 6))
        out[at:at + 4] = struct.pack("<I", data.draw(st.sampled_from([0, 1, 2, 3, 7, 2**16, 2**31, 2**32 - 1])))
    elif kind == "overwrite":
        for _ in range(data.draw(st.integers(1, 8))):
            out[data.draw(st.integers(0, 8192))] = data.draw(st.integers(0, 255))
    else:
        out = out[:data.draw(st.integers(0, len(out) - 1))]
    path = tmp_path_factory.getbasetemp() / "fuzz" / f"ggml-{sum(SEEN.values())}.bin"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(bytes(out))
    outcome, message = worker.load(path, "ggml")
    SEEN["ggml " + kind, outcome] += 1
    assert outcome in OK, (kind, outcome, message)
    assert "\n" not in message, message
    path.unlink()


def test_report_what_the_fuzzer_saw():
    """Runs after the fuzzer (file order): prints the examples by mutation and outcome (-s)."""
    print(f"\nGGUF fuzz: {sum(SEEN.values())} examples;", dict(sorted(SEEN.items())))
    assert sum(SEEN.values()) > 0
