"""X-LoRA in the engine (engine/xlora_step.py): greedy text equal to peft's alone and batched
with requests running other adapter sets, other KV caches, --tgt-non-granular-index against a
loop written by hand over peft's layers, the x-lora subcommands and Which.XLora* (models:
tests/xlora_models.py).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.loaders.speculative import ngram_config
from mistralrs_cli.types import EngineConfig
from xlora_models import IDS, build_base, generate, load_x, make_xlora, peft_greedy

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("xlora"))


@pytest.fixture(scope="module")
def served(base):
    folder, xm = make_xlora(base, "served", {"top_k_lora": 2})
    return load_x(base, folder), xm


def test_xlora_text_equals_peft_and_batching_changes_nothing(served):
    """An X-LoRA request gives peft's greedy tokens, alone and in the same steps as requests naming
    none, one or two of its adapters as plain LoRA (some on the same prompt: the prefix cache must
    not hand one the other's keys); each of those gives what it gives alone."""
    loaded, xm = served
    engine = Engine(loaded, EngineConfig(block_size=4))
    other = [5, 77, 300, 12, 9, 250, 31]
    jobs = [(IDS, None), (IDS, []), (other, ["0"]), (IDS, ["1", "2"]), (other, None), (other, [])]
    alone = [generate(engine, [job], 6)[0] for job in jobs]
    assert alone[0] == peft_greedy(xm, IDS, 6)
    assert len({tuple(a) for a in alone[:4]}) == 4  # four adapter sets, four texts: the sets matter
    assert generate(engine, jobs, 6) == alone
    assert generate(engine, jobs[::-1], 6) == alone[::-1]
    assert not engine.xlora.state  # every scaling-pass cache freed with its sequence


@pytest.mark.parametrize("config", [EngineConfig(no_kv_cache=True), EngineConfig(paged_attn=False)],
                         ids=["no-kv-cache", "contiguous-cache"])
def test_other_caches(served, config):
    """--no-kv-cache (every step recomputes the sequence, the scaling pass too) and --no-paged-attn."""
    loaded, xm = served
    assert generate(Engine(loaded, config), [(IDS, None), ([5, 77, 300], [])], 4)[0] == peft_greedy(xm, IDS, 4)


def test_speculation_is_off_on_an_xlora_model_with_a_warning(served, caplog):
    """--spec-ngram on an x-lora subcommand: drafts would need the scaling pass rolled back too, so
    the engine runs none and says so; the text stays peft's."""
    loaded, xm = served
    loaded = dataclasses.replace(loaded, speculative=ngram_config(2))
    with caplog.at_level(logging.WARNING, logger="mistralrs_cli.engine.engine"):
        engine = Engine(loaded, EngineConfig(block_size=4))
    assert engine.spec is None
    assert "speculative decoding is off: it does not run on an X-LoRA model" in caplog.text
    assert generate(engine, [(IDS, None)], 4)[0] == peft_greedy(xm, IDS, 4)


@pytest.mark.parametrize("tgt", [0, 2])
def test_tgt_non_granular_index(base, tgt):
    folder, xm = make_xlora(base, f"ng{tgt}", {"layerwise_scalings": True})
    loaded = load_x(base, folder, tgt=tgt)
    engine = Engine(loaded, EngineConfig(block_size=4))
    out = generate(engine, [(IDS, None), ([5, 77, 300, 12], [])], 6)
    assert out[0] == peft_greedy(xm, IDS, 6, tgt)
    assert out[0] != peft_greedy(xm, IDS, 6)  # reusing the scalings changes this text: the rule is seen
    # the scaling pass ran for the prompt and the first tgt generated tokens only
    assert engine.xlora.scaling_rows == len(IDS) + tgt


def test_bad_input_through_the_cli(base, tmp_path):
    """The subcommand answers a bad X-LoRA folder (an adapter folder missing) with the sentence
    alone and a non-zero exit."""
    folder, _ = make_xlora(base, "cli_bad", {})
    shutil.rmtree(folder / "1")
    exe = Path(sys.executable).with_name("mistralrs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MISTRALRS_CLI_CACHE": str(tmp_path)}
    p = subprocess.run([str(exe), "--prompt", "hi", "x-lora", "-m", str(base["plain"]), "-x", str(folder)],
                       env=env, text=True, capture_output=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "names adapter 1 but" in lines[0], p.stderr
    p = subprocess.run([str(exe), "--prompt", "hi", "x-lora", "-x", str(folder)], env=env, text=True,
                       capture_output=True, timeout=120)
    assert p.returncode != 0 and p.stderr.strip().endswith(
        "x-lora needs the base model: pass -m/--model-id, or an -o/--order file whose base_model_id names it."), p.stderr
    assert len(p.stderr.strip().splitlines()) == 1


def test_cli_and_api_text_equal_peft(base, tmp_path):
    """`mistralrs x-lora-plain` (the seed's command), Runner(Which.XLora(...)) and
    Runner(Which.XLoraGGUF(...)) on the F32 GGUF: peft's greedy text."""
    from mistralrs_cli import CompletionRequest, Runner, Which

    folder, xm = make_xlora(base, "cli_text", {"top_k_lora": 2, "softmax_temperature": 0.7})
    prompt, steps = "the quick brown fox", 6
    exe = Path(sys.executable).with_name("mistralrs")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1", "MISTRALRS_CLI_CACHE": str(tmp_path)}
    proc = subprocess.Popen([str(exe), "--raw", "--temperature", "0", "--max-tokens", str(steps), "--prompt", prompt,
                             "x-lora-plain", "-m", str(base["plain"]), "-x", str(folder)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # bytes: the text may hold a CR
    texts = []
    for which in (Which.XLora(xlora_model_id=str(folder), order=None, model_id=str(base["plain"])),
                  Which.XLoraGGUF(None, str(base["gguf"]), xlora_model_id=str(folder), tgt_non_granular_index=None)):
        runner = Runner(which, token_source="none")
        tok = runner.loaded.tokenizer
        want = tok.decode(peft_greedy(xm, tok.encode(prompt), steps))
        res = runner.send_completion_request(CompletionRequest(prompt=prompt, max_tokens=steps, temperature=0.0))
        assert res.choices[0].text == want
        texts.append(want)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.decode("utf-8") == texts[0] + "\n", (out, err)




def test_prefix_cache_after_non_granular_tokens(base):
    """A request whose prompt continues an earlier one's text (a chat's next turn) gives what it
    gives on a fresh engine: the earlier keys past its --tgt-non-granular-index were computed with
    reused scalings, so the prefix cache must not hand them over."""
    folder, _ = make_xlora(base, "prefix", {"layerwise_scalings": True})
    loaded = load_x(base, folder, tgt=1)
    engine = Engine(loaded, EngineConfig(block_size=2))
    first = generate(engine, [(IDS, None)], 8)[0]
    follow = IDS + first[:6]
    assert generate(engine, [(follow, None)], 4) == generate(Engine(loaded, EngineConfig(block_size=2)),
                                                             [(follow, None)], 4)


def test_server_with_the_openai_client(served):
    """The server on an X-LoRA model: a completion naming no adapters is peft's X-LoRA text,
    `extra_body={"adapters": []}` the base model's; /activate_adapters is refused in one sentence."""
    import openai

    from test_server import serve

    loaded, xm = served
    tok = loaded.tokenizer
    prompt, steps = "the quick brown fox", 5
    want = tok.decode(peft_greedy(xm, tok.encode(prompt), steps))
    base_ids = generate(Engine(loaded, EngineConfig()), [(tok.encode(prompt), [])], steps)[0]
    with serve(loaded) as srv:
        res = srv.client.completions.create(model="x", prompt=prompt, max_tokens=steps, temperature=0)
        assert res.choices[0].text == want
        res = srv.client.completions.create(model="x", prompt=prompt, max_tokens=steps, temperature=0,
                                            extra_body={"adapters": []})
        assert res.choices[0].text == tok.decode(base_ids) != want
        with pytest.raises(openai.BadRequestError) as e:
            srv.client.post("/activate_adapters", body={"adapter_names": ["0"]}, cast_to=dict)
        msg = e.value.response.json()["error"]["message"]
        assert "X-LoRA" in msg and "\n" not in msg
