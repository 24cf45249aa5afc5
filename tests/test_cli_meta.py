"""The command line's own surface: --version (the installed distribution's version, as pyproject.toml
declares it), shell completion scripts (Typer's) that complete our subcommands and flags, --help in
sections, and mistralrs-server's help equal to mistralrs's."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "COLUMNS": "100", "HF_HUB_OFFLINE": "1"}


def _run(prog: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / prog), *args], capture_output=True, text=True, env=env or ENV, timeout=120)


def _sections(help_text: str) -> dict[str, list[str]]:
    """{section title: its options' long names} from click's plain help layout."""
    out: dict[str, list[str]] = {}
    title = None
    for line in help_text.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            out[title] = []
        elif title and line.startswith("  -"):
            names = line.strip().split("  ")[0]  # the option column, not its help text
            out[title] += [w.rstrip(",") for w in names.split() if w.startswith("--")]
    return out


@pytest.mark.parametrize("prog", ["mistralrs", "mistralrs-server"])
def test_version_is_the_distributions(prog):
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    p = _run(prog, "--version")
    assert p.returncode == 0 and p.stdout == f"{prog} {declared}\n", (p.stdout, p.stderr)


def test_help_is_grouped():
    p = _run("mistralrs", "--help")
    assert p.returncode == 0, p.stderr
    sec = _sections(p.stdout)
    by_word = {title.split()[0]: opts for title, opts in sec.items()}
    assert list(sec)[0].startswith("Output modes") and list(sec)[-1] == "Commands"
    assert {"--prompt", "--interactive", "--port", "--raw"} <= set(by_word["Output"])
    assert {"--host", "--api-key", "--request-logging-file"} <= set(by_word["Server"])
    assert {"--max-seqs", "--no-kv-cache", "--no-paged-attn", "--pa-blk-size", "--prefix-cache-n"} <= set(by_word["Engine"])
    assert {"--temperature", "--top-k", "--top-p", "--min-p", "--seed", "--max-tokens"} <= set(by_word["Sampling"])
    assert {"--isq", "--dtype", "--device", "--numerics", "--chat-template", "--token-source"} <= set(by_word["Model"])
    assert {"--max-n", "--max-body-bytes"} <= set(by_word["Limits"])
    assert {"--log", "--verbose", "--quiet"} <= set(by_word["Logging"])
    assert {"--version", "--install-completion", "--show-completion", "--help"} <= set(by_word["Other"])
    # every option is listed once
    flat = [o for opts in sec.values() for o in opts]
    assert len(flat) == len(set(flat))


def test_server_help_is_the_same_cli():
    a, b = _run("mistralrs", "--help"), _run("mistralrs-server", "--help")
    assert a.returncode == b.returncode == 0
    # click names the program it was started as in the Usage line; everything else is the same
    assert b.stdout.replace("Usage: mistralrs-server ", "Usage: mistralrs ") == a.stdout


def test_completion_script_for_the_shell_it_runs_in():
    """--show-completion detects the shell it was started from (Typer asks shellingham). The
    trailing `exit $?` keeps bash from exec'ing the program in its place: then the parent would be
    pytest and the nearest shell above it make's /bin/sh, which Typer does not complete for."""
    p = subprocess.run(["bash", "-c", f"'{BIN / 'mistralrs'}' --show-completion; exit $?"], capture_output=True, text=True,
                       env=ENV, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "complete -o default -F _mistralrs_completion mistralrs" in p.stdout


@pytest.mark.parametrize("shell,marker", [("bash", "complete -o default -F _mistralrs_completion mistralrs"),
                                          ("zsh", "compdef _mistralrs_completion mistralrs"),
                                          ("fish", "complete --command mistralrs")])
def test_completion_script_per_shell(shell, marker):
    # Typer's switch for naming the shell instead of detecting it (zsh and fish are not installed here)
    env = {**ENV, "_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"}
    p = _run("mistralrs", "--show-completion", shell, env=env)
    assert p.returncode == 0, p.stderr
    assert marker in p.stdout and "_MISTRALRS_COMPLETE" in p.stdout


def test_completion_completes_subcommands_and_flags():
    """What bash's completion function asks the program (the protocol the script above uses)."""
    env = {**ENV, "_MISTRALRS_COMPLETE": "complete_bash", "COMP_WORDS": "mistralrs x-lora-g", "COMP_CWORD": "1"}
    assert _run("mistralrs", env=env).stdout.split() == ["x-lora-gguf", "x-lora-ggml"]
    env.update(COMP_WORDS="mistralrs gguf --quantized-f", COMP_CWORD="2")
    assert _run("mistralrs", env=env).stdout.split() == ["--quantized-filename"]


def test_install_completion_writes_the_script(tmp_path):
    p = subprocess.run(["bash", "-c", f"'{BIN / 'mistralrs'}' --install-completion; exit $?"], capture_output=True,
                       text=True, env={**ENV, "HOME": str(tmp_path)}, timeout=120)
    assert p.returncode == 0, p.stderr
    script = (tmp_path / ".bash_completions" / "mistralrs.sh").read_text()
    assert "_MISTRALRS_COMPLETE" in script
    assert "mistralrs.sh" in (tmp_path / ".bashrc").read_text()


MODEL_COMMANDS = {  # each model subcommand with its required flags
    "gguf": ["-f", "m.gguf"], "ggml": ["-f", "m.bin"], "plain": ["-m", "d"], "vision-plain": ["-m", "d"],
    "lora": ["-m", "d", "-a", "a", "-o", "o.json"], "lora-gguf": ["-f", "m.gguf", "-a", "a", "-o", "o.json"],
    "lora-ggml": ["-f", "m.bin", "-a", "a", "-o", "o.json"], "x-lora": ["-x", "x"],
    "x-lora-gguf": ["-f", "m.gguf", "-x", "x"], "x-lora-ggml": ["-f", "m.bin", "-x", "x"],
}


@pytest.mark.parametrize("command", sorted(MODEL_COMMANDS))
def test_subcommand_dtype_as_mistral_rs_places_it(command, monkeypatch):
    """mistral.rs takes -d/--dtype after the model subcommand (`vision-plain -m ID --dtype f16`);
    there it wins over the global --dtype, and the global one still applies without it."""
    from typer.testing import CliRunner

    from mistralrs_cli import cli

    seen = []
    monkeypatch.setattr(cli, "run", lambda opts, spec: seen.append(opts.load.dtype))
    args = [command, *MODEL_COMMANDS[command]]
    for argv, want in ((["--prompt", "x", *args, "-d", "bf16"], "bf16"),
                       (["--dtype", "f16", "--prompt", "x", *args, "--dtype", "f32"], "f32"),
                       (["--dtype", "f16", "--prompt", "x", *args], "f16")):
        res = CliRunner().invoke(cli.app, argv)
        assert res.exit_code == 0, res.output
        assert seen.pop() == want, argv
