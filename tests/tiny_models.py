"""Seeded tiny transformers models and a tiny byte-level BPE tokenizer, built inside the tests.

`train_tokenizer` makes a deterministic 512-token vocab; `tiny_llama`, `tiny_gemma3`,
`tiny_mistral`, `tiny_mixtral`, `tiny_qwen2`, `tiny_qwen3`, `tiny_gemma`, `tiny_gemma2`,
`tiny_starcoder2`, `tiny_phi2`, `tiny_phi3` build random models (hidden 64, 2 layers unless a
test asks otherwise). gguf_builder.py writes them as GGUF; the plain tests save them as is.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

VOCAB = 512
BOS, EOS = "<s>", "</s>"

# A fixed training text: the vocab (and so every token id) is a pure function of it.
_WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex jolly "
          "boxing frogs; rain falls in spain mainly on plains, and 12 or 345 numbers count too! "
          "Models read tokens, tokens become vectors, vectors become logits. Why? Because "
          "attention heads look back at keys and values cached from every earlier position.")


def training_corpus() -> list[str]:
    """The sentence above plus made-up words from syllables: enough distinct pairs for 254 merges."""
    rng = np.random.default_rng(1234)
    words = _WORDS.split()
    syllables = [c + v for c in "bdfghklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    lines = [_WORDS]
    for _ in range(600):
        made = ["".join(rng.choice(syllables, size=int(rng.integers(1, 4)))) for _ in range(3)]
        lines.append(" ".join([*rng.choice(words, size=int(rng.integers(3, 10))), *made]))
    return lines


def train_tokenizer(vocab_size: int = VOCAB) -> HFTokenizer:
    """A GPT-2-style byte-level BPE: specials at ids 0 and 1, then the 256 bytes, then merges."""
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(training_corpus(), trainer)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"the corpus gave {tok.get_vocab_size()} tokens, not {vocab_size}")
    return tok


# ---- tiny transformers models ----
def randomize_(model: torch.nn.Module, seed: int, std: float, norm_center: float,
               embed_std: float = 1.0) -> None:
    """Seeded weights with a spread that gives clear greedy margins; norms near `norm_center`
    (1 for llama's w, 0 for Gemma's (1 + w)) but not equal to it, so their conversion is tested."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("norm.weight"):
                p.copy_(norm_center + 0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                p.copy_(embed_std * noise)
            else:
                p.copy_(std * noise)


def tiny_llama(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
               rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=1)
    model = LlamaForCausalLM(LlamaConfig(**{**cfg, **overrides}))
    randomize_(model, seed, std=0.15, norm_center=1.0)
    return model.eval()


def tiny_gemma3(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """7 layers: five sliding, one global (Gemma 3's 5:1), one sliding; a window of 8 tokens so
    a short prompt already slides. query_pre_attn_scalar = head_dim, as llama.cpp assumes."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=32, vocab_size=VOCAB,
               max_position_embeddings=512, sliding_window=8, rms_norm_eps=1e-6,
               bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = Gemma3ForCausalLM(Gemma3TextConfig(**{**cfg, **overrides}))
    # Gemma scales embeddings by sqrt(hidden) and ties lm_head: a unit spread would let one
    # token win every step
    randomize_(model, seed, std=0.15, norm_center=0.0, embed_std=0.15)
    return model.eval()


def _tiny(config_cls: Any, model_cls: Any, seed: int, overrides: dict[str, Any], **extra: Any) -> torch.nn.Module:
    """A llama-shaped tiny model of another architecture (the same sizes as tiny_llama)."""
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512,
               rms_norm_eps=1e-5, rope_theta=50000.0, tie_word_embeddings=False,
               bos_token_id=0, eos_token_id=1, **extra)
    model = model_cls(config_cls(**{**cfg, **overrides}))
    randomize_(model, seed, std=0.15, norm_center=1.0)
    return model.eval()


def tiny_mistral(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A window of 8 tokens, so a 12-token prompt already slides."""
    from transformers import MistralConfig, MistralForCausalLM

    return _tiny(MistralConfig, MistralForCausalLM, seed, overrides, sliding_window=8)


def tiny_mixtral(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """4 experts, each token routed to 2."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return _tiny(MixtralConfig, MixtralForCausalLM, seed, overrides, num_local_experts=4,
                 num_experts_per_tok=2)


def tiny_qwen2(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _tiny(Qwen2Config, Qwen2ForCausalLM, seed, overrides)


def tiny_qwen3(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """head_dim 32 (not hidden / heads = 16), as real Qwen3 checkpoints decouple them."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    return _tiny(Qwen3Config, Qwen3ForCausalLM, seed, overrides, head_dim=32)


def _tiny_gemma(config_cls: Any, model_cls: Any, seed: int, overrides: dict[str, Any],
                **extra: Any) -> torch.nn.Module:
    """Gemma sizes: head_dim 32 (not hidden / heads), query_pre_attn_scalar = head_dim as
    llama.cpp assumes, small embeddings (scaled by sqrt(hidden), tied to lm_head)."""
    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, vocab_size=VOCAB, max_position_embeddings=512,
               rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=1, **extra)
    model = model_cls(config_cls(**{**cfg, **overrides}))
    randomize_(model, seed, std=0.15, norm_center=0.0, embed_std=0.15)
    return model.eval()


def tiny_gemma(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    from transformers import GemmaConfig, GemmaForCausalLM

    return _tiny_gemma(GemmaConfig, GemmaForCausalLM, seed, overrides)


def tiny_gemma2(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """4 layers alternating sliding (window 8) and global; soft caps small enough to bend the
    logits (attention scores reach a few units with these weights)."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return _tiny_gemma(Gemma2Config, Gemma2ForCausalLM, seed, {"num_hidden_layers": 4, **overrides},
                       query_pre_attn_scalar=32, sliding_window=8, attn_logit_softcapping=1.5,
                       final_logit_softcapping=4.0, attn_implementation="eager")


def tiny_starcoder2(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """Biased LayerNorms and linears, a non-gated MLP, a window of 8 tokens, tied lm_head."""
    from transformers import Starcoder2Config, Starcoder2ForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, norm_epsilon=1e-5,
               rope_theta=50000.0, sliding_window=8, use_bias=True, tie_word_embeddings=True,
               bos_token_id=0, eos_token_id=1)
    model = Starcoder2ForCausalLM(Starcoder2Config(**{**cfg, **overrides}))
    randomize_(model, seed, std=0.15, norm_center=1.0)
    return model.eval()


# ---- phi2 and phi3 ----
def tiny_phi2(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """PhiForCausalLM: parallel attention and MLP under one LayerNorm, half the head rotated."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=512, layer_norm_eps=1e-5,
               partial_rotary_factor=0.5, rope_theta=10000.0, bos_token_id=0, eos_token_id=1)
    model = PhiForCausalLM(PhiConfig(**{**cfg, **overrides}))
    randomize_(model, seed, std=0.15, norm_center=1.0)
    with torch.no_grad():  # randomize_ centres only weights of *norm; give phi's LayerNorms theirs
        for name, p in model.named_parameters():
            if "layernorm.weight" in name:
                p.add_(1.0)
    return model.eval()


def tiny_phi3(seed: int = 0, longrope: bool = False, **overrides: Any) -> torch.nn.Module:
    """Phi3ForCausalLM (fused qkv_proj and gate_up_proj). longrope: an original context of 16
    tokens under a 512-token one, so decoding past position 16 switches to the long factors."""
    from transformers import Phi3Config, Phi3ForCausalLM

    extra: dict[str, Any] = dict(sliding_window=None, pad_token_id=1)
    if longrope:
        half = 64 // 4 // 2
        gen = torch.Generator().manual_seed(seed + 100)
        extra["original_max_position_embeddings"] = 16
        extra["rope_scaling"] = {"type": "longrope",
                                 "short_factor": (1.0 + torch.rand(half, generator=gen)).tolist(),
                                 "long_factor": (1.0 + 8 * torch.rand(half, generator=gen)).tolist()}
    return _tiny(Phi3Config, Phi3ForCausalLM, seed, overrides, **extra)
