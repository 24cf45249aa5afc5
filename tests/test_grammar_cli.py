"""The CLI's grammar flags (--grammar-regex RE, --grammar-lark FILE, --json-schema FILE, --json) with
--prompt and -i on SmolLM2, judged by jsonschema / re.fullmatch / json; a bad grammar is one
`error:` line naming the flag and a non-zero exit, before the model loads where it can be."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

CLI = str(Path(sys.executable).with_name("mistralrs"))
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "population"],
          "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer", "minimum": 0}}}


def mistralrs(args: list[str], model: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, "-q", "--max-tokens", "60", *args, "gguf", "-f", str(model)], input=stdin,
                          capture_output=True, text=True, env=ENV, timeout=180)


def test_prompt_with_each_grammar_flag(smollm2_path, tmp_path):
    schema = tmp_path / "city.json"
    schema.write_text(json.dumps(SCHEMA))
    lark = tmp_path / "answer.lark"
    lark.write_text('start: "yes" | "no" | "it depends"\n')
    runs = {
        "schema": mistralrs(["--temperature", "1", "--seed", "3", "--json-schema", str(schema), "--prompt",
                             "Describe Paris."], smollm2_path),
        "json": mistralrs(["--temperature", "0", "--json", "--prompt", "Describe Paris as JSON."], smollm2_path),
        "regex": mistralrs(["--grammar-regex", "[0-9]{2}:[0-9]{2}", "--prompt", "What time is it?"], smollm2_path),
        "lark": mistralrs(["--grammar-lark", str(lark), "--prompt", "Is it raining?"], smollm2_path),
    }
    for name, r in runs.items():
        assert r.returncode == 0, (name, r.stderr)
    jsonschema.validate(json.loads(runs["schema"].stdout), SCHEMA)
    assert isinstance(json.loads(runs["json"].stdout), dict)
    assert re.fullmatch("[0-9]{2}:[0-9]{2}", runs["regex"].stdout.strip())
    assert runs["lark"].stdout.strip() in ("yes", "no", "it depends")


def test_interactive_answers_are_json_objects(smollm2_path, tmp_path):
    log = tmp_path / "requests.jsonl"
    r = subprocess.run([CLI, "--json", "--temperature", "0", "--max-tokens", "60", "--log", str(log), "-i", "gguf",
                        "-f", str(smollm2_path)], input="Describe Paris.\nNow Rome.\n\\exit\n",
                       capture_output=True, text=True, env=ENV, timeout=180)
    assert r.returncode == 0, r.stderr
    answers = [json.loads(x)["body"]["text"] for x in log.read_text().splitlines()
               if json.loads(x)["kind"] == "response"]
    assert len(answers) == 2 and all(isinstance(json.loads(a), dict) for a in answers)


@pytest.mark.parametrize("args, says", [
    (["--grammar-regex", "[a-", "--prompt", "x"], "error: --grammar-regex [a- is not a valid regex"),
    (["--grammar-lark", "{lark}", "--prompt", "x"], "is not a valid Lark grammar"),
    (["--json-schema", "{bad_json}", "--prompt", "x"], "is not valid JSON"),
    (["--json-schema", "{unsupported}", "--prompt", "x"], "keyword or format that is not supported"),
    (["--json-schema", "{missing}", "--prompt", "x"], "cannot read the file"),
    (["--json", "--grammar-regex", "a", "--prompt", "x"], "are different grammars; give one"),
    (["--json", "--port", "0"], "--json goes with --prompt or -i"),
    (["--grammar-regex", "[a&&b]", "--prompt", "x"], "no token can start it"),  # needs the vocabulary
])
def test_bad_grammar_flags_are_one_error_line(smollm2_path, tmp_path, args, says):
    files = {"lark": "start: (", "bad_json": "{not json", "unsupported": '{"type": "object", "if": {}}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [a.format(**{k: str(tmp_path / k) for k in [*files, "missing"]}) for a in args]
    r = mistralrs(args, smollm2_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
