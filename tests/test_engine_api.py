"""The Python API (Runner) on the shared engine: n choices, seeds, logprobs, streaming."""
from __future__ import annotations

import pytest
import torch

import gguf_builder as gb
from mistralrs_cli.api import CompletionRequest, Runner, Which
from mistralrs_cli.engine.token_text import TokenText


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = gb.tiny_llama(0)
    path = gb.write_gguf(tmp_path_factory.mktemp("api") / "tiny.gguf", hf, gb.gguf_vocab(gb.train_tokenizer()))
    runner = Runner(Which.GGUF(None, str(path)), numerics="exact")
    runner.loaded.generation_config = {"temperature": 0.0}  # unset temperature: greedy, as a generation_config.json can say
    return hf, runner


def test_n_choices_seeds_and_logprobs(tiny):
    hf, runner = tiny
    req = dict(prompt="rain falls", max_tokens=4, n=2, temperature=1.0, seed=5)
    r = runner.send_completion_request(CompletionRequest(**req, logprobs=True, top_logprobs=2))
    again = runner.send_completion_request(CompletionRequest(**req))
    assert [c.text for c in r.choices] == [c.text for c in again.choices]
    assert r.choices[0].text != r.choices[1].text and r.usage.completion_tokens == 8
    text_of = TokenText(runner.loaded.tokenizer)
    by_bytes: dict[bytes, list[int]] = {}
    for i in range(runner.loaded.tokenizer.vocab_size):
        by_bytes.setdefault(bytes(text_of(i)[1]), []).append(i)
    for c in r.choices:  # each sampled token's logprob is transformers' log-softmax at that point
        seq = runner.tokenize_text("rain falls")
        for entry in c.logprobs["content"]:
            with torch.no_grad():
                lp = torch.log_softmax(hf(torch.tensor([seq])).logits[0, -1], -1)
            toks = [t for t in by_bytes[bytes(entry["bytes"])] if abs(float(lp[t]) - entry["logprob"]) < 1e-4]
            assert len(toks) == 1
            top = torch.topk(lp, 2)
            assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top.values.tolist(), abs=1e-4)
            seq.append(toks[0])


def test_stream_chunks_concatenate_to_the_whole_text(tiny):
    _, runner = tiny
    whole = runner.send_completion_request(CompletionRequest(prompt="the quick", max_tokens=6))
    chunks = list(runner.send_completion_request(CompletionRequest(prompt="the quick", max_tokens=6, stream=True)))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 6
    assert runner.engine.kv.alloc.held_by_sequences() <= 1  # the last request is reaped on the next step
