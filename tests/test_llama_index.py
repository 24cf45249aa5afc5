"""LlamaIndex: mistralrs_cli.integrations.llama_index.MistralRS (our engine in process) gives, for
complete / stream_complete / chat / stream_chat and their async twins, what the Python API gives for
the same settings (greedy, SmolLM2); tool calls through llama-index's function-calling interface
(chat_with_tools, its streamed form, predict_and_call, a tool result answered) are the Python API's
for the same tools (arguments valid under the tool's JSON schema, by jsonschema); any Which works (X-LoRA and speculative on tiny models made
here); a query engine and a chat engine over a two-document in-memory index (llama-index's own
MockEmbedding, no download) answer from both documents; llama-index's OpenAILike against our
server answers as the official openai client does, and calls a tool through llama-index's
function-calling interface (chat_with_tools)."""
from __future__ import annotations

import asyncio
import json

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, VectorStoreIndex  # noqa: E402
from llama_index.core.embeddings import MockEmbedding  # noqa: E402
from llama_index.core.llms import ChatMessage  # noqa: E402
from llama_index.core.tools import FunctionTool  # noqa: E402

from mistralrs_cli.api import ChatCompletionRequest, Runner, Which  # noqa: E402
from mistralrs_cli.integrations.llama_index import MistralRS  # noqa: E402
from test_server import serve  # noqa: E402

N = 24
MSGS = [ChatMessage(role="system", content="Answer in one sentence."),
        ChatMessage(role="user", content="Why is the sky blue?")]
DICTS = [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def runner(smollm2_path):
    return Runner(which=Which.GGUF(None, str(smollm2_path)), token_source="none")


@pytest.fixture(scope="module")
def llm(runner):
    return MistralRS(runner=runner, temperature=0, max_new_tokens=N)


def _api(runner, messages) -> str:
    out = runner.send_chat_completion_request(ChatCompletionRequest(messages=messages, temperature=0, max_tokens=N))
    return out.choices[0].message.content


def test_complete_and_chat_equal_the_python_api(runner, llm):
    want_prompt = _api(runner, [{"role": "user", "content": "Name three colours."}])
    want_chat = _api(runner, DICTS)
    assert want_prompt and want_chat
    assert llm.complete("Name three colours.").text == want_prompt
    streamed = list(llm.stream_complete("Name three colours."))
    assert "".join(r.delta for r in streamed) == streamed[-1].text == want_prompt
    assert llm.chat(MSGS).message.content == want_chat
    chunks = list(llm.stream_chat(MSGS))
    assert "".join(c.delta for c in chunks) == chunks[-1].message.content == want_chat


def test_async_twins_equal_the_python_api(runner, llm):
    want_prompt, want_chat = _api(runner, [{"role": "user", "content": "Name three colours."}]), _api(runner, DICTS)

    async def run():
        a = await llm.acomplete("Name three colours.")
        b = [r.delta async for r in await llm.astream_complete("Name three colours.")]
        c = await llm.achat(MSGS)
        d = [r.delta async for r in await llm.astream_chat(MSGS)]
        return a.text, "".join(b), c.message.content, "".join(d)

    assert asyncio.run(run()) == (want_prompt, want_prompt, want_chat, want_chat)


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


Q = "What is the weather in Paris?"


def test_function_calling_in_process(runner):
    import jsonschema

    from mistralrs_cli.integrations.llama_index_tools import to_messages

    llm = MistralRS(runner=runner, temperature=0, max_new_tokens=64)
    tool = FunctionTool.from_defaults(fn=get_weather)
    spec = tool.metadata.to_openai_tool(skip_length_check=True)
    ref = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": Q}], tools=[spec], tool_choice="required", parallel_tool_calls=False,
        temperature=0, max_tokens=64)).choices[0].message.tool_calls
    want = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in ref]
    assert want[0][0] == "get_weather"
    jsonschema.validate(want[0][1], spec["function"]["parameters"])
    resp = llm.chat_with_tools([tool], user_msg=Q, tool_required=True)
    calls = llm.get_tool_calls_from_response(resp)
    assert [(c.tool_name, c.tool_kwargs) for c in calls] == want
    last = list(llm.stream_chat_with_tools([tool], user_msg=Q, tool_required=True))[-1]
    assert [(c.tool_name, c.tool_kwargs) for c in llm.get_tool_calls_from_response(last)] == want
    assert str(llm.predict_and_call([tool], user_msg=Q, tool_required=True)) == get_weather(**want[0][1])
    # the tool's result goes back; the answer is the Python API's to the same messages
    history = [ChatMessage(role="user", content=Q), resp.message,
               ChatMessage(role="tool", content=get_weather(**want[0][1]), additional_kwargs={"tool_call_id": calls[0].tool_id})]
    assert [m["role"] for m in to_messages(history)] == ["user", "assistant", "tool"]
    answer = llm.chat(history, tools=[spec], tool_choice="none")
    ref2 = runner.send_chat_completion_request(ChatCompletionRequest(messages=to_messages(history), tools=[spec],
                                                                     tool_choice="none", temperature=0, max_tokens=64))
    assert answer.message.content == ref2.choices[0].message.content and answer.message.content
    with pytest.raises(ValueError, match="without one"):
        llm.get_tool_calls_from_response(llm.chat(MSGS))


def test_metadata_and_request_fields(runner, smollm2_path):
    llm = MistralRS(which=Which.GGUF(None, str(smollm2_path)), token_source="none", temperature=0,
                    max_new_tokens=N)  # Runner's arguments as keywords, as the seed's integration took them
    meta = llm.metadata
    assert meta.is_chat_model and meta.is_function_calling_model and meta.context_window == 8192 and meta.num_output == N  # SmolLM2's n_ctx_train
    assert meta.model_name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert MistralRS(runner=runner, context_window=2048).metadata.context_window == 2048
    # per-call fields as ChatCompletionRequest names them
    short = llm.complete("Name three colours.", max_tokens=3)
    assert short.raw["usage"]["completion_tokens"] == 3
    with pytest.raises(ValueError, match=r"messages\[0\]\.role"):
        llm.chat([ChatMessage(role="function", content="x")])


TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import xlora_models as xm

    base = xm.build_base(tmp_path_factory.mktemp("li"))
    folder, _ = xm.make_xlora(base, "li", {})
    return base, folder


def test_any_which_xlora_and_speculative(tiny):
    base, folder = tiny
    kw = {"token_source": "none", "chat_template": TEMPLATE}
    which = Which.XLoraGGUF(None, str(base["gguf"]), xlora_model_id=str(folder))
    xr = Runner(which=which, **kw)
    llm = MistralRS(runner=xr, temperature=0, max_new_tokens=6, generate_kwargs={"ignore_eos": True})
    want = xr.send_chat_completion_request(ChatCompletionRequest(messages=[{"role": "user", "content": "the fox"}],
                                                                 temperature=0, max_tokens=6, ignore_eos=True))
    assert llm.complete("the fox").text == want.choices[0].message.content
    # speculative: the target's greedy text, whatever the draft proposes
    spec = MistralRS(which=Which.GGUF(None, str(base["gguf"])), temperature=0, max_new_tokens=6,
                     generate_kwargs={"ignore_eos": True},
                     runner_kwargs={**kw, "which_draft": Which.Plain(str(base["plain"])), "speculative_gamma": 3})
    plain = MistralRS(which=Which.GGUF(None, str(base["gguf"])), temperature=0, max_new_tokens=6,
                      generate_kwargs={"ignore_eos": True}, runner_kwargs=kw)
    assert spec.complete("the fox").text == plain.complete("the fox").text


DOCS = ["Zorblat is the capital city of the planet Quix.", "The river Ommo flows through the forest of Tandor."]


def test_query_and_chat_engine_over_an_index(runner, llm):
    index = VectorStoreIndex.from_documents([Document(text=t) for t in DOCS], embed_model=MockEmbedding(embed_dim=8))
    sent = []
    real = llm._send  # record what llama-index asks the model, then let it answer

    def send(messages, kwargs):
        sent.append(messages)
        return real(messages, kwargs)

    object.__setattr__(llm, "_send", send)
    try:
        answer = index.as_query_engine(llm=llm, similarity_top_k=2).query("What is the capital of Quix?")
        prompt = " ".join(m["content"] for m in sent[-1])
        assert all(d in prompt for d in DOCS) and len(answer.source_nodes) == 2
        assert str(answer) == _api(runner, sent[-1]) and str(answer).strip()
        reply = index.as_chat_engine(chat_mode="context", llm=llm, similarity_top_k=2).chat("Where does Ommo flow?")
        prompt = " ".join(m["content"] for m in sent[-1])
        assert all(d in prompt for d in DOCS) and "Where does Ommo flow?" in prompt
        assert str(reply) == _api(runner, sent[-1]) and str(reply).strip()
    finally:
        object.__delattr__(llm, "_send")


@pytest.fixture(scope="module")
def server(runner):
    with serve(runner.loaded) as s:
        yield s


def _openai_like(server, max_tokens=N, **kw):
    from llama_index.llms.openai_like import OpenAILike

    return OpenAILike(model="SmolLM2", api_base=server.url + "/v1", api_key="none", temperature=0,
                      max_tokens=max_tokens, context_window=8192, **kw)


def test_openai_like_against_the_server(server):
    chat = _openai_like(server, is_chat_model=True)
    ref = server.client.chat.completions.create(model="x", messages=DICTS, temperature=0, max_tokens=N)
    assert chat.chat(MSGS).message.content == ref.choices[0].message.content
    assert "".join(c.delta for c in chat.stream_chat(MSGS)) == ref.choices[0].message.content
    text = _openai_like(server, is_chat_model=False)
    ref = server.client.completions.create(model="x", prompt="The sky is blue because", temperature=0, max_tokens=N)
    assert text.complete("The sky is blue because").text == ref.choices[0].text


def test_openai_like_calls_a_tool(server):
    def get_weather(city: str) -> str:
        """The weather in a city."""
        return f"sunny in {city}"

    tool = FunctionTool.from_defaults(fn=get_weather)
    llm = _openai_like(server, max_tokens=64, is_chat_model=True, is_function_calling_model=True)
    resp = llm.chat_with_tools([tool], user_msg="What is the weather in Paris?", tool_required=True)
    calls = llm.get_tool_calls_from_response(resp, error_on_no_tool_call=True)
    assert [c.tool_name for c in calls] == ["get_weather"]
    assert isinstance(calls[0].tool_kwargs.get("city"), str)
    assert tool(**calls[0].tool_kwargs).content == f"sunny in {calls[0].tool_kwargs['city']}"
    json.dumps(calls[0].tool_kwargs)  # arguments arrived as JSON

