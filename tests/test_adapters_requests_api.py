"""LoRA adapters chosen per request, the rest of test_adapters_requests.py: the Python API's
`adapters` field and activate_adapters, `\\adapter` in -i, a model without adapters, adapters
merged at load, and an X-LoRA model beside named adapter sets. The references are the same:
transformers' greedy text of the base with the request's adapters merged by hand (W += scale * B @ A),
and peft's for X-LoRA."""
from __future__ import annotations

import httpx2 as httpx
import numpy as np
import openai
import pytest
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
from mistralrs_cli.api import ChatCompletionRequest, CompletionRequest, Runner, Which
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.load import load
from mistralrs_cli.prompting import chat_ids
from mistralrs_cli.types import LoadOptions, LoraSpec, PlainSpec, SamplingParams
from test_adapters_requests import CONFIG, PROMPT, TOL, at_once, build, error_of, reference_text
from test_server import MSGS, TEMPLATE, serve
from xlora_models import IDS, build_base, load_x, make_xlora, peft_greedy


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """F32 weights on the torch path (--numerics exact): transformers' text is the reference."""
    return build(tmp_path_factory, Q.F32, "exact", ["c"])

@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """The tiny llama with no adapters."""
    path = gb.write_gguf(tmp_path_factory.mktemp("plain") / "plain.gguf", gb.tiny_llama(0),
                         gb.gguf_vocab(gb.train_tokenizer()), chat_template=TEMPLATE)
    spec = Which.GGUF(None, str(path))
    return spec, load(spec, LoadOptions(token_source="none"))


def test_a_model_without_adapters_says_so(plain):
    with serve(plain[1]) as s:
        with pytest.raises(openai.BadRequestError) as e:
            s.client.chat.completions.create(model="m", messages=MSGS, max_tokens=2, extra_body={"adapters": ["a"]})
        assert error_of(e.value)["message"] == ("adapters names 'a', but this model was loaded without LoRA "
                                                "adapters; drop adapters or load the model with its adapters.")
        r = httpx.post(s.url + "/activate_adapters", json={"adapter_names": ["a"]})
        assert r.status_code == 400 and r.json()["error"]["message"] == (
            "this model was loaded without LoRA adapters, so there are none to activate; load it with a lora "
            "subcommand.")
        r = s.client.chat.completions.create(model="m", messages=MSGS, max_tokens=2, extra_body={"adapters": []})
        assert r.choices[0].finish_reason == "length"  # [] asks for no adapter: fine anywhere


def test_adapters_merged_at_load_are_named_all_or_not_at_all(tmp_path):
    """A float base with no preload_adapters has its adapters merged at load: always on."""
    from test_lora_peft import SEVEN, save_adapters, save_base, write_ordering

    hf = gb.tiny_llama(0)
    base_dir, adapters = save_base(hf, tmp_path / "base"), save_adapters(hf, SEVEN, tmp_path / "adapters")
    order = write_ordering(tmp_path / "o.json", base_dir, adapters, ["a1", "a2"])
    loaded = load(LoraSpec(PlainSpec(str(base_dir)), str(adapters), str(order)), LoadOptions(token_source="none"))
    assert loaded.adapters is None and loaded.default_adapters == ["a1", "a2"]
    with serve(loaded) as s:
        def send(names):
            return s.client.completions.create(model="m", prompt="the quick", max_tokens=2,
                                               extra_body={"adapters": names})
        assert send(["a2", "a1"]).choices[0].finish_reason == "length"
        with pytest.raises(openai.BadRequestError) as e:
            send(["a1"])
        err = error_of(e.value)
        assert err["param"] == "adapters" and err["message"].startswith("adapters leaves out a2, but the adapters are "
                                                                          "merged into the weights")


# ---- the Python API ----
def test_python_api_adapters_field_and_activate_adapters(tiny):
    runner = Runner(tiny.spec, loaded=tiny.loaded, engine_config=CONFIG)
    ids = chat_ids(tiny.loaded, MSGS)
    r = runner.send_chat_completion_request(ChatCompletionRequest(messages=MSGS, max_tokens=6, adapters=["a"]))
    assert r.choices[0].message.content == reference_text(tiny, ["a"], ids, 6)
    r = runner.send_completion_request(CompletionRequest(prompt=PROMPT, max_tokens=6, adapters=["b", "c"]))
    assert r.choices[0].text == reference_text(tiny, ["b", "c"], tiny.loaded.tokenizer.encode(PROMPT), 6)
    runner.activate_adapters(["b"])
    r = runner.send_chat_completion_request(ChatCompletionRequest(messages=MSGS, max_tokens=6))
    assert r.choices[0].message.content == reference_text(tiny, ["b"], ids, 6)
    with pytest.raises(UserError, match=r"^adapters names 'q', which this model does not serve; its adapters "
                                        r"are 'a', 'b', 'c'\.$"):
        runner.send_chat_completion_request(ChatCompletionRequest(messages=MSGS, max_tokens=2, adapters=["q"]))
    with pytest.raises(UserError, match=r"^adapter_names names 'q', which"):
        runner.activate_adapters(["q"])
    assert runner.engine.active_adapters == ["b"]


# ---- -i ----
def test_interactive_adapter_command(tiny, capsys):
    from mistralrs_cli.outputs import interactive
    from mistralrs_cli.outputs.request_log import RequestLog

    runner = Runner(tiny.spec, loaded=tiny.loaded, engine_config=CONFIG)
    chat = interactive.Chat(runner, SamplingParams(temperature=0.0, max_tokens=5), RequestLog(None), quiet=True)
    lines = iter([r"\help", r"\adapter", r"\adapter b nope", r"\adapter a b", r"\adapter", "the quick brown fox",
                  r"\exit"])
    chat.loop(lambda: next(lines))
    out, err = capsys.readouterr()
    assert r"\adapter <names>    run this chat with these LoRA adapters" in err
    assert "adapters: a, b, c; this chat uses c (the default)." in err
    assert r"error: \adapter names 'nope', which this model does not serve; its adapters are 'a', 'b', 'c'." in err
    assert "this chat now uses a, b." in err and "adapters: a, b, c; this chat uses a, b." in err
    msgs = [{"role": "user", "content": "the quick brown fox"}]
    assert out == reference_text(tiny, ["a", "b"], chat_ids(tiny.loaded, msgs), 5) + "\n"


def test_interactive_help_has_no_adapter_line_without_adapters(plain, capsys):
    from mistralrs_cli.outputs import interactive
    from mistralrs_cli.outputs.request_log import RequestLog

    chat = interactive.Chat(Runner(plain[0], loaded=plain[1]), SamplingParams(), RequestLog(None), quiet=True)
    lines = iter([r"\help", r"\adapter a", r"\exit"])
    chat.loop(lambda: next(lines))
    err = capsys.readouterr().err
    assert "adapter" not in err.split("this model")[0] and "\\temperature <x>" in err
    assert "this model was loaded without LoRA adapters." in err


# ---- an X-LoRA model ----
def test_xlora_model_serves_xlora_beside_named_adapter_sets(tmp_path):
    """On an X-LoRA model a request naming no adapters runs X-LoRA and the others run what they
    name: six at once equal each alone, and X-LoRA's tokens are peft's XLoraModel's; there is no
    default set to activate."""
    base = build_base(tmp_path)  # a tiny llama and three peft adapters (xlora_models.py)
    folder, xm = make_xlora(base, "served_http", {"top_k_lora": 2})
    loaded = load_x(base, folder, "gguf")
    sets = [None, [], ["0"], ["1"], ["0", "2"], ["0", "1", "2"]]
    with serve(loaded, config=CONFIG) as s:
        def send(names):
            extra = {} if names is None else {"extra_body": {"adapters": names}}
            r = s.client.completions.create(model="m", prompt=IDS, max_tokens=6, temperature=0, logprobs=1, **extra)
            return r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs
        together = at_once(s.worker, [lambda names=names: send(names) for names in sets])
        alone = [send(names) for names in sets]
        r = httpx.post(s.url + "/activate_adapters", json={"adapter_names": ["0"]})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("this is an X-LoRA model: a request")
    want = loaded.tokenizer.decode(peft_greedy(xm, IDS, 6))
    assert "".join(alone[0][0]) == want
    assert len({tuple(a[0]) for a in alone}) == len(sets)
    for names, got, one in zip(sets, together, alone):
        assert got[0] == one[0] and np.allclose(got[1], one[1], atol=TOL, rtol=0), names
