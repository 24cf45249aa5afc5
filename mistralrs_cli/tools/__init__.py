"""OpenAI tool calling: the request fields (spec.py), tool messages through the chat template
(messages.py), the model's call formats (formats.py) or the generic JSON fallback for templates
without tools (fallback.py), grammars that keep calls valid (grammars.py), and the output split
into reply text and tool calls, streamed or not (stream.py). plan.prepare decides all of it for
one request; the server and the Python API both call it."""
