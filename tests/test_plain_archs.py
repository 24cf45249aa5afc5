"""`plain` with Mistral, Mixtral, Qwen2 and Qwen3: tiny random transformers models saved with
save_pretrained, rewritten in the hub spelling (rope_theta / torch_dtype, no layer_types), and for
Mixtral also written in transformers 5's in-memory layout (experts stacked, gate and up fused,
router at mlp.gate). Our logits (12-token prefill, 8 cached decode steps) equal transformers'
within 1e-4, sliding windows follow the config (Mistral's null window, Qwen's use_sliding_window
and max_window_layers), tied embeddings serve as lm_head unless the file has its own (as in
transformers 5), and Mixtral's router picks
transformers' experts for every prompt token."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import gguf_builder as gb
import parity
from mistralrs_cli.loaders.plain import load_plain_model
from mistralrs_cli.types import LoadOptions, PlainSpec

PROMPT = [0, 17, 301, 44, 260, 9, 388, 123, 77, 500, 256, 31]  # BOS + 11 tokens
STEPS = 8
F32_TOL = 1e-4


def _hub_config(path: Path, **changes) -> None:
    """config.json as hub checkpoints spell it: top-level rope_theta, torch_dtype, no
    layer_types (derived from the window fields); `changes` set (None deletes) fields."""
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_theta"] = cfg.pop("rope_parameters")["rope_theta"]
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg.pop("layer_types", None)
    for k, v in changes.items():
        cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _in_memory_layout(hf: torch.nn.Module, path: Path) -> None:
    """The checkpoint as transformers 5 holds it in memory (its state_dict written as is)."""
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})


def _edit_tensors(path: Path, fn) -> None:
    tensors = load_file(path / "model.safetensors")
    fn(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _variant(root: Path, name: str, hf: torch.nn.Module, hub: dict | None = None, edit=None) -> Path:
    path = root / name
    hf.save_pretrained(path)
    if hub is not None:
        _hub_config(path, **hub)
    if edit is not None:
        edit(path)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """name -> (checkpoint dir, the transformers model it must equal)."""
    root = tmp_path_factory.mktemp("plain_archs")
    mistral, mixtral = gb.tiny_mistral(1), gb.tiny_mixtral(2)
    mistral_full = gb.tiny_mistral(1, sliding_window=None)  # same weights, no window
    qwen2, qwen3 = gb.tiny_qwen2(3), gb.tiny_qwen3(4)
    # a window of 8 in layers from 1 on: a 12-token prompt slides in layer 1 only
    qwen2_win = gb.tiny_qwen2(3, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    qwen3_tied = gb.tiny_qwen3(6, tie_word_embeddings=True)
    assert qwen2_win.config.layer_types == ["full_attention", "sliding_attention"]
    v = lambda name, hf, **kw: (_variant(root, name, hf, **kw), hf)  # noqa: E731
    out = {
        "mistral": v("mistral", mistral),
        "mistral-hub": v("mistral-hub", mistral, hub={}),
        "mistral-null-window": v("mistral-null-window", mistral_full, hub={"sliding_window": None}),
        "mixtral": v("mixtral", mixtral),
        "mixtral-hub": v("mixtral-hub", mixtral, hub={"sliding_window": None}),
        "mixtral-stacked": v("mixtral-stacked", mixtral, edit=lambda p: _in_memory_layout(mixtral, p)),
        "qwen2": v("qwen2", qwen2),
        # hub Qwen2 configs carry a window they do not use (use_sliding_window false)
        "qwen2-hub": v("qwen2-hub", qwen2, hub={"sliding_window": 4, "max_window_layers": 0}),
        "qwen2-window": v("qwen2-window", qwen2_win),
        "qwen2-window-hub": v("qwen2-window-hub", qwen2_win, hub={}),
        "qwen3": v("qwen3", qwen3),
        "qwen3-hub": v("qwen3-hub", qwen3, hub={"sliding_window": 4, "max_window_layers": 0}),
        "qwen3-tied": v("qwen3-tied", qwen3_tied),
    }
    # tied in the config, yet a different lm_head in the file: transformers 5 uses the file's
    # (and declines to tie), so the reference is what from_pretrained makes of the directory
    gen = torch.Generator().manual_seed(7)
    head = 0.15 * torch.randn(gb.VOCAB, 64, generator=gen)
    path = _variant(root, "qwen3-tied-file-head", qwen3_tied, hub={},
                    edit=lambda p: _edit_tensors(p, lambda t: t.update({"lm_head.weight": head})))
    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert torch.equal(reloaded.lm_head.weight, head)
    return {**out, "qwen3-tied-file-head": (path, reloaded)}


def _load(path: Path):
    return load_plain_model(PlainSpec(str(path)), LoadOptions(token_source="none"), path)


def _reference(hf: torch.nn.Module) -> tuple[list[torch.Tensor], list[int]]:
    logits, greedy, _ = parity.hf_steps(hf, PROMPT, STEPS)
    return logits, greedy


def _ours(model: torch.nn.Module, cfg, greedy: list[int]) -> list[torch.Tensor]:
    return parity.our_steps(model, cfg, PROMPT, greedy)


@pytest.fixture(scope="module")
def refs(built):
    return {id(hf): _reference(hf) for _, hf in built.values()}


NAMES = ["mistral", "mistral-hub", "mistral-null-window", "mixtral", "mixtral-hub", "mixtral-stacked",
         "qwen2", "qwen2-hub", "qwen2-window", "qwen2-window-hub", "qwen3", "qwen3-hub", "qwen3-tied",
         "qwen3-tied-file-head"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name, built, refs):
    path, hf = built[name]
    model, cfg = _load(path)
    assert cfg.model_type == name.split("-")[0]
    want, greedy = refs[id(hf)]
    got = _ours(model, cfg, greedy)
    diffs = [float((g - w).abs().max()) for g, w in zip(got, want)]
    print(f"{name} max |logit diff| prefill {diffs[0]:.2e}, decode {max(diffs[1:]):.2e}")
    assert max(diffs) < F32_TOL, diffs
    assert len(set(greedy)) > 1  # a non-degenerate continuation


def test_checkpoints_are_what_they_claim(built):
    names = lambda n: set(load_file(built[n][0] / "model.safetensors"))  # noqa: E731
    hub = names("mixtral")  # save_pretrained writes Mixtral's experts one by one, hub-named
    assert "model.layers.1.block_sparse_moe.experts.3.w3.weight" in hub
    assert not any(".mlp." in n for n in hub)
    stacked = names("mixtral-stacked")
    assert {"model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj",
            "model.layers.1.mlp.gate.weight"} <= stacked
    assert not any("block_sparse_moe" in n for n in stacked)
    for name in ("mistral-hub", "mixtral-hub", "qwen2-hub", "qwen2-window-hub", "qwen3-hub"):
        cfg = json.loads((built[name][0] / "config.json").read_text())
        assert "rope_theta" in cfg and "torch_dtype" in cfg and "rope_parameters" not in cfg
        assert "layer_types" not in cfg
    assert "lm_head.weight" not in names("qwen3-tied") and "lm_head.weight" in names("qwen3-tied-file-head")


def test_windows_follow_the_config(built, refs):
    """Mistral's window of 8 is read (and a null one means none); Qwen slides only when
    use_sliding_window is set, from max_window_layers on; each window changes the logits."""
    def windows(name):  # what each layer's attention uses
        model, _ = _load(built[name][0])
        return [layer.self_attn.window for layer in model.model.layers]

    assert windows("mistral") == windows("mistral-hub") == [8, 8]
    assert windows("mistral-null-window") == [None, None]
    assert windows("qwen2") == windows("qwen2-hub") == windows("qwen3-hub") == [None, None]
    assert windows("qwen2-window") == windows("qwen2-window-hub") == [None, 8]  # the hub one derives it
    # the window matters for a 12-token prompt: windowed and full references differ
    for a, b in (("mistral", "mistral-null-window"), ("qwen2", "qwen2-window")):
        assert float((refs[id(built[a][1])][0][0] - refs[id(built[b][1])][0][0]).abs().max()) > 1e-2


def test_tied_embeddings(built):
    model, cfg = _load(built["qwen3-tied"][0])
    assert cfg.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    for name in ("qwen3", "qwen3-tied-file-head"):
        model, cfg = _load(built[name][0])
        assert not cfg.tie_word_embeddings
        assert torch.equal(model.lm_head.weight, built[name][1].lm_head.weight)


@pytest.mark.parametrize("name", ["mixtral", "mixtral-stacked"])
def test_mixtral_routes_to_transformers_experts(name, built):
    path, hf = built[name]
    model, cfg = _load(path)
    assert (cfg.num_local_experts, cfg.num_experts_per_tok) == (4, 2)
    routes = parity.mixtral_routes(model, hf, PROMPT, cfg.num_experts_per_tok)
    assert len(routes) == cfg.num_hidden_layers
    for layer, (picked, want) in enumerate(routes):
        assert picked.shape[0] == len(PROMPT)
        assert torch.equal(picked, want), layer
        assert len({tuple(r) for r in picked.tolist()}) > 1  # routing is not trivial


def test_stacked_experts_split_into_hub_weights(built):
    """Each expert's w1/w3 are the gate/up halves of its gate_up_proj rows, w2 its down_proj."""
    model, cfg = _load(built["mixtral-stacked"][0])
    hub, _ = _load(built["mixtral"][0])
    experts = built["mixtral"][1].model.layers[1].mlp.experts
    n = cfg.intermediate_size
    for e, (ours, theirs) in enumerate(zip(model.model.layers[1].block_sparse_moe.experts,
                                           hub.model.layers[1].block_sparse_moe.experts)):
        assert torch.equal(ours.w1.weight, experts.gate_up_proj[e, :n])
        assert torch.equal(ours.w3.weight, experts.gate_up_proj[e, n:])
        assert torch.equal(ours.w2.weight, experts.down_proj[e])
        for w in ("w1", "w2", "w3"):
            assert torch.equal(getattr(ours, w).weight, getattr(theirs, w).weight)


def test_bad_stacked_tensor_is_a_user_error(built, tmp_path):
    from mistralrs_cli.errors import UserError

    path = tmp_path / "bad"
    built["mixtral-stacked"][1].save_pretrained(path)
    _in_memory_layout(built["mixtral-stacked"][1], path)
    _edit_tensors(path, lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj": torch.zeros(4, 255, 64)}))
    with pytest.raises(UserError, match=r"model.layers.0.mlp.experts.gate_up_proj.*\[4, 255, 64\]"):
        _load(path)
