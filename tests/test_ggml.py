"""GGML v3 'ggjt' llama files, written by hand here from tiny transformers llamas: F32 logits equal
transformers (MHA and GQA via --gqa), Q4_0 logits equal transformers run on the Q4_0-dequantized
weights, the CLI generates from a .bin + tokenizer.json, and bad input is one `error:` line."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
import parity
from mistralrs_cli.engine.kv_cache import SeqKVCache
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.ggml import GGMLFile, ggml_config, load_ggml_model, n_ff_from_mult
from mistralrs_cli.models.layers import Batch, SeqSlice

MISTRALRS = Path(sys.executable).with_name("mistralrs")
ROPE_THETA = 50000.0  # tiny_llama's: not stored in GGML files, passed as --rope-theta
TOL = 1e-4
IDS = [0, 5, 77, 300, 12, 9, 401, 33]
STEPS = [17, 250, 3]

# HF module -> Meta's llama name (the inverse of the loader's table, written independently)
_META = {
    "model.embed_tokens": "tok_embeddings", "model.norm": "norm", "lm_head": "output",
    "self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv", "self_attn.o_proj": "attention.wo",
    "input_layernorm": "attention_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
}


def _meta_name(hf: str) -> str:
    module, _, suffix = hf.rpartition(".")
    if module.startswith("model.layers."):
        i, rest = module[len("model.layers."):].split(".", 1)
        return f"layers.{i}.{_META[rest]}.{suffix}"
    return f"{_META[module]}.{suffix}"


def _tensor(f, name: str, data: np.ndarray, shape: tuple[int, ...], qtype: int) -> None:
    """{u32 n_dims, u32 name_len, u32 type, u32 ne[n_dims] (reversed shape), name, pad to 32, data}."""
    enc = name.encode()
    f.write(struct.pack(f"<III{len(shape)}I", len(shape), len(enc), qtype, *reversed(shape)))
    f.write(enc)
    f.write(b"\0" * (-f.tell() % 32))
    f.write(np.ascontiguousarray(data).tobytes())


def write_ggjt(path: Path, model: torch.nn.Module, tokens: list[str], qtype: Q = Q.F32,
               n_mult: int = 256, extra: list[tuple[str, np.ndarray, tuple[int, ...], int]] = ()) -> Path:
    cfg = model.config
    with open(path, "wb") as f:
        f.write(struct.pack("<II", 0x67676A74, 3))
        f.write(struct.pack("<7I", len(tokens), cfg.hidden_size, n_mult, cfg.num_attention_heads,
                            cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads,
                            0 if qtype == Q.F32 else 2))
        for t in tokens:
            b = t.encode()
            f.write(struct.pack("<I", len(b)) + b + struct.pack("<f", 0.0))
        for hf, t in model.state_dict().items():
            w = t.detach().float().numpy().copy()
            if hf.endswith("q_proj.weight"):
                w = gb.permute_qk(w, cfg.num_attention_heads)
            elif hf.endswith("k_proj.weight"):
                w = gb.permute_qk(w, cfg.num_key_value_heads)
            if w.ndim == 2 and qtype != Q.F32:
                _tensor(f, _meta_name(hf), gguf.quants.quantize(w, qtype), w.shape, int(qtype))
            else:
                _tensor(f, _meta_name(hf), w.astype(np.float32), w.shape, int(Q.F32))
        for name, data, shape, t in extra:
            _tensor(f, name, data, shape, t)
    return path


def q4_0_reference(model: torch.nn.Module, qtype: Q = Q.Q4_0) -> torch.nn.Module:
    """The same model with every matrix replaced by its round trip through `qtype` (gguf-py's codec)."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.ndim == 2:
                w = p.detach().float().numpy()
                p.copy_(torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype)))
    return model


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("ggml")
    tok = gb.train_tokenizer()
    tok.save(str(d / "tokenizer.json"))
    vocab = gb.gguf_vocab(tok).tokens
    mha = gb.tiny_llama(0, num_key_value_heads=4)
    gqa = gb.tiny_llama(1)  # 2 KV heads for 4 heads
    files = {
        "mha": write_ggjt(d / "mha-f32.bin", mha, vocab),
        "gqa": write_ggjt(d / "gqa-f32.bin", gqa, vocab),
        "q4": write_ggjt(d / "gqa-q4_0.bin", gqa, vocab, Q.Q4_0),
    }
    bad = d / "bad.bin"
    bad.write_bytes(b"GGUF" + bytes(60))
    procs = {}
    envv = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1",
            "MISTRALRS_CLI_CACHE": str(d / "cache")}

    def cli(key: str, *args: str) -> None:
        procs[key] = subprocess.Popen([str(MISTRALRS), "--raw", "--temperature", "0", "--max-tokens", "4",
                                       "--prompt", "hi", "ggml", *args], env=envv, text=True,
                                      stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    tj = str(d / "tokenizer.json")
    cli("ok", "-f", str(files["gqa"]), "-t", tj, "--gqa", "2", "--rope-theta", str(ROPE_THETA))
    cli("magic", "-f", str(bad), "-t", tj)
    cli("gqa3", "-f", str(files["mha"]), "-t", tj, "--gqa", "3")
    cli("notok", "-f", str(files["mha"]))
    try:
        yield {"dir": d, "files": files, "models": {"mha": mha, "gqa": gqa}, "vocab": vocab, "procs": procs}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
            p.communicate()


def _ours(path: Path, gqa: int) -> list[torch.Tensor]:
    model, cfg = load_ggml_model(GGMLFile(path), gqa=gqa, rope_theta=ROPE_THETA, numerics="exact")
    return parity.our_steps(model, cfg, IDS, STEPS)


def _theirs(hf: torch.nn.Module) -> list[torch.Tensor]:
    with torch.no_grad():
        full = hf(torch.tensor([IDS + STEPS])).logits[0]
    n = len(IDS)
    return [full[:n]] + list(full[n:])


def _diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_header_and_config(env):
    gf = GGMLFile(env["files"]["gqa"])
    assert gf.hparams["n_vocab"] == 512 and gf.hparams["n_embd"] == 64 and gf.hparams["n_layer"] == 2
    assert [t for t, _ in gf.vocab[:2]] == [b"<s>", b"</s>"]
    assert gf.tensors["layers.1.feed_forward.w2.weight"].shape == (64, 128)
    cfg = ggml_config(gf, gqa=2, eps=1e-6, rope_theta=ROPE_THETA)
    # n_ff from w1's shape (128), not n_mult's rule (256 here)
    assert (cfg.intermediate_size, cfg.num_key_value_heads, cfg.head_dim) == (128, 2, 16)
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.max_position_embeddings) == (1e-6, ROPE_THETA, 2048)
    assert n_ff_from_mult(4096, 256) == 11008 and n_ff_from_mult(5120, 256) == 13824  # LLaMA 7B, 13B
    assert {t.qtype for t in GGMLFile(env["files"]["q4"]).tensors.values()} == {Q.Q4_0, Q.F32}


@pytest.mark.parametrize("name,gqa", [("mha", 1), ("gqa", 2)])
def test_f32_logits_match_transformers(env, name, gqa):
    d = _diff(_ours(env["files"][name], gqa), _theirs(env["models"][name]))
    assert d < TOL, d


def test_q4_0_logits_match_transformers_on_dequantized_weights(env):
    ours = _ours(env["files"]["q4"], 2)
    ref = q4_0_reference(gb.tiny_llama(1))
    assert _diff(ours, _theirs(ref)) < TOL
    assert _diff(ours, _theirs(env["models"]["gqa"])) > 1e-2  # the quantization is real


def test_cli_generates(env):
    p = env["procs"]["ok"]
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert "Traceback" not in err and out.endswith("\n")
    n = 1 + len(gb.train_tokenizer().encode("hi").ids)  # BOS added, as llama.cpp did for GGML
    assert f"prompt: {n} tokens" in err


@pytest.mark.parametrize("key,needle", [("magic", "not a GGML 'ggjt' file"), ("gqa3", "--gqa 3"),
                                        ("notok", "tokenizer")])
def test_cli_bad_input_is_one_error_line(env, key, needle):
    p = env["procs"][key]
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert "Traceback" not in err


def test_truncated_and_unknown_type_are_user_errors(env):
    d, src = env["dir"], env["files"]["mha"]
    data = src.read_bytes()
    cut = d / "cut.bin"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(UserError, match=r"cut\.bin is truncated"):
        GGMLFile(cut)
    short = d / "short.bin"
    short.write_bytes(data[:40])
    with pytest.raises(UserError, match="truncated"):
        GGMLFile(short)
    odd = write_ggjt(d / "odd.bin", env["models"]["mha"], env["vocab"],
                     extra=[("extra.weight", np.zeros(20, np.uint8), (32,), 4)])  # 4: the removed Q4_2
    with pytest.raises(UserError, match=r"odd\.bin: tensor extra\.weight has unknown GGML type 4"):
        GGMLFile(odd)
    tq = write_ggjt(d / "tq.bin", env["models"]["mha"], env["vocab"],
                    extra=[("layers.0.attention_norm.weight", np.zeros(54, np.uint8), (256,), int(Q.TQ1_0))])
    with pytest.raises(UserError, match=r"tq\.bin: tensor .* type TQ1_0, which is not supported"):
        load_ggml_model(GGMLFile(tq))


def test_wrong_gqa_for_the_file_names_the_right_one(env):
    with pytest.raises(UserError, match="pass --gqa 2"):
        load_ggml_model(GGMLFile(env["files"]["gqa"]), gqa=1)


def test_api_which_ggml(env):
    from mistralrs_cli.api import Which
    from mistralrs_cli.loaders.load import load
    from mistralrs_cli.types import LoadOptions

    spec = Which.GGML(tok_model_id=str(env["dir"] / "tokenizer.json"), quantized_model_id=None,
                      quantized_filename=str(env["files"]["gqa"]), gqa=2, rope_theta=ROPE_THETA)
    loaded = load(spec, LoadOptions(numerics="exact"))
    assert loaded.config.num_key_value_heads == 2 and loaded.tokenizer.bos_id == 0
    assert loaded.tokenizer.encode("hi")[0] == 0


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0])
def test_other_types_match_transformers_on_dequantized_weights(env, qtype):
    path = write_ggjt(env["dir"] / f"gqa-{qtype.name}.bin", gb.tiny_llama(1), env["vocab"], qtype)
    assert qtype in {t.qtype for t in GGMLFile(path).tensors.values()}
    assert _diff(_ours(path, 2), _theirs(q4_0_reference(gb.tiny_llama(1), qtype))) < TOL


@pytest.mark.parametrize("qtype", [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K])
def test_k_types_load_as_written(env, qtype):
    """K types (gguf-py cannot quantize them): random blocks with finite scales in every matrix of
    a llama 256 wide; each loaded weight decodes as gguf-py decodes the bytes written, and the
    model runs to finite logits."""
    from test_dequant import random_blocks

    hf = gb.tiny_llama(1, hidden_size=256, intermediate_size=512, num_attention_heads=4)
    written = {}
    blank = torch.nn.Module()
    blank.config = hf.config
    extra = []
    for i, (hf_name, t) in enumerate(hf.state_dict().items()):
        if t.ndim == 2:
            raw = random_blocks(qtype, t.shape[0], t.shape[1] // 256, seed=i)
            written[hf_name] = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
            extra.append((_meta_name(hf_name), raw, tuple(t.shape), int(qtype)))
        else:
            extra.append((_meta_name(hf_name), t.float().numpy(), tuple(t.shape), int(Q.F32)))
    blank.state_dict = dict  # no tensors of its own: all come from `extra`
    path = write_ggjt(env["dir"] / f"k-{qtype.name}.bin", blank, env["vocab"], extra=extra)
    model, cfg = load_ggml_model(GGMLFile(path), gqa=2, rope_theta=ROPE_THETA, numerics="exact")
    params = dict(model.named_modules())
    for hf_name, want in written.items():
        module = params[hf_name.rsplit(".", 1)[0]]
        got = module.qweight.dequantize() if hasattr(module, "qweight") else module.weight
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):  # the loader undid the permute
            continue
        assert torch.equal(got, want), hf_name
    cache = SeqKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    with torch.inference_mode():
        logits = model(torch.tensor(IDS), Batch(torch.arange(len(IDS)), [SeqSlice(0, len(IDS), cache)]))
    assert logits.isfinite().all()
