"""The Docker files, checked without a Docker daemon (none runs here, so the images were never
built): each Dockerfile's install steps are the README's commands for it, line for line; they pin
the torch the Makefile and the README's by-hand steps install; the entry point is mistralrs-server
on every interface with the Hugging Face cache in a volume; docker-compose.yml uses both files."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def _readme_block(intro: str) -> list[str]:
    """The commands of the ```sh block right after the README line that ends with `intro`."""
    text = _section("Docker")
    m = re.search(re.escape(intro) + r"\s*\n```sh\n(.*?)```", text, re.S)
    assert m, f"README's Docker section has no block after {intro!r}"
    return [line.split("  #")[0].strip() for line in m.group(1).splitlines() if line.strip()]


def _run_steps(dockerfile: str) -> list[str]:
    """The RUN commands after the '# install: the README's steps' comment."""
    text = (ROOT / dockerfile).read_text().split("# install: the README's steps\n", 1)[1]
    steps = []
    for line in text.splitlines():
        if not line.startswith("RUN "):
            break
        steps.append(line[4:].strip())
    return steps


def _instructions(dockerfile: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (ROOT / dockerfile).read_text().replace("\\\n", " ").splitlines():
        if line and not line.startswith(("#", " ")):
            word, _, rest = line.partition(" ")
            out.setdefault(word, []).append(rest.strip())
    return out


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_install_steps_are_the_readmes(dockerfile):
    steps = _run_steps(dockerfile)
    assert steps == _readme_block(f"`{dockerfile}` runs:")
    assert steps[0] == "python3 -m venv .venv"
    # the torch pin is the Makefile's and the by-hand steps'
    torch = re.search(r"^TORCH \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert shlex.split(steps[1])[:3] == [".venv/bin/pip", "install", torch]
    assert f".venv/bin/pip install {torch}" in README.split("## Using it")[0]


def test_cuda_image_installs_the_cuda_extra():
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert _run_steps("Dockerfile.cuda")[-1] == ".venv/bin/pip install '.[cuda]'"
    assert any(d.startswith("cupy-cuda") and "==" in d for d in extras["cuda"])
    assert "--index-url" not in _run_steps("Dockerfile.cuda")[1]  # PyPI's CUDA build of torch
    assert "whl/cpu" in _run_steps("Dockerfile")[1]  # the CPU image never downloads CUDA libraries


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_entry_point_and_cache_volume(dockerfile):
    ins = _instructions(dockerfile)
    entry = json.loads(ins["ENTRYPOINT"][-1])
    assert entry[0] == "mistralrs-server" and entry[entry.index("--host") + 1] == "0.0.0.0"
    port = entry[entry.index("--port") + 1]
    assert ins["EXPOSE"] == [port] and ins["VOLUME"] == ["/data"]
    assert "HF_HOME=/data" in " ".join(ins["ENV"])
    assert len(ins["FROM"]) == 1 and ":" in ins["FROM"][0]  # a pinned base image tag


def test_compose_runs_both_images_with_a_valid_command_line(monkeypatch):
    """Each service's command, after the image's entry point, is a command line our CLI takes:
    the server on 0.0.0.0:80 with the GGUF the compose file names."""
    yaml = pytest.importorskip("yaml")
    from typer.testing import CliRunner

    from mistralrs_cli import cli
    from mistralrs_cli.types import GGUFSpec

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert {s["build"]["dockerfile"] for s in services.values()} == {"Dockerfile", "Dockerfile.cuda"}
    seen = []
    monkeypatch.setattr(cli, "_run", lambda ctx, spec: seen.append((ctx.obj, spec)))
    for s in services.values():
        assert any(v.endswith(":/data") for v in s["volumes"]) and s["ports"] == ["1234:80"]
        entry = json.loads(_instructions(s["build"]["dockerfile"])["ENTRYPOINT"][-1])
        result = CliRunner().invoke(cli.app, entry[1:] + s["command"])
        assert result.exit_code == 0, result.output
        opts, spec = seen[-1]
        assert (opts.host, opts.port, opts.load.token_source) == ("0.0.0.0", 80, "env")
        assert spec == GGUFSpec("mistral-7b-instruct-v0.1.Q4_K_M.gguf", "TheBloke/Mistral-7B-Instruct-v0.1-GGUF")
    gpu = services["mistralrs-cuda"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]


def test_dockerignore_keeps_what_pip_install_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()}
    for needed in ("pyproject.toml", "README.md", "mistralrs_cli", "cuda"):
        assert needed not in ignored and (ROOT / needed).exists()
