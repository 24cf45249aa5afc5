"""`mistralrs-bench` as a user runs it: the table and --json for pp/tg tests per concurrency on a
tiny GGUF model, and bad options as one error line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb

BENCH = Path(sys.executable).with_name("mistralrs-bench")


def _bench(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([str(BENCH), *args], env=env, cwd=cwd, text=True, capture_output=True,
                          stdin=subprocess.DEVNULL, timeout=300)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("bench")
    return gb.write_gguf(d / "tiny.gguf", gb.tiny_llama(1), gb.gguf_vocab(gb.train_tokenizer()), qtype=Q.Q8_0)


def test_table_and_json(model, tmp_path):
    out = tmp_path / "r.json"
    p = _bench("-p", "24", "-g", "6", "-c", "1,3", "-r", "2", "--json", str(out), "gguf", "-f", str(model), cwd=tmp_path)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("|")]
    assert lines[0] == "| model | backend | test | t/s | ms/t | concurrency | throughput/s | TTFT ms |"
    assert len(lines) == 2 + 4  # header, rule, (pp, tg) x (1, 3)
    assert "peak RSS" in p.stderr
    doc = json.loads(out.read_text())
    got = [(r["test"], r["concurrency"]) for r in doc["rows"]]
    assert got == [("pp 24", 1), ("tg 6", 1), ("pp 24", 3), ("tg 6", 3)]
    for r in doc["rows"]:
        assert r["tps_mean"] > 0 and r["throughput"] > 0
        assert abs(r["ms_per_token"] - 1e3 / r["tps_mean"]) < 1e-6 * r["ms_per_token"]
    assert doc["peak_rss_mb"] > 0 and doc["options"]["repetitions"] == 2


@pytest.mark.parametrize("args,needle", [(["-c", "0"], "-c/--concurrency"), (["-c", "x"], "-c/--concurrency"),
                                         (["-r", "0"], "-r/--repetitions"),
                                         (["-p", "0", "-g", "0"], "-p/--n-prompt")])
def test_bad_options_are_one_error_line(model, tmp_path, args, needle):
    p = _bench(*args, "gguf", "-f", str(model), cwd=tmp_path)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
