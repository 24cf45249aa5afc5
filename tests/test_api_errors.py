"""Errors raised to Python name the Python field (quantized_filename, model_id, chat_template...),
not the command-line flag the same message names on the CLI (-f, -m/--model-id, --chat-template);
and the README's Python example runs as written from any directory."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mistralrs_cli.api import Runner, Which, python_field_names
from mistralrs_cli.errors import UserError
from mistralrs_cli.types import GGUFSpec, PlainSpec

ROOT = Path(__file__).resolve().parent.parent
FLAG = re.compile(r"(?<![\w-])-{1,2}[a-z]")  # -f, --model-id ...


def _error(which, **kw) -> str:
    with pytest.raises(UserError) as e:
        Runner(which, token_source="none", **kw)
    return str(e.value)


def test_missing_gguf_file_names_quantized_filename(tmp_path):
    msg = _error(Which.GGUF(None, str(tmp_path / "nope.gguf")))
    assert "quantized_filename" in msg and not FLAG.search(msg), msg


def test_gguf_directory_names_the_fields(tmp_path):
    msg = _error(Which.GGUF(None, str(tmp_path)))
    assert "quantized_filename" in msg and "quantized_model_id" in msg and not FLAG.search(msg), msg
    msg = _error(Which.GGUF(str(tmp_path), "nope.gguf"))
    assert "nope.gguf" in msg and not FLAG.search(msg), msg


def test_plain_missing_dir_names_model_id(tmp_path):
    msg = _error(Which.Plain(str(tmp_path / "no" / "such" / "dir")))
    assert "model_id" in msg and not FLAG.search(msg), msg


def test_chat_template_field(smollm2_path, tmp_path):
    msg = _error(Which.GGUF(None, str(smollm2_path)), chat_template=str(tmp_path / "missing.jinja"))
    assert "chat_template" in msg and not FLAG.search(msg), msg


def test_the_cli_still_names_flags(tmp_path):
    exe = Path(sys.executable).with_name("mistralrs")
    p = subprocess.run([str(exe), "--prompt", "hi", "gguf", "-f", str(tmp_path / "nope.gguf")],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "-f" in p.stderr and "quantized_filename" not in p.stderr


@pytest.mark.parametrize("spec, message, expected", [
    (GGUFSpec("x"), "check the -m/-f paths.", "check the quantized_model_id/quantized_filename paths."),
    (GGUFSpec("x"), "pass -t/--tok-model-id or --tokenizer-json FILE.", "pass tok_model_id or tokenizer_json FILE."),
    (PlainSpec("x"), "check -t/--tokenizer-json; --arch llama", "check tokenizer_json; arch llama"),
    (PlainSpec("x"), "the file-name, a --top-p-like word and x-f stay", "the file-name, a --top-p-like word and x-f stay"),
])
def test_flag_to_field_table(spec, message, expected):
    assert python_field_names(message, spec) == expected


def _readme_python() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("### Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_python_example_runs_as_written(smollm2_path, tmp_path):
    code = _readme_python()
    assert "max_tokens=" in code and "os.path.expanduser" in code
    default = "~/.cache/mistralrs-cli/models"
    assert default in code
    if os.environ.get("MISTRALRS_CLI_CACHE"):  # the models live elsewhere on this machine
        code = code.replace(default, str(smollm2_path.parent))
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert "Usage(" in p.stdout and len(p.stdout.strip()) > 20
