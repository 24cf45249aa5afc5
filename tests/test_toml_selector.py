"""`mistralrs toml -f FILE` (mistral.rs's TOML selectors): each kind builds the very Spec its
subcommand builds from the same values, loads and answers (tiny models made here); a speculative
selector answers what its target alone answers (greedy); through the CLI the answer equals the
gguf subcommand's; the shipped examples parse; bad TOML, a missing key and an unknown key are one
line each, naming the file and the key."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gguf_builder as gb
import vision_models as vm
import xlora_models as xm
from mistralrs_cli import cli
from mistralrs_cli.api import CompletionRequest, Runner
from mistralrs_cli.errors import UserError
from mistralrs_cli.toml_selector import read_selector
from mistralrs_cli.types import GGMLSpec, GGUFSpec, LoraSpec, PlainSpec, SpeculativeSpec, VisionSpec, XLoraSpec
from test_ggml import write_ggjt
from test_lora_peft import write_ordering

ROOT = Path(__file__).resolve().parents[1]
MISTRALRS = Path(sys.executable).with_name("mistralrs")
THETA = 50000.0  # the tiny llama's rope_theta (GGML files do not store it)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("toml")
    base = xm.build_base(d)
    order = write_ordering(d / "order.json", base["plain"], base["adapters"], ["0"])
    order_gguf = write_ordering(d / "order-gguf.json", base["plain"], base["adapters"], ["0"], base_id=str(base["gguf"]))
    xlora, _ = xm.make_xlora(base, "t", {})
    ggml = write_ggjt(d / "tiny.ggmlv3.f32.bin", base["hf"], gb.gguf_vocab(gb.train_tokenizer()).tokens)
    vision = vm.save_llava(vm.tiny_llava(0), d / "llava")
    return {"dir": d, "plain": str(base["plain"]), "gguf": str(base["gguf"]), "adapters": str(base["adapters"]),
            "order": str(order), "order_gguf": str(order_gguf), "xlora": str(xlora), "ggml": str(ggml),
            "vision": str(vision)}


# kind: (the [model] table / whole selector, the same model as subcommand arguments)
CASES = {
    "plain": ('[model]\nmodel_id = "{plain}"', ["plain", "-m", "{plain}"]),
    "gguf": ('[model]\nquantized_filename = "{gguf}"', ["gguf", "-f", "{gguf}"]),
    "ggml": (f'[model]\nquantized_filename = "{{ggml}}"\ntok_model_id = "{{plain}}"\ngqa = 2\nrope_theta = {THETA}',
             ["ggml", "-f", "{ggml}", "-t", "{plain}", "--gqa", "2", "--rope-theta", str(THETA)]),
    "lora": ('[model]\nmodel_id = "{plain}"\nadapters_model_id = "{adapters}"\norder = "{order}"',
             ["lora", "-m", "{plain}", "-a", "{adapters}", "-o", "{order}"]),
    "lora-gguf": ('[model]\nquantized_filename = "{gguf}"\nadapters_model_id = "{adapters}"\norder = "{order_gguf}"',
                  ["lora-gguf", "-f", "{gguf}", "-a", "{adapters}", "-o", "{order_gguf}"]),
    "x-lora": ('[model]\nmodel_id = "{plain}"\nxlora_model_id = "{xlora}"', ["x-lora", "-m", "{plain}", "-x", "{xlora}"]),
    "x-lora-gguf": ('[model]\nquantized_filename = "{gguf}"\nxlora_model_id = "{xlora}"\ntgt_non_granular_index = 2',
                    ["x-lora-gguf", "-f", "{gguf}", "-x", "{xlora}", "--tgt-non-granular-index", "2"]),
    "vision-plain": ('[model]\nmodel_id = "{vision}"\narch = "llava"', ["vision-plain", "-m", "{vision}", "-a", "llava"]),
    "speculative": ('[model]\nquantized_filename = "{gguf}"\n[speculative]\ngamma = 3\n'
                    '[speculative.draft_model]\nmodel_id = "{plain}"',
                    ["speculative", "-f", "{gguf}", "-d", "{plain}", "-n", "3"]),
}


def _write(tiny, name: str, text: str) -> Path:
    path = tiny["dir"] / f"{name}.toml"
    path.write_text(text.format(**tiny))
    return path


def _cli_spec(monkeypatch, argv: list[str]):
    """The spec a command line hands to run (cli._run replaced by a recorder)."""
    seen = []
    monkeypatch.setattr(cli, "_run", lambda ctx, spec: seen.append(spec))
    result = CliRunner().invoke(cli.app, ["--prompt", "hi", *argv])
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize("kind", list(CASES))
def test_selector_builds_the_subcommands_spec(tiny, monkeypatch, kind):
    text, argv = CASES[kind]
    path = _write(tiny, kind, text)
    ours = _cli_spec(monkeypatch, ["toml", "-f", str(path)])
    assert ours == read_selector(path).spec
    assert ours == _cli_spec(monkeypatch, [a.format(**tiny) for a in argv])


EXPECTED_TYPES = {"plain": PlainSpec, "gguf": GGUFSpec, "ggml": GGMLSpec, "lora": LoraSpec, "lora-gguf": LoraSpec,
                  "x-lora": XLoraSpec, "x-lora-gguf": XLoraSpec, "vision-plain": VisionSpec, "speculative": SpeculativeSpec}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_kind_loads_and_answers(tiny, kind):
    spec = read_selector(_write(tiny, kind, CASES[kind][0])).spec
    assert type(spec) is EXPECTED_TYPES[kind]
    out = Runner(which=spec, token_source="none").send_completion_request(
        CompletionRequest(prompt="the quick brown", max_tokens=4, temperature=0, ignore_eos=True))
    assert out.usage.completion_tokens == 4 and out.choices[0].text
    if kind == "speculative":  # the draft proposes, the target decides: greedy text is the target's
        alone = Runner(which=spec.target, token_source="none").send_completion_request(
            CompletionRequest(prompt="the quick brown", max_tokens=4, temperature=0, ignore_eos=True))
        assert out.choices[0].text == alone.choices[0].text


def test_selector_settings(tiny, monkeypatch):
    """Top-level tokenizer_json and repeat_last_n, and [model] dtype, as mistral.rs reads them; a
    flag given on the command line wins over the file."""
    tok = str(Path(tiny["plain"]) / "tokenizer.json")
    path = _write(tiny, "settings", f'tokenizer_json = "{tok}"\nrepeat_last_n = 12\n'
                                    '[model]\nmodel_id = "{plain}"\ndtype = "bf16"')
    sel = read_selector(path)
    assert sel.spec == PlainSpec(tiny["plain"], None, tok) and sel.repeat_last_n == 12 and sel.dtype == "bf16"
    seen = []
    monkeypatch.setattr(cli, "_run", lambda ctx, spec: seen.append(ctx.obj))
    for argv, want in ((["toml", "-f", str(path)], (12, "bf16")),
                       (["--repeat-last-n", "5", "--dtype", "f32", "toml", "-f", str(path)], (5, "f32"))):
        assert CliRunner().invoke(cli.app, ["--prompt", "hi", *argv]).exit_code == 0
        assert (seen[-1].sampling["repeat_last_n"], seen[-1].load.dtype) == want


EXAMPLE_KINDS = {"plain": PlainSpec, "gguf": GGUFSpec, "ggml": GGMLSpec, "lora": LoraSpec, "xlora": XLoraSpec,
                 "xlora-gguf": XLoraSpec, "speculative-gguf": SpeculativeSpec, "speculative-same-gguf": SpeculativeSpec,
                 "vision-plain": VisionSpec}


def test_shipped_examples_parse(monkeypatch):
    monkeypatch.chdir(ROOT)  # their ordering paths are relative to the working directory, as in mistral.rs
    files = sorted((ROOT / "examples" / "toml-selectors").glob("*.toml"))
    assert {f.stem for f in files} >= set(EXAMPLE_KINDS)
    for name, want in EXAMPLE_KINDS.items():
        spec = read_selector(ROOT / "examples" / "toml-selectors" / f"{name}.toml").spec
        assert type(spec) is want, name
    lora = read_selector(ROOT / "examples" / "toml-selectors" / "lora.toml").spec
    assert lora.base.model_id == "HuggingFaceH4/zephyr-7b-beta"  # the ordering's base_model_id


BAD = {  # selector text: what its one error line must name
    "bad-toml": ('[model\nmodel_id = "x"', ["is not valid TOML", "line 1"]),
    "missing-key": ('[model]\nadapters_model_id = "a"\nmodel_id = "m"', ["needs 'order'", "[model]"]),
    "unknown-key": ('[model]\nquantized_filename = "m.gguf"\ncolour = "red"', ["unknown key 'colour'", "[model]"]),
    "unknown-top": ('gamma = 3\n[model]\nmodel_id = "m"', ["unknown key 'gamma'", "top level"]),
    "no-model": ('repeat_last_n = 3', ["missing table [model]"]),
    "gamma-type": ('[model]\nmodel_id = "m"\n[speculative]\ngamma = "five"\n[speculative.draft_model]\nmodel_id = "d"',
                   ["'speculative.gamma' must be a positive integer"]),
    "draft-unknown": ('[model]\nmodel_id = "m"\n[speculative]\ngamma = 2\n[speculative.draft_model]\nmodel = "d"',
                      ["unknown key 'model'", "[speculative.draft_model]"]),
    "adapter-target": ('[model]\nmodel_id = "m"\nxlora_model_id = "x"\n[speculative]\ngamma = 2\n'
                       '[speculative.draft_model]\nmodel_id = "d"', ["speculative decoding takes", "XLora"]),
    "anymoe": ('[model]\nmodel_id = "m"\n[anymoe]\nprefix = "model.layers"', ["'anymoe'", "AnyMoE"]),
}


@pytest.mark.parametrize("name", list(BAD))
def test_mistakes_are_one_sentence(tmp_path, name):
    text, needles = BAD[name]
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        read_selector(path)
    msg = str(e.value)
    assert str(path) in msg and "\n" not in msg and all(n in msg for n in needles), msg


def _mistralrs(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(MISTRALRS), *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("name", ["bad-toml", "missing-key", "unknown-key"])
def test_cli_mistakes_are_one_line(tmp_path, name):
    path = tmp_path / f"{name}.toml"
    path.write_text(BAD[name][0])
    p = _mistralrs("--prompt", "hi", "toml", "-f", str(path))
    assert p.returncode == 1 and p.stdout == ""
    assert len(p.stderr.strip().splitlines()) == 1 and p.stderr.startswith(f"error: {path}"), p.stderr


def test_cli_answers_as_the_gguf_subcommand(tmp_path, smollm2_path):
    path = tmp_path / "gguf.toml"
    path.write_text(f'[model]\nquantized_filename = "{smollm2_path}"\n')
    flags = ["--temperature", "0", "--max-tokens", "8", "--prompt", "Why is the sky blue?"]
    a, b = _mistralrs(*flags, "toml", "-f", str(path)), _mistralrs(*flags, "gguf", "-f", str(smollm2_path))
    assert a.returncode == b.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.strip()


def test_bench_takes_selectors_too(tiny, monkeypatch):
    """mistralrs-bench ... toml -f FILE, as mistral.rs's mistralrs-bench took it."""
    path = _write(tiny, "bench", '[model]\nmodel_id = "{plain}"\ndtype = "bf16"')
    seen = []
    monkeypatch.setattr(cli, "_run", lambda ctx, spec: seen.append((ctx.obj, spec)))
    result = CliRunner().invoke(cli.bench_app, ["-p", "8", "-g", "2", "toml", "-f", str(path)])
    assert result.exit_code == 0, result.output
    assert seen[0][1] == PlainSpec(tiny["plain"]) and seen[0][0].load.dtype == "bf16"
