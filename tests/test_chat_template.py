"""Chat templates rendered by us must equal transformers' apply_chat_template on the same text,
and a hostile template must be stopped by the sandbox, never run."""

import json
from datetime import datetime

import pytest

from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.chat_template import (
    ChatTemplate, TemplateError, flatten_text_content, resolve_chat_template)

# SmolLM2-135M-Instruct.Q4_1.gguf, metadata key tokenizer.chat_template (ChatML).
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}")

# google/gemma-3 tokenizer_config.json chat_template.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# meta-llama/Meta-Llama-3-8B-Instruct chat_template (BOS comes from the template).
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

# Mistral-style: rejects unknown roles, exercises trim_blocks/lstrip_blocks, loop controls, tojson.
STRICT = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}
[SYS]{{ message['content'] }}[/SYS]
    {% elif message['role'] == 'user' %}
[INST] {{ message['content'] }} [/INST]
    {% else %}
{{ message['content'] }}{{ eos_token }}
    {% endif %}
    {% if loop.index > 20 %}{% break %}{% endif %}
{% endfor %}
{% if tools is defined %}{{ tools | tojson }}{{ tools | tojson(indent=2) }}{% endif %}
"""

SYSTEM = {"role": "system", "content": "You are terse."}
MULTI = [SYSTEM, {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": "Hi."},
         {"role": "user", "content": "What is 2+2? <b>&</b> é"}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def reference(tok, template, messages, add_generation_prompt=True, **kw):
    tok.chat_template = template
    return tok.apply_chat_template(messages, tokenize=False,
                                   add_generation_prompt=add_generation_prompt, **kw)


CASES = {
    "smollm2-user": (SMOLLM2, [{"role": "user", "content": "Hi"}]),
    "smollm2-system-multi": (SMOLLM2, MULTI),
    "gemma3-single": (GEMMA3, [{"role": "user", "content": "  Hello  "}]),
    "gemma3-system-multi": (GEMMA3, MULTI),
    "llama3-multi": (LLAMA3, MULTI),
    "llama3-single": (LLAMA3, [{"role": "user", "content": "Hi"}]),
    "strict-multi": (STRICT, MULTI),
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_render_matches_transformers(hf_tokenizer, name, add_generation_prompt):
    template, messages = CASES[name]
    ours = ChatTemplate(template, "test").render(messages, add_generation_prompt,
                                                 bos_token="<s>", eos_token="</s>")
    assert ours == reference(hf_tokenizer, template, messages, add_generation_prompt)


def test_tojson_matches_transformers(hf_tokenizer):
    tools = [{"name": "f", "description": "<ü> & 'x'", "parameters": {"b": 1, "a": [1, 2]}}]
    messages = [{"role": "user", "content": "x"}]
    ours = ChatTemplate(STRICT, "test").render(messages, bos_token="<s>", eos_token="</s>",
                                               tools=tools)
    assert ours == reference(hf_tokenizer, STRICT, messages, tools=tools)
    assert '"<ü> & \'x\'"' in ours  # not HTML-escaped, not ASCII-escaped


def test_raise_exception_carries_template_message(hf_tokenizer):
    messages = [{"role": "tool", "content": "x"}]
    with pytest.raises(Exception, match="Unknown role: tool"):
        reference(hf_tokenizer, STRICT, messages)
    with pytest.raises(TemplateError) as e:
        ChatTemplate(STRICT, "tokenizer_config.json").render(messages)
    assert isinstance(e.value, UserError)
    assert e.value.template_message == "Unknown role: tool"
    assert "tokenizer_config.json" in str(e.value) and "Unknown role: tool" in str(e.value)


def test_gemma3_rejects_non_alternating_roles():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(TemplateError, match="must alternate"):
        ChatTemplate(GEMMA3, "GGUF tokenizer.chat_template").render(messages)


def test_content_parts_are_joined_for_text_models(hf_tokenizer):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello"},
                                          {"type": "image_url", "image_url": {"url": "x"}},
                                          {"type": "text", "text": "there"}]}]
    assert flatten_text_content(parts)[0]["content"] == "Hello\nthere"
    ours = ChatTemplate(SMOLLM2, "t").render(parts)
    assert ours == reference(hf_tokenizer, SMOLLM2, [{"role": "user", "content": "Hello\nthere"}])
    assert parts[0]["content"][0] == {"type": "text", "text": "Hello"}  # caller's list untouched
    # A vision caller keeps the parts for templates that place image tokens.
    gemma_parts = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}]
    ours = ChatTemplate(GEMMA3, "t").render(gemma_parts, bos_token="<s>", flatten_content=False)
    assert ours == reference(hf_tokenizer, GEMMA3, gemma_parts)


def test_strftime_now():
    out = ChatTemplate("{{ strftime_now('%Y') }}", "t").render([])
    assert out == str(datetime.now().year)


HOSTILE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in ''.__class__.__mro__[1].__subclasses__() %}{% if c.__name__ == 'Popen' %}"
    "{{ c(['touch', 'PWNED']) }}{% endif %}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.popen('touch PWNED').read() }}",
    "{{ self._TemplateReference__context.cycler.__init__.__globals__.os.system('touch PWNED') }}",
    "{{ joiner.__init__.__globals__['os'].system('touch PWNED') }}",
    "{{ raise_exception.__globals__['__builtins__']['__import__']('os').system('touch PWNED') }}",
    "{% set ns = namespace(__class__=1) %}{{ ns }}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update(role='x') }}",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_sandbox_stops_cve_2024_34359_payloads(source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    template = ChatTemplate(source, "GGUF tokenizer.chat_template")
    with pytest.raises(TemplateError, match="unsafe operation") as e:
        template.render([{"role": "user", "content": "hi"}])
    assert "GGUF tokenizer.chat_template" in str(e.value)
    assert not (tmp_path / "PWNED").exists()


def test_non_json_values_reach_the_template_as_placeholders():
    class Rich(str):
        def danger(self):
            raise AssertionError("template called a method of a caller object")
    out = ChatTemplate("{{ messages[0].content }}|{{ messages[0].content.danger }}", "t").render(
        [{"role": "user", "content": Rich("hi")}])
    assert out == "hi|"


def test_syntax_error_names_origin():
    with pytest.raises(TemplateError, match=r"from --chat-template .*line 1"):
        ChatTemplate("{% for %}", "--chat-template")


# ---- resolve_chat_template -------------------------------------------------------------------

def test_resolution_order(tmp_path):
    gguf, config = "{{ 'gguf' }}", {"chat_template": "{{ 'config' }}"}
    assert resolve_chat_template("{{ 'cli' }}", config, gguf).render([]) == "cli"
    assert resolve_chat_template(None, config, gguf).origin == "tokenizer_config.json"
    assert resolve_chat_template(None, {"chat_template": None}, gguf).origin == \
        "GGUF tokenizer.chat_template"
    assert resolve_chat_template(None, {}, gguf).render([]) == "gguf"
    assert resolve_chat_template(None, None, None) is None


def test_named_templates_pick_default():
    config = {"chat_template": [{"name": "tool_use", "template": "{{ 'tools' }}"},
                                {"name": "default", "template": "{{ 'default' }}"}]}
    assert resolve_chat_template(None, config, None).render([]) == "default"
    with pytest.raises(UserError, match=r"tokenizer_config.json.*'default'"):
        resolve_chat_template(None, {"chat_template": [{"name": "rag", "template": "x"}]}, None)


def test_cli_files(tmp_path):
    (tmp_path / "t.jinja").write_text("{{ 'jinja' }}")
    (tmp_path / "t.j2").write_text("{{ 'j2' }}")
    (tmp_path / "t.json").write_text(json.dumps({"chat_template": "{{ 'json' }}"}))
    (tmp_path / "named.json").write_text(json.dumps(
        {"chat_template": [{"name": "default", "template": "{{ 'named' }}"}]}))
    for name, expected in [("t.jinja", "jinja"), ("t.j2", "j2"), ("t.json", "json"),
                           ("named.json", "named")]:
        template = resolve_chat_template(str(tmp_path / name), None, "{{ 'gguf' }}")
        assert template.render([]) == expected
        assert template.origin == f"--chat-template {tmp_path / name}"


@pytest.mark.parametrize("value", ["missing.jinja", "./templates/chatml.json", "chatml"])
def test_cli_missing_path_names_the_flag(value, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="--chat-template"):
        resolve_chat_template(value, None, None)


def test_cli_bad_json_files(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "nokey.json").write_text('{"bos_token": "<s>"}')
    with pytest.raises(UserError, match=r"--chat-template file .*bad.json is not valid JSON"):
        resolve_chat_template(str(tmp_path / "bad.json"), None, None)
    with pytest.raises(UserError, match=r"nokey.json has no \"chat_template\" key"):
        resolve_chat_template(str(tmp_path / "nokey.json"), None, None)


def test_smollm2_constant_is_the_gguf_metadata():
    path = __import__("pathlib").Path.home() / ".cache/mistralrs-cli/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        pytest.skip("SmolLM2 GGUF not downloaded (make models)")
    from gguf import GGUFReader
    field = GGUFReader(path).fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == SMOLLM2
