"""The seed's LlamaIndex example on mistralrs-cli: an X-LoRA GGUF model answering questions over a
folder of documents. Needs the [llama-index] extra and, for the embeddings, a local embedding model
(pip install llama-index-embeddings-huggingface; or Settings.embed_model = MockEmbedding(embed_dim=8)
to try it without one), then run it from the repository root: python examples/llama_index/xlora_gguf.py
"""
from llama_index.core import Settings, SimpleDirectoryReader, VectorStoreIndex
from llama_index.core.embeddings import resolve_embed_model

from mistralrs_cli import Which
from mistralrs_cli.integrations.llama_index import MistralRS

documents = SimpleDirectoryReader("data").load_data()

# bge embedding model
Settings.embed_model = resolve_embed_model("local:BAAI/bge-small-en-v1.5")

Settings.llm = MistralRS(
    which=Which.XLoraGGUF(
        tok_model_id=None,  # the GGUF's own tokenizer
        quantized_model_id="TheBloke/zephyr-7B-beta-GGUF",
        quantized_filename="zephyr-7b-beta.Q4_0.gguf",
        xlora_model_id="lamm-mit/x-lora",
        order="orderings/xlora-paper-ordering.json",
        tgt_non_granular_index=None,
    ),
    max_new_tokens=4096,
    context_window=1024 * 5,
)

index = VectorStoreIndex.from_documents(documents)

query_engine = index.as_query_engine()
response = query_engine.query("How do I pronounce graphene?")
print(response)
