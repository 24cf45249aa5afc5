"""LlamaIndex's LLM interface over our engine, in process (the seed's integration, on our API):

    from mistralrs_cli import Which
    from mistralrs_cli.integrations.llama_index import MistralRS
    llm = MistralRS(which=Which.GGUF(quantized_model_id=None, quantized_filename="model.gguf"))
    print(llm.complete("Hello"))

Any Which works (plain, GGUF, GGML, LoRA, X-LoRA, vision; speculative through which_draft=, as
the Runner takes it). Tools: it is a FunctionCallingLLM (chat_with_tools, predict_and_call, agents)
over the Python API's tool calling (llama_index_tools.py converts the messages). Requests go through the Python API's Runner (the same chat template,
sampling defaults and validation), one at a time per MistralRS object: a lock serializes them,
and the async methods run them on a worker thread so the event loop is not blocked. For many
concurrent callers, run the server and point llama-index's OpenAILike at it (README).

complete() sends the prompt as one user message, as the seed's integration did (a chat model
answers it through its template). Sampling fields left None take the model's defaults
(generation_config.json, else the Python API's), as a ChatCompletionRequest does.
"""
from __future__ import annotations

import asyncio
import threading
from dataclasses import asdict, fields
from typing import Any, Iterator, Optional, Sequence

from llama_index.core.base.llms.types import (ChatMessage, ChatResponse, ChatResponseAsyncGen, ChatResponseGen,
                                              CompletionResponse, CompletionResponseAsyncGen,
                                              CompletionResponseGen, LLMMetadata, MessageRole)
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_NUM_OUTPUTS
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.custom import CustomLLM
from llama_index.core.llms.function_calling import FunctionCallingLLM

from ..api import ChatCompletionRequest, Runner
from . import llama_index_tools as li_tools

# the ChatCompletionRequest fields a call's **kwargs may set (max_tokens, stop, seed, adapters...)
_REQUEST_FIELDS = {f.name for f in fields(ChatCompletionRequest)} - {"messages", "stream", "n", "model"}
_END = object()
# Runner arguments the seed's integration took directly (MistralRS(which=..., token_source=...))
_RUNNER_ARGS = {"token_source", "chat_template", "in_situ_quant", "isq", "max_seqs", "no_kv_cache", "prefix_cache_n",
                "numerics", "truncate_sequence", "which_draft", "speculative_gamma", "speculative_ngram"}


class MistralRS(FunctionCallingLLM, CustomLLM):
    """A llama-index LLM running mistralrs-cli's engine in this process; tools through llama-index's
    function-calling interface (chat_with_tools, predict_and_call, agents)."""

    temperature: Optional[float] = Field(default=None, description="0 is greedy; None: the model's default.")
    max_new_tokens: int = Field(default=DEFAULT_NUM_OUTPUTS, gt=0, description="New tokens per answer at most.")
    context_window: int = Field(default=0, ge=0, description="The prompt budget llama-index plans with; "
                                                             "0: the model's context length.")
    top_k: Optional[int] = Field(default=None)
    top_p: Optional[float] = Field(default=None)
    min_p: Optional[float] = Field(default=None)
    repetition_penalty: Optional[float] = Field(default=None)
    frequency_penalty: Optional[float] = Field(default=None)
    presence_penalty: Optional[float] = Field(default=None)
    seed: Optional[int] = Field(default=None)
    generate_kwargs: dict[str, Any] = Field(default_factory=dict, description="More ChatCompletionRequest "
                                            "fields for every request (stop, adapters, logit_bias...).")
    model_name: str = Field(default="", description="The loaded model's id.")
    _runner: Any = PrivateAttr()
    _lock: Any = PrivateAttr()

    def __init__(self, which: Any = None, runner: Runner | None = None, runner_kwargs: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        """which: a Which.* model source (loaded here, with runner_kwargs passed to Runner: token_source,
        chat_template, isq, which_draft, speculative_gamma, max_seqs...; those names are also taken as
        keyword arguments, as the seed's integration took them); or runner: a Runner built already."""
        if (which is None) == (runner is None):
            raise ValueError("MistralRS needs which=Which.GGUF(...) (or another Which), or runner=Runner(...).")
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in _RUNNER_ARGS}
        runner = runner or Runner(which=which, **given, **(runner_kwargs or {}))
        kwargs.setdefault("model_name", runner.loaded.model_id)
        super().__init__(**kwargs)
        self._runner, self._lock = runner, threading.Lock()

    @classmethod
    def class_name(cls) -> str:
        return "MistralRS"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(context_window=self.context_window or self._runner.loaded.max_context,
                           num_output=self.max_new_tokens, is_chat_model=True, is_function_calling_model=True,
                           model_name=self.model_name)

    # ---- requests ----
    def _request(self, messages: list[dict[str, str]], stream: bool, kwargs: dict[str, Any]) -> ChatCompletionRequest:
        given = {k: getattr(self, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                               "frequency_penalty", "presence_penalty", "seed")}
        given["max_tokens"] = self.max_new_tokens
        given.update(self.generate_kwargs)
        given.update({k: v for k, v in kwargs.items() if k in _REQUEST_FIELDS})
        return ChatCompletionRequest(messages=messages, stream=stream, **given)

    def _send(self, messages: list[dict[str, str]], kwargs: dict[str, Any]):
        with self._lock:
            return self._runner.send_chat_completion_request(self._request(messages, False, kwargs))

    def _deltas(self, messages: list[dict[str, str]], kwargs: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """(text delta, chunk) per streamed chunk; the lock is held until the stream ends or is closed."""
        with self._lock:
            chunks = self._runner.send_chat_completion_request(self._request(messages, True, kwargs))
            try:
                for chunk in chunks:
                    yield chunk.choices[0].delta.content or "", chunk
            finally:
                chunks.close()  # an abandoned stream aborts its request

    def _prompt_messages(self, prompt: str, formatted: bool) -> list[dict[str, str]]:
        return [{"role": "user", "content": prompt if formatted else self.completion_to_prompt(prompt)}]

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        resp = self._send(self._prompt_messages(prompt, formatted), kwargs)
        return CompletionResponse(text=resp.choices[0].message.content, raw=asdict(resp))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        deltas = self._deltas(self._prompt_messages(prompt, formatted), kwargs)

        def gen() -> CompletionResponseGen:
            text = ""
            for delta, chunk in deltas:
                text += delta
                yield CompletionResponse(text=text, delta=delta, raw=asdict(chunk))

        return gen()

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        resp = self._send(li_tools.to_messages(messages), kwargs)
        msg = resp.choices[0].message
        return ChatResponse(message=li_tools.assistant(msg.content or "", msg.tool_calls), raw=asdict(resp))

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        deltas = self._deltas(li_tools.to_messages(messages), kwargs)

        def gen() -> ChatResponseGen:
            text, calls = "", li_tools.CallDeltas()
            for delta, chunk in deltas:
                text += delta
                calls.add(chunk.choices[0].delta.tool_calls)
                yield ChatResponse(message=li_tools.assistant(text, calls.calls()), delta=delta, raw=asdict(chunk))

        return gen()

    # ---- llama-index's function-calling interface ----
    def _prepare_chat_with_tools(self, tools: Sequence[Any], user_msg: Any = None,
                                 chat_history: Optional[list[ChatMessage]] = None, verbose: bool = False,
                                 allow_parallel_tool_calls: bool = False, tool_required: bool = False,
                                 tool_choice: Any = None, **kwargs: Any) -> dict[str, Any]:
        return li_tools.chat_kwargs(tools, user_msg, chat_history, allow_parallel_tool_calls,
                                             tool_required, tool_choice, kwargs)

    def get_tool_calls_from_response(self, response: ChatResponse, error_on_no_tool_call: bool = True,
                                     **kwargs: Any) -> list[Any]:
        return li_tools.selections(response, error_on_no_tool_call)

    # ---- async twins: the same calls on a worker thread ----
    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return await asyncio.to_thread(self.complete, prompt, formatted, **kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self.chat, messages, **kwargs)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False,
                               **kwargs: Any) -> CompletionResponseAsyncGen:
        return _async_iter(self.stream_complete(prompt, formatted, **kwargs))

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _async_iter(self.stream_chat(messages, **kwargs))


async def _async_iter(gen: Iterator[Any]):
    """A blocking generator as an async one: each step runs on a worker thread."""
    try:
        while (item := await asyncio.to_thread(next, gen, _END)) is not _END:
            yield item
    finally:
        gen.close()
