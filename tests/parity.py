"""Shared by the logit-parity tests: transformers' prefill + greedy steps with its own KV cache,
and ours teacher-forced on the same tokens (prefill, then one cached step per token)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

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


def check_cli_and_api_text(dirs: dict, prompt: str, steps: int, min_margin: float = 1e-3) -> None:
    """`mistralrs --raw --prompt PROMPT plain -m DIR` and Runner(Which.Plain(DIR)) both produce
    transformers' greedy continuation (decoded by our tokenizer) for every name -> (DIR, model);
    transformers' top-2 gap must exceed min_margin at each step (no near-ties to argue about).
    The CLIs run in parallel; set MISTRALRS_CLI_CACHE / HF_HUB_OFFLINE before calling."""
    from mistralrs_cli import CompletionRequest, Runner, Which
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import LoadOptions, PlainSpec

    exe = Path(sys.executable).with_name("mistralrs")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1"}
    procs = {name: subprocess.Popen([str(exe), "--raw", "--temperature", "0", "--max-tokens", str(steps), "--prompt", prompt, "plain",
                                     "-m", str(path)], env=env, text=True, encoding="utf-8",
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for name, (path, _) in dirs.items()}
    for name, proc in procs.items():
        path, hf = dirs[name]
        tok = load(PlainSpec(str(path)), LoadOptions(token_source="none")).tokenizer
        ids = tok.encode(prompt)
        _, greedy, margins = hf_steps(hf, ids, steps)
        assert min(margins) > min_margin and not set(greedy) & set(tok.eos_ids), (name, greedy, margins)
        want = tok.decode(greedy)
        runner = Runner(which=Which.Plain(str(path)), token_source="none")
        res = runner.send_completion_request(CompletionRequest(prompt=prompt, max_tokens=steps, temperature=0.0))
        assert res.choices[0].text == want, (name, res.choices[0].text, want)
        assert res.usage.prompt_tokens == len(ids) and res.usage.completion_tokens == steps
        stdout, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 0 and "Traceback" not in stderr, (name, stderr)
        assert stdout[:-1] == want, (name, stdout, want)


def check_gguf_f32(hf: torch.nn.Module, path, arch: str, model_type: str, ids: list[int], steps: int,
                   tol: float) -> None:
    """An F32 GGUF written from `hf` loads as `arch` -> `model_type`, and its logits (prefill, then
    greedy cached steps) equal transformers' within tol; the continuation is not one token."""
    from mistralrs_cli.loaders.gguf import load_gguf_model
    from mistralrs_cli.loaders.gguf_file import GGUFFile

    gf = GGUFFile(path)
    assert gf.architecture == arch
    model, cfg = load_gguf_model(gf, numerics="exact")
    assert cfg.model_type == model_type
    want, greedy, _ = hf_steps(hf, ids, steps)
    got = our_steps(model, cfg, ids, greedy)
    diffs = [float((g - w).abs().max()) for g, w in zip(got, want)]
    print(f"{model_type} f32 max |logit diff| prefill {diffs[0]:.2e}, decode {max(diffs[1:]):.2e}")
    assert max(diffs) < tol, diffs
    assert len(set(greedy)) > 1
