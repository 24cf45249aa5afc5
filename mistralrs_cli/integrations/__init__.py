"""Adapters to the frameworks users already run: llama_index.MistralRS (pip install
'mistralrs-cli[llama-index]'). Each module imports its framework itself, so importing this
package needs none of them."""
