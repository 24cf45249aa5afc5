"""Shared by the logit-parity tests: transformers' prefill + greedy steps with its own KV cache,
and ours teacher-forced on the same tokens (prefill, then one cached step per token)."""
from __future__ import annotations

import torch

from mistralrs_cli.engine.kv_cache import SeqKVCache
from mistralrs_cli.models.layers import Batch, SeqSlice


def hf_steps(hf: torch.nn.Module, ids: list[int], steps: int) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """Prefill logits, then `steps` greedy steps: (logits per step, greedy ids, top-2 margins)."""
    logits, greedy, margins = [], [], []
    with torch.no_grad():
        out = hf(torch.tensor([ids]), use_cache=True)
        logits.append(out.logits[0])
        last = out.logits[0, -1]
        for _ in range(steps):
            top = last.topk(2).values
            greedy.append(int(last.argmax()))
            margins.append(float(top[0] - top[1]))
            out = hf(torch.tensor([[greedy[-1]]]), past_key_values=out.past_key_values, use_cache=True)
            last = out.logits[0, -1]
            logits.append(last)
    return logits, greedy, margins


def our_steps(model: torch.nn.Module, cfg, ids: list[int], greedy: list[int]) -> list[torch.Tensor]:
    """Our prefill logits, then one cached decode step per token of `greedy`."""
    cache = SeqKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    n = len(ids)
    with torch.inference_mode():
        out = [model(torch.tensor(ids), Batch(torch.arange(n), [SeqSlice(0, n, cache)]))]
        for i, tok in enumerate(greedy):
            out.append(model(torch.tensor([tok]), Batch(torch.tensor([n + i]), [SeqSlice(0, 1, cache)]))[0])
    return out


def mixtral_routes(model: torch.nn.Module, hf: torch.nn.Module, ids: list[int], k: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer: (experts our router picks, experts transformers' router picks), each (T, k) sorted."""
    ours, theirs = [], []
    hooks = [layer.block_sparse_moe.gate.register_forward_hook(lambda m, i, o: ours.append(o))
             for layer in model.model.layers]
    hooks += [layer.mlp.gate.register_forward_hook(lambda m, i, o: theirs.append(o[2]))
              for layer in hf.model.layers]
    try:
        n = len(ids)
        with torch.inference_mode():
            model(torch.tensor(ids), Batch(torch.arange(n), [SeqSlice(0, n, None)]))
            hf(torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    assert len(ours) == len(theirs)
    return [(o.float().topk(k, dim=-1).indices.sort(-1).values, t.sort(-1).values) for o, t in zip(ours, theirs)]
