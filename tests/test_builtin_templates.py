"""Built-in chat templates (mistralrs_cli/chat_templates/*.jinja) for GGUF files without one: each
renders what the family's official template renders (transformers on the official text where the
test suite has it, else the turn format from the model card, written out by hand here), the
architecture and vocabulary pick the right one, and the real Gemma-3 file gets its template with a
one-line notice."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mistralrs_cli.loaders.builtin_templates import TEMPLATE_DIR, template_name
from mistralrs_cli.loaders.chat_template import ChatTemplate
from test_chat_template import GEMMA3, LLAMA3, MULTI, SMOLLM2, reference

USER = [{"role": "user", "content": "Hi"}]
CHAT = [{"role": "user", "content": " Hello! "}, {"role": "assistant", "content": "Hi there."},
        {"role": "user", "content": "What is 2+2?\n"}]
CASES = {"user": USER, "chat": CHAT, "system-chat": MULTI}


def builtin(name: str) -> ChatTemplate:
    return ChatTemplate((TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8"), name)


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({"<unk>": 0, "<bos>": 1, "<eos>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>")


@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("name, official", [("gemma", GEMMA3), ("llama3", LLAMA3)])
def test_equals_official_template_through_transformers(hf_tokenizer, name, official, case, gen):
    msgs = CASES[case]
    ours = builtin(name).render(msgs, gen, bos_token="<bos>", eos_token="<eos>")
    assert ours == reference(hf_tokenizer, official, msgs, gen)


@pytest.mark.parametrize("gen", [True, False])
def test_chatml_equals_smollm2s_own_template_given_a_system_message(hf_tokenizer, gen):
    # SmolLM2's template is ChatML plus a default system message when none is given
    assert builtin("chatml").render(MULTI, gen) == reference(hf_tokenizer, SMOLLM2, MULTI, gen)


def test_gemma_turn_format_from_the_model_card():
    got = builtin("gemma").render([{"role": "system", "content": "Be brief."}] + CHAT, bos_token="<bos>")
    assert got == ("<bos><start_of_turn>user\nBe brief.\n\nHello!<end_of_turn>\n"
                   "<start_of_turn>model\nHi there.<end_of_turn>\n"
                   "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n<start_of_turn>model\n")


# the model cards' formats, written out by hand
HAND = {
    "llama2": "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nHello! [/INST] Hi. </s><s>[INST] Why? [/INST]",
    "mistral": "<s>[INST] You are terse.\n\nHello! [/INST]Hi.</s>[INST] Why? [/INST]",
    "phi3": "<|system|>\nYou are terse.<|end|>\n<|user|>\nHello!<|end|>\n<|assistant|>\nHi.<|end|>\n"
            "<|user|>\nWhy?<|end|>\n<|assistant|>\n",
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
              "<|im_start|>assistant\nHi.<|im_end|>\n<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nHello!<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\nHi.<|eot_id|>"
              "<|start_header_id|>user<|end_header_id|>\n\nWhy?<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("name", list(HAND))
def test_model_card_formats(name):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Hi."}, {"role": "user", "content": "Why?"}]
    assert builtin(name).render(msgs, bos_token="<s>", eos_token="</s>") == HAND[name]


@pytest.mark.parametrize("name", ["gemma", "llama2", "mistral"])
def test_turns_must_alternate(name):
    from mistralrs_cli.loaders.chat_template import TemplateError

    with pytest.raises(TemplateError, match="alternate"):
        builtin(name).render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


@pytest.mark.parametrize("arch, vocab, expected", [
    ("gemma3", {"<start_of_turn>"}, "gemma"), ("gemma2", set(), "gemma"), ("gemma", set(), "gemma"),
    ("llama", {"<|im_start|>", "<|im_end|>"}, "chatml"), ("llama", {"<|start_header_id|>"}, "llama3"),
    ("llama", {"[INST]"}, "mistral"), ("llama", set(), "llama2"), ("qwen2", {"<|im_start|>"}, "chatml"),
    ("qwen3", set(), "chatml"), ("phi3", {"<|end|>"}, "phi3"), ("starcoder2", set(), "chatml"),
])
def test_selection_by_architecture_and_vocabulary(arch, vocab, expected):
    assert template_name(arch, vocab.__contains__) == expected


def test_every_named_template_is_shipped():
    from mistralrs_cli.loaders import builtin_templates as bt

    names = {*bt.ARCH_TEMPLATES.values(), *(n for _, n in bt.VOCAB_HINTS), *bt.ARCH_FALLBACK.values(), bt.FALLBACK}
    assert {p.stem for p in TEMPLATE_DIR.glob("*.jinja")} == names


def _cli(args):
    exe = Path(sys.executable).with_name("mistralrs")
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_gemma3_file_chats_with_a_notice(gemma3_path):
    from mistralrs_cli import Runner, Which
    from mistralrs_cli.prompting import chat_ids

    loaded = Runner(Which.GGUF(None, str(gemma3_path)), token_source="none").loaded
    ids = chat_ids(loaded, USER)
    text = "<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"
    assert loaded.tokenizer.decode(ids) == text and ids[:2] == [2, 105]  # <bos>, <start_of_turn>
    p = _cli(["--max-tokens", "2", "--prompt", "Hi", "gguf", "-f", str(gemma3_path)])
    assert p.returncode == 0, p.stderr
    notes = [line for line in p.stderr.splitlines() if "chat template" in line]
    assert len(notes) == 1 and "built-in gemma template" in notes[0] and "gemma3" in notes[0]
    assert "mistralrs_cli/chat_templates/gemma.jinja" in notes[0]
    q = _cli(["-q", "--max-tokens", "2", "--prompt", "Hi", "gguf", "-f", str(gemma3_path)])
    assert q.returncode == 0 and q.stderr == ""
