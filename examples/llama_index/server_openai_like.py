"""LlamaIndex against a running mistralrs server through OpenAILike (the [llama-index] extra):

    mistralrs --port 1234 gguf -f SmolLM2-135M-Instruct.Q4_1.gguf
    python examples/llama_index/server_openai_like.py
"""
from llama_index.core.llms import ChatMessage
from llama_index.core.tools import FunctionTool
from llama_index.llms.openai_like import OpenAILike

llm = OpenAILike(model="default", api_base="http://127.0.0.1:1234/v1", api_key="none",
                 is_chat_model=True, is_function_calling_model=True, context_window=8192, max_tokens=128)

print(llm.chat([ChatMessage(role="user", content="Why is the sky blue?")]).message.content)


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


tool = FunctionTool.from_defaults(fn=get_weather)
response = llm.chat_with_tools([tool], user_msg="What is the weather in Paris?", tool_required=True)
for call in llm.get_tool_calls_from_response(response):
    print(call.tool_name, call.tool_kwargs, "->", tool(**call.tool_kwargs).content)
