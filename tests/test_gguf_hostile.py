"""Crafted GGUF and GGML files: each loads or fails with one UserError sentence that names the file
and what is wrong -- never a traceback, an unbounded allocation or a hang -- on both the native
runtime and the torch path (runtime="torch").

Files are a tiny valid llama GGUF (gguf_builder) taken apart by gguf-py's own reader and written
back byte by byte with one thing changed (gguf_craft.py), so a case can hold any value gguf-py's
writer would refuse. The loads run in one worker subprocess under an address-space limit
(RLIMIT_AS) and a per-case alarm: a regression that allocates without bound or hangs fails its
case instead of taking the machine or the suite with it. A few cases also go through the real CLI.
"""
from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q, GGUFValueType as V

import gguf_builder as gb
import gguf_craft as gc

MISTRALRS = Path(sys.executable).with_name("mistralrs")
LIMIT_BYTES = 4 << 30  # the worker's address space: torch and the tiny model fit well inside
CASE_SECONDS = 60  # per load, on a slow shared machine; a hang is stopped by SIGALRM
LOADED = "loaded"


def _set(key: str, vtype: V, value, item: V | None = None) -> Callable[[gc.Parts], None]:
    return lambda p: p.set(key, vtype, value, item)


def _tensor(i: int, **fields) -> Callable[[gc.Parts], None]:
    def apply(p: gc.Parts) -> None:
        for k, v in fields.items():
            setattr(p.tensors[i], k, v)
    return apply


def _tokens(change: Callable[[list], None], key: str = "tokenizer.ggml.tokens") -> Callable[[gc.Parts], None]:
    def apply(p: gc.Parts) -> None:
        values = list(p.kv(key).value)
        change(values)
        p.set(key, V.ARRAY, values, V.STRING)
    return apply


def _drop_block(p: gc.Parts) -> None:
    p.tensors = [t for t in p.tensors if not t.name.startswith("blk.1.")]


def _deep(p: gc.Parts) -> None:
    p.kvs.append(gc.KV("general.deep", V.ARRAY, None, raw=gc.nested_array(200_000)))


def _dup_kv(p: gc.Parts) -> None:
    p.kvs.append(gc.KV("llama.block_count", V.UINT32, 2))


def _q8_rows(p: gc.Parts) -> None:  # 48 values a row: one and a half Q8_0 blocks
    t = p.tensors[1]
    t.qtype, t.dims, t.data = int(Q.Q8_0), [48, 64], bytes(64 * 51)


def _dup_token(toks: list) -> None:
    toks[300] = toks[301]


def _bad_utf8_token(toks: list) -> None:
    toks[300] = b"\xff\xfe"


def _space_bos(toks: list) -> None:
    toks[toks.index(gb.BOS)] = " "


def _absent_merge(merges: list) -> None:
    merges[0] = "zzqq xxjj"


# name -> (change to the valid file, words the error names besides the file; None: it loads)
CASES: dict[str, tuple[Callable[[gc.Parts], None], tuple[str, ...] | None]] = {
    "alignment-0": (_set("general.alignment", V.UINT32, 0), ("general.alignment", "power of two")),
    "alignment-3": (_set("general.alignment", V.UINT32, 3), ("general.alignment",)),
    "block-count-0": (_set("llama.block_count", V.UINT32, 0), ("llama.block_count",)),
    "block-count-1e9": (_set("llama.block_count", V.UINT32, 10**9), ("llama.block_count", "block 2")),
    "block-count-3": (_set("llama.block_count", V.UINT32, 3), ("llama.block_count", "block 2")),
    "block-missing": (_drop_block, ("llama.block_count", "block 1")),
    "head-count-0": (_set("llama.attention.head_count", V.UINT32, 0), ("llama.attention.head_count",)),
    "head-count-not-dividing-hidden": (
        lambda p: (p.set("llama.attention.head_count", V.UINT32, 3),
                   p.set("llama.attention.head_count_kv", V.UINT32, 3)),
        ("head_count 3", "embedding_length 64")),
    "kv-heads-not-dividing-heads": (_set("llama.attention.head_count_kv", V.UINT32, 3), ("head_count_kv 3",)),
    "rope-dims-past-head": (_set("llama.rope.dimension_count", V.UINT32, 1000),
                            ("llama.rope.dimension_count", "head size 16")),
    "embedding-0": (_set("llama.embedding_length", V.UINT32, 0), ("llama.embedding_length",)),
    "embedding-2**62": (_set("llama.embedding_length", V.UINT64, 2**62), ("llama.embedding_length",)),
    "context-2**62": (_set("llama.context_length", V.UINT64, 2**62), ("llama.context_length",)),
    "head-size-odd": (lambda p: (p.set("llama.attention.key_length", V.UINT32, 15),
                                 p.set("llama.rope.dimension_count", V.UINT32, 14)), ("head size 15",)),
    "key-length-1e9": (_set("llama.attention.key_length", V.UINT32, 10**9), ("blk.0.attn_q.weight",)),
    "vocab-size-2**62": (_set("llama.vocab_size", V.UINT64, 2**62), ("llama.vocab_size",)),
    "head-count-string": (_set("llama.attention.head_count", V.STRING, "four"), ("head_count", "a string")),
    "rms-eps-nan": (_set("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, float("nan")), ("epsilon",)),
    "tensor-dim-0": (_tensor(1, dims=[0, 64]), ("blk.0.attn_q.weight", "dimension of 0")),
    "tensor-dim-2**62": (_tensor(1, dims=[2**62, 64]), ("blk.0.attn_q.weight",)),
    "tensor-dims-overflow-int64": (_tensor(1, dims=[2**31, 2**31, 2**31]), ("blk.0.attn_q.weight",)),
    "tensor-5-dims": (_tensor(1, dims=[64, 64, 1, 1, 1]), ("blk.0.attn_q.weight", "5 dimensions")),
    "rows-not-whole-blocks": (_q8_rows, ("blk.0.attn_q.weight", "Q8_0 blocks of 32")),
    "data-past-end": (_tensor(-1, offset=10**12), ("output.weight", "truncated")),
    "offset-wraps-u64": (_tensor(-1, offset=2**64 - 32), ("output.weight",)),
    "offset-unaligned": (_tensor(-1, offset=8), ("output.weight", "alignment")),
    "tensors-overlap": (_tensor(2, offset=0), ("overlap",)),
    "tensor-name-newline": (_tensor(1, name="blk.0.attn\nq.weight"), ("tensor name", "\\n")),  # fuzzer's find
    "tensor-name-64-bytes": (_tensor(1, name="blk.0." + "x" * 58), ("tensor name", "64 bytes")),
    "tensor-type-999": (_tensor(1, qtype=999), ("999",)),
    "duplicate-tensor": (lambda p: p.tensors.append(copy.deepcopy(p.tensors[1])), ("blk.0.attn_q.weight", "twice")),
    "duplicate-key": (_dup_kv, ("llama.block_count", "twice")),
    "array-200000-deep": (_deep, ("nests arrays",)),
    "bos-id-string": (_set("tokenizer.ggml.bos_token_id", V.STRING, "1"), ("tokenizer.ggml.bos_token_id",)),
    "bos-id-float": (_set("tokenizer.ggml.bos_token_id", V.FLOAT32, 1.5), ("tokenizer.ggml.bos_token_id",)),
    "add-bos-string": (_set("tokenizer.ggml.add_bos_token", V.STRING, "yes"), ("tokenizer.ggml.add_bos_token",)),
    "chat-template-number": (_set("tokenizer.chat_template", V.UINT32, 7), ("tokenizer.chat_template",)),
    "chat-template-array": (_set("tokenizer.chat_template", V.ARRAY, ["a", "b"], V.STRING),
                            ("tokenizer.chat_template",)),
    "tokens-numbers": (_set("tokenizer.ggml.tokens", V.ARRAY, [1, 2, 3], V.UINT32), ("tokenizer.ggml.tokens",)),
    "tokens-a-string": (_set("tokenizer.ggml.tokens", V.STRING, "abc"), ("tokenizer.ggml.tokens",)),
    "tokens-fewer-than-rows": (_tokens(lambda t: t.pop()), ("tokenizer.ggml.tokens", "511")),
    "token-types-short": (_set("tokenizer.ggml.token_type", V.ARRAY, [1, 1], V.INT32), ("tokenizer.ggml.token_type",)),
    "merges-numbers": (_set("tokenizer.ggml.merges", V.ARRAY, [1, 2], V.UINT32), ("tokenizer.ggml.merges",)),
    "tokenizer-model-number": (_set("tokenizer.ggml.model", V.UINT32, 3), ("tokenizer.ggml.model",)),
    # these load, as llama.cpp loads them: the later duplicate wins the text -> id map, invalid
    # UTF-8 reads as U+FFFD, a merge of absent tokens never applies, an out-of-range special id
    # is ignored with a warning
    "duplicate-vocab-entry": (_tokens(_dup_token), None),
    "non-utf8-vocab-entry": (_tokens(_bad_utf8_token), None),
    "merge-of-absent-tokens": (_tokens(_absent_merge, "tokenizer.ggml.merges"), None),
    "bos-id-out-of-range": (_set("tokenizer.ggml.bos_token_id", V.UINT64, 2**63), None),
    "bos-text-a-space": (_tokens(_space_bos), None),  # found by test_fuzz_gguf
}

_WORKER = textwrap.dedent("""
    import json, resource, signal, sys
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from mistralrs_cli.errors import UserError
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import GGUFSpec, LoadOptions

    def alarm(*_):
        raise TimeoutError("no answer within {seconds} s")

    signal.signal(signal.SIGALRM, alarm)
    warm = sys.stdin.readline().strip()  # a valid file, loaded first with no alarm: the native
    load(GGUFSpec(quantized_filename=warm), LoadOptions(device="cpu"))  # kernels compile if due
    for line in sys.stdin:
        path, runtime = json.loads(line)
        signal.alarm({seconds})
        try:
            load(GGUFSpec(quantized_filename=path), LoadOptions(runtime=runtime, device="cpu"))
            out = ["{loaded}", ""]
        except UserError as e:
            out = ["UserError", str(e)]
        except BaseException as e:  # noqa: BLE001 -- reported to the test
            out = [type(e).__name__, str(e)[:500]]
        signal.alarm(0)
        print(json.dumps(out), flush=True)
""")


def run_worker(jobs: list[tuple[str, str]], cache: Path, warm: Path) -> list[tuple[str, str]]:
    """(path, runtime) -> (outcome, message) for each job, loaded in one subprocess after the
    valid file `warm`."""
    code = _WORKER.format(limit=LIMIT_BYTES, seconds=CASE_SECONDS, loaded=LOADED)
    env = {**os.environ, "MISTRALRS_CLI_CACHE": str(gc.fresh_cache(cache)), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], input=f"{warm}\n" + "".join(json.dumps(j) + "\n" for j in jobs),
                          capture_output=True, text=True, env=env, timeout=600 + CASE_SECONDS * len(jobs))
    outs = [tuple(json.loads(line)) for line in proc.stdout.splitlines() if line.startswith("[")]
    assert len(outs) == len(jobs), (proc.returncode, proc.stderr[-2000:])
    return outs


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("hostile")
    valid = gb.write_gguf(d / "valid.gguf", gb.tiny_llama(0), gb.gguf_vocab(gb.train_tokenizer()))
    base = gc.read_parts(valid)
    out = {"valid": valid}
    for name, (change, _) in CASES.items():
        parts = copy.deepcopy(base)
        change(parts)
        out[name] = gc.write_parts(d / f"{name}.gguf", parts)
    return out


@pytest.fixture(scope="module")
def outcomes(files, tmp_path_factory) -> dict[tuple[str, str], tuple[str, str]]:
    jobs = [(name, rt) for name in files for rt in ("auto", "torch")]
    results = run_worker([(str(files[n]), rt) for n, rt in jobs], tmp_path_factory.mktemp("cache"), files["valid"])
    return dict(zip(jobs, results))


def test_the_valid_file_loads(outcomes):
    assert outcomes["valid", "auto"] == (LOADED, "") and outcomes["valid", "torch"] == (LOADED, "")


@pytest.mark.parametrize("runtime", ["auto", "torch"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_loads_or_one_clear_sentence(outcomes, name: str, runtime: str):
    kind, message = outcomes[name, runtime]
    words = CASES[name][1]
    if words is None:
        assert kind == LOADED, (kind, message)
        return
    assert kind == "UserError", (kind, message)
    assert "\n" not in message and f"{name}.gguf" in message, message
    for word in words:
        assert word in message, (word, message)


def test_both_runtimes_give_the_same_sentence(outcomes):
    differ = {n for n in CASES if outcomes[n, "auto"] != outcomes[n, "torch"]}
    assert not differ, differ


@pytest.mark.parametrize("arch", ["gemma3", "qwen2"])
def test_block_count_1e9_in_other_families(tmp_path, files, arch: str):
    """Gemma 3's config lists a layer type per block: block_count is checked against the tensors
    before any list is sized by it."""
    model = gb.tiny_gemma3(0) if arch == "gemma3" else gb.tiny_qwen2(0)
    parts = gc.read_parts(gb.write_gguf(tmp_path / "ok.gguf", model, gb.gguf_vocab(gb.train_tokenizer())))
    parts.set(f"{arch}.block_count", V.UINT32, 10**9)
    path = gc.write_parts(tmp_path / f"{arch}-blocks.gguf", parts)
    for kind, message in run_worker([(str(path), "auto"), (str(path), "torch")], tmp_path / "cache", files["valid"]):
        assert kind == "UserError" and f"{arch}-blocks.gguf" in message, (kind, message)
        assert f"{arch}.block_count is 1000000000" in message, message


def test_file_bigger_than_memory_is_refused_before_mapping(tmp_path, files):
    """A (sparse) file twice the machine's memory, its last tensor filling it: refused with the
    sizes, not mapped and repacked until the OOM killer ends it."""
    phys = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    parts = gc.read_parts(files["valid"])
    rows = 2 * phys // (4 * 1024) + 1
    parts.tensors.append(gc.Tensor("extra.weight", [1024, rows], int(Q.F32), b""))
    path = gc.write_parts(tmp_path / "huge.gguf", parts)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + rows * 1024 * 4)
    (kind, message), = run_worker([(str(path), "auto")], tmp_path / "cache", files["valid"])
    assert kind == "UserError" and "huge.gguf" in message and "GB" in message, (kind, message)


def test_file_name_too_long_is_one_line(tmp_path):
    from mistralrs_cli.errors import UserError
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import GGUFSpec

    with pytest.raises(UserError, match="File name too long") as e:
        load(GGUFSpec(quantized_filename=str(tmp_path / ("a" * 5000 + ".gguf"))))
    assert "\n" not in str(e.value) and len(str(e.value)) < 400


# ---- through the CLI: exit 1, one `error:` line naming the file, within a bound ----
CLI_CASES = ("block-count-1e9", "array-200000-deep", "alignment-0", "chat-template-number", "bos-id-string",
             "head-count-not-dividing-hidden", "rope-dims-past-head", "data-past-end")


def _cli(args: list[str], cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MISTRALRS_CLI_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([str(MISTRALRS), "--max-tokens", "2", "--prompt", "hi", *args], capture_output=True,
                          text=True, encoding="utf-8", env=env, stdin=subprocess.DEVNULL, timeout=120)


@pytest.fixture(scope="module")
def cli_runs(files, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    cache = gc.fresh_cache(tmp_path_factory.mktemp("cli-cache"))
    long_name = str(files["valid"].parent / ("a" * 5000 + ".gguf"))
    runs = {name: ["gguf", "-f", str(files[name])] for name in CLI_CASES}
    runs["file-name-5000"] = ["gguf", "-f", long_name]
    runs["tokenizer-name-5000"] = ["gguf", "-f", str(files["valid"]), "-t", long_name]
    runs["model-dir-name-5000"] = ["plain", "-m", long_name]
    runs["newline-name"] = ["gguf", "-f", str(files["valid"].parent / "a\nb.gguf")]
    runs["torch:block-count-1e9"] = ["--numerics", "exact", "gguf", "-f", str(files["block-count-1e9"])]
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(_cli, args, cache) for name, args in runs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("name", [*CLI_CASES, "file-name-5000", "tokenizer-name-5000", "model-dir-name-5000",
                                  "newline-name", "torch:block-count-1e9"])
def test_cli_one_error_line(cli_runs, name: str):
    proc = cli_runs[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    stem = name.split(":")[-1]
    named = {"newline-name": "a\\nb.gguf"}.get(stem, "aaaa" if stem.endswith("name-5000") else f"{stem}.gguf")
    assert named in lines[0], lines[0]
    assert len(lines[0]) < 400, lines[0]  # the long name shortened, not printed whole


# ---- GGML 'ggjt' files, hand-built as tests/test_ggml.py builds them ----
def _ggjt(path: Path, hparams: tuple[int, ...], tensors: list[tuple[str, tuple[int, ...], int, bytes]],
          vocab: int = 4) -> Path:
    with open(path, "wb") as f:
        f.write(struct.pack("<II", 0x67676A74, 3) + struct.pack("<7I", *hparams))
        for i in range(vocab):
            f.write(struct.pack("<I", 1) + bytes([65 + i]) + struct.pack("<f", 0.0))
        for name, ne, qtype, data in tensors:
            enc = name.encode()
            f.write(struct.pack(f"<III{len(ne)}I", len(ne), len(enc), qtype, *ne) + enc)
            f.write(b"\0" * (-f.tell() % 32) + data)
    return path


def _ggml_layers(n: int) -> list[tuple[str, tuple[int, ...], int, bytes]]:
    emb = [("tok_embeddings.weight", (8, 4), 0, bytes(8 * 4 * 4))]
    return emb + [(f"layers.{i}.attention_norm.weight", (8,), 0, bytes(32)) for i in range(n)]


GGML_CASES = {
    # hparams: n_vocab, n_embd, n_mult, n_head, n_layer, n_rot, ftype
    "n-layer-1e9": ((4, 8, 32, 2, 10**9, 4, 0), _ggml_layers(2), "n_layer 1000000000"),
    "n-rot-past-head": ((4, 8, 32, 2, 2, 100, 0), _ggml_layers(2), "n_rot 100"),
    "n-head-0": ((4, 8, 32, 0, 2, 4, 0), _ggml_layers(2), "n_head 0"),
    "dims-overflow": ((4, 8, 32, 2, 2, 4, 0), [("tok_embeddings.weight", (2**32 - 1,) * 4, 0, b"")], "truncated"),
    "dim-0": ((4, 8, 32, 2, 2, 4, 0), [("tok_embeddings.weight", (8, 0), 0, b"")], "tok_embeddings.weight"),
    "name-newline": ((4, 8, 32, 2, 2, 4, 0), [("tok_embeddings.weight", (8, 4), 0, bytes(128)),
                                              ("layers.0.\nx.weight", (8,), 0, bytes(32))], "tensor name"),
    "embd-mismatch": ((4, 16, 32, 2, 2, 4, 0), _ggml_layers(2), "n_embd 16"),
}


@pytest.mark.parametrize("name", sorted(GGML_CASES))
def test_ggml_file_one_clear_sentence(tmp_path, name: str):
    from mistralrs_cli.errors import UserError
    from mistralrs_cli.loaders.ggml import GGMLFile, load_ggml_model

    hparams, tensors, word = GGML_CASES[name]
    path = _ggjt(tmp_path / f"{name}.bin", hparams, tensors)
    with pytest.raises(UserError) as e:
        load_ggml_model(GGMLFile(path))
    assert f"{name}.bin" in str(e.value) and word in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_tiny_ggml_control_file_is_valid(tmp_path):
    """The hand-built GGML cases differ from a readable file only in what each breaks."""
    from mistralrs_cli.loaders.ggml import GGMLFile, ggml_config

    gf = GGMLFile(_ggjt(tmp_path / "ok.bin", (4, 8, 32, 2, 2, 4, 0), _ggml_layers(2)))
    cfg = ggml_config(gf)
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (2, 8, 4)
    assert np.asarray(gf.raw("tok_embeddings.weight")).shape == (4, 32)
