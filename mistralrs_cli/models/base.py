"""The decoder-only skeleton every text architecture shares: embed -> blocks -> norm -> lm_head.

An architecture file supplies its decoder layer class and a few knobs; HF module names
(`model.embed_tokens`, `model.layers.N...`, `model.norm`, `lm_head`) are kept so weights load by name.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig
from .layers import Batch, RMSNorm, softcap


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_cls: type[nn.Module], norm_offset: float = 0.0):
        super().__init__()
        # an explicit weight skips Embedding's random init, which on the meta device imports
        # torch's decomposition machinery (~70 MB of modules)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(layer_cls(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, norm_offset)


class CausalLM(nn.Module):
    """Subclasses set `layer_cls`, and may set `norm_offset` and `embed_multiplier`."""

    layer_cls: type[nn.Module]
    norm_offset = 0.0
    dtype = torch.float32  # activations; set by the loader for --dtype
    unsupported_dtypes: dict[str, str] = {}  # --dtype value -> why not
    kv_dtype = torch.float32  # KV cache storage (llama.cpp keeps f16)
    native = None  # a fused CPU executor of this model (backends/native_decoder.py), set by the loader

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, self.layer_cls, self.norm_offset)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed_multiplier(self) -> float | None:
        return None

    @property
    def cache_dtype(self) -> torch.dtype:
        """What the KV cache stores: the activation dtype (values rounded as kv_round_to says)."""
        return self.dtype

    @property
    def kv_round_to(self) -> torch.dtype | None:
        """The dtype cached keys/values are rounded through (kept in the compute dtype)."""
        return self.kv_dtype if self.kv_dtype != self.dtype and self.dtype == torch.float32 else None

    def step(self, ids: list[int], positions: list[int], seqs: list, rows: list[int], hidden: bool = False,
             adapter_weights=None, input_embeds=None):
        """The engine's call: one flattened batch -> logits of `rows` as a float32 numpy array.
        hidden=True (X-LoRA's scaling pass): the final hidden states of every row instead, after
        the final norm (transformers' hidden_states[-1], what peft's XLoraClassifier reads).
        adapter_weights: the LoRA weights of each row (adapters/bank.py), or None.
        input_embeds: (rows, vectors) given in place of those rows' token embeddings (vision), or None."""
        with torch.inference_mode():
            batch = Batch(torch.tensor(positions), seqs, None if hidden else torch.tensor(rows, dtype=torch.long),
                          adapter_weights=adapter_weights)
            if input_embeds is not None:  # (rows, vectors[, bidirectional spans by sequence])
                batch.input_embeds = (torch.as_tensor(input_embeds[0]), input_embeds[1])
                batch.image_blocks = input_embeds[2] if len(input_embeds) > 2 else None
            if hidden:
                batch.memo["hidden"] = True
            logits = self(torch.tensor(ids), batch)
        return logits.float().cpu().numpy()

    def forward(self, input_ids: torch.Tensor, batch: Batch) -> torch.Tensor:
        """input_ids (T,) -> logits (len(batch.logits_rows) or T, vocab) in float32."""
        lora = getattr(self, "lora_ctx", None)  # adapters/torch_lora.py, when adapters are served unmerged
        if lora is not None:
            lora.begin(batch.adapter_weights)
        # the fused native layers know no adapters: a batch with adapter rows takes the modules
        if self.native is not None and batch.adapter_weights is None and self.native.handles(batch):
            return self.native(input_ids, batch)
        h = self.model.embed_tokens(input_ids).to(self.dtype)  # (T, hidden)
        mult = self.embed_multiplier()
        if mult is not None:
            h = h * torch.tensor(mult, dtype=h.dtype)
        if batch.input_embeds is not None:  # image features are not scaled (as transformers)
            rows, vectors = batch.input_embeds
            h[rows] = vectors.to(h.dtype)
        for layer in self.model.layers:
            h = layer(h, batch)
        if batch.logits_rows is not None:
            h = h[batch.logits_rows]
        if batch.memo.get("hidden"):
            return self.model.norm(h).float()
        logits = self.lm_head(self.model.norm(h)).float()
        return softcap(logits, self.config.final_logit_softcapping)
