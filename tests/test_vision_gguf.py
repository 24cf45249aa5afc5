"""vision-plain -m DIR -f TEXT.gguf: the vision part from the checkpoint, the language model's
weights from a GGUF that gguf-py's GGUFWriter wrote from the checkpoint's own text model
(gguf_builder.write_gguf: llama.cpp's names, q/k permutation, Gemma's norms). F32 files: logits
within 1e-4 of transformers' model on the checkpoint (1 and 2 images); Q8_0 files: logits against
transformers run on the file's weights decoded by gguf-py's own dequantize; CLI greedy text
equal to transformers' generate; a GGUF of another model is one error line. LLaVA-NeXT, Idefics2/3 and
Phi-3-vision: F32 logits (one image)."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

import gguf_builder as gb
import vision_models as vm
from mistralrs_cli.engine.kv_cache import SeqKVCache
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.gguf_file import GGUFFile
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.layers import SeqSlice
from mistralrs_cli.types import LoadOptions, VisionSpec

F32_TOL = 1e-4
Q8_EXACT_TOL = 1e-4  # exact numerics: weights dequantized to f32, as the reference has them
Q8_NATIVE_REL = 1e-2  # test_native_model.py: the native executor's 8-bit activation rounding


def text_model(hf):
    """The checkpoint's language model as transformers' own causal LM (what llama.cpp converts)."""
    from transformers import AutoModelForCausalLM

    cfg = copy.deepcopy(hf.config.text_config)
    cfg.tie_word_embeddings = hf.config.text_config.model_type.startswith("gemma")
    lm = AutoModelForCausalLM.from_config(cfg)
    text = getattr(hf.model, "language_model", None) or hf.model.text_model  # Idefics: text_model
    lm.model.load_state_dict(text.state_dict())
    lm.lm_head.load_state_dict(hf.lm_head.state_dict())
    if cfg.model_type == "mistral" and cfg.sliding_window is None:
        lm.config.model_type = "llama"  # llama.cpp writes Mistral as llama; no window, no window key
    return lm.eval()


def dequantized_reference(hf, lm, path: Path):
    """A copy of `hf` whose text weights are the GGUF's tensors as gguf-py decodes them, brought
    back to HF's layout (llama's q/k rows un-permuted, Gemma's norms less 1)."""
    arch = gb.ARCHS[lm.config.model_type]
    names = {gb.gguf_name(n, arch.names): n for n in lm.state_dict()}
    state = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        hf_name = names[t.name]
        w = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(
            lm.state_dict()[hf_name].shape)
        if arch.gguf_arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = lm.config.num_attention_heads if "q_proj" in hf_name else lm.config.num_key_value_heads
            w = w.reshape(heads, w.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(w.shape)
        if arch.gguf_arch == "gemma3" and hf_name.endswith("norm.weight"):
            w = w - 1.0
        state[hf_name] = torch.from_numpy(np.array(w))
    ref_lm = copy.deepcopy(lm)
    ref_lm.load_state_dict(state, strict=False)  # a tied lm_head is the embeddings
    ref = copy.deepcopy(hf)
    ref.model.language_model.load_state_dict(ref_lm.model.state_dict())
    ref.lm_head.load_state_dict(ref_lm.lm_head.state_dict())
    return ref.eval()


def _load(path: Path, gguf_file: Path | str, **opts):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        return load(VisionSpec(str(path), quantized_filename=str(gguf_file)), LoadOptions(token_source="none", **opts))


ARCHS = {"llava": (vm.tiny_llava, vm.save_llava, vm.hf_llava_processor),
         "gemma3": (vm.tiny_gemma3_mm, vm.save_gemma3_mm, vm.hf_gemma3_processor)}


@pytest.fixture(scope="module", params=sorted(ARCHS))
def case(request, tmp_path_factory):
    make, save, processor = ARCHS[request.param]
    hf = make()
    path = tmp_path_factory.mktemp(request.param)
    save(hf, path)
    lm = text_model(hf)
    f32 = gb.write_gguf(path / "text-f32.gguf", lm, vocab=None, qtype=Q.F32)
    q8 = gb.write_gguf(path / "text-q8_0.gguf", lm, vocab=None, qtype=Q.Q8_0)
    return request.param, path, hf, lm, processor(path), f32, q8


def _blocks(mm) -> tuple:
    """Gemma 3: the image spans seen both ways (the engine passes them by sequence)."""
    return ({0: mm.spans},) if mm.spans else ()


def _logits(loaded, ids, mm, cached: bool) -> np.ndarray:
    if not cached:  # one pass through the torch modules (no cache: the native executor declines)
        return vm.our_logits(loaded, ids, mm, *_blocks(mm))
    cfg, n = loaded.config, len(ids)
    cache = SeqKVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    return loaded.model.step(ids, list(range(n)), [SeqSlice(0, n, cache)], list(range(n)),
                             input_embeds=(mm.positions.tolist(), loaded.vision.encode(mm.pixels), *_blocks(mm)))


@pytest.mark.parametrize("names", [["tall"], ["rgba", "wide"]])
def test_f32_gguf_logits_match_transformers(case, names):
    _, path, hf, _, processor, f32, _ = case
    loaded = _load(path, f32)
    ids, mm = vm.our_chat(loaded, names)
    enc = vm.hf_chat(processor, names)
    assert enc["input_ids"][0].tolist() == ids
    with torch.no_grad():
        want = hf(**enc).logits[0].numpy()
    diff = np.abs(_logits(loaded, ids, mm, cached=False) - want).max()
    print(f"{case[0]} {len(names)} image(s) f32 gguf max |logit diff| {diff:.1e}")
    assert diff <= F32_TOL


def test_q8_0_gguf_logits_match_transformers_on_dequantized_weights(case):
    arch, path, hf, lm, processor, _, q8 = case
    assert {t.tensor_type for t in gguf.GGUFReader(str(q8)).tensors} == {Q.Q8_0, Q.F32}
    ref = dequantized_reference(hf, lm, q8)
    exact = _load(path, q8, numerics="exact")  # weights dequantized to f32, as the reference's
    fast = _load(path, q8)  # default numerics: the native executor, as --isq's text model
    # the native executor takes the text model (Gemma 3's image prefills, whose rows attend both
    # ways, stay on the torch modules: its causal kernel does not mask them; decode steps are native)
    assert fast.model.native is not None
    for names in (["tall"], ["rgba", "wide"]):
        enc = vm.hf_chat(processor, names)
        with torch.no_grad():
            want = ref(**enc).logits[0].numpy()
            f32_want = hf(**enc).logits[0].numpy()
        assert np.abs(want - f32_want).max() > 1e-3  # the quantization is real
        ids, mm = vm.our_chat(exact, names)
        assert enc["input_ids"][0].tolist() == ids
        diff = np.abs(_logits(exact, ids, mm, cached=False) - want).max()
        got = _logits(fast, ids, mm, cached=True)
        rel = np.abs(got - want).max() / np.abs(want).max()
        print(f"{arch} {len(names)} image(s) q8_0: exact max |diff| {diff:.1e}, native max |diff| / max |logit| "
              f"{rel:.1e}")
        assert diff <= Q8_EXACT_TOL
        assert rel <= Q8_NATIVE_REL and got[-1].argmax() == want[-1].argmax()


MORE = {  # LLaVA 1.6 (anyres tiles: a tall image is several tiles plus the base view); Idefics2,
    # whose Mistral text model llama.cpp writes as general.architecture llama; Idefics3 (tiles)
    "llava_next": (vm.tiny_llava_next, vm.save_llava_next, vm.hf_llava_next_processor),
    "idefics2": (vm.tiny_idefics2, vm.save_idefics2, vm.hf_idefics2_processor),
    "idefics3": (vm.tiny_idefics3, vm.save_idefics3, vm.hf_idefics3_processor),
}


@pytest.mark.parametrize("arch", sorted(MORE))
def test_more_archs_f32_gguf_logits_match_transformers(tmp_path, arch):
    make, save, processor = MORE[arch]
    hf = make()
    save(hf, tmp_path)
    f32 = gb.write_gguf(tmp_path / "text.gguf", text_model(hf), vocab=None, qtype=Q.F32)
    assert GGUFFile(f32).architecture == "llama"
    loaded = _load(tmp_path, f32)
    ids, mm = vm.our_chat(loaded, ["tall"])
    enc = vm.hf_chat(processor(tmp_path), ["tall"])
    assert enc["input_ids"][0].tolist() == ids
    with torch.no_grad():
        want = hf(**enc).logits[0].numpy()
    diff = np.abs(_logits(loaded, ids, mm, cached=False) - want).max()
    print(f"{arch} 1 image f32 gguf max |logit diff| {diff:.1e}")
    assert diff <= F32_TOL


def test_a_gguf_without_the_image_token_row(tmp_path):
    """llama.cpp's converters write the text vocabulary only (Gemma 3's drops the rows past it):
    a file whose rows end before the image token runs, that token looked up as token 0 before its
    rows are replaced; the logits are transformers' for the text tokens."""
    hf = vm.tiny_llava(0)
    vm.save_llava(hf, tmp_path)
    lm = text_model(hf)
    lm.resize_token_embeddings(gb.VOCAB)  # the image token (id VOCAB) loses its rows
    f = gb.write_gguf(tmp_path / "text.gguf", lm, vocab=None, qtype=Q.F32)
    loaded = _load(tmp_path, f)
    assert loaded.config.vocab_size == gb.VOCAB and loaded.vision.image_token_id == gb.VOCAB
    q8 = _load(tmp_path, gb.write_gguf(tmp_path / "text-q8_0.gguf", lm, vocab=None, qtype=Q.Q8_0))
    assert q8.model.native is not None
    for names in (["tall"], ["rgba", "wide"]):
        ids, mm = vm.our_chat(loaded, names)
        enc = vm.hf_chat(vm.hf_llava_processor(tmp_path), names)
        assert enc["input_ids"][0].tolist() == ids and max(ids) == gb.VOCAB
        with torch.no_grad():
            want = hf(**enc).logits[0, :, :gb.VOCAB].numpy()
        assert np.abs(_logits(loaded, ids, mm, cached=False) - want).max() <= F32_TOL
        # the native executor embeds through the same module: its logits are the torch modules'
        ref = _logits(q8, ids, mm, cached=False)
        assert np.abs(_logits(q8, ids, mm, cached=True) - ref).max() <= Q8_NATIVE_REL * np.abs(ref).max()


def _cli(path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([str(Path(sys.executable).with_name("mistralrs")), *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_image_greedy_equals_transformers(case):
    """`--image` through the CLI, and an image part through Which.VisionPlain(quantized_filename=...)."""
    _, path, hf, _, processor, f32, _ = case
    image = path / "tall.png"
    image.write_bytes(vm.odd_images()["tall"])
    loaded = _load(path, f32)
    want = loaded.tokenizer.decode(vm.hf_greedy(hf, processor, vm.TEXT, [vm.odd_images()["tall"]], 8))
    res = _cli(path, "--temperature", "0", "--ignore-eos", "--max-tokens", "8", "--image", str(image), "--prompt",
               vm.TEXT, "vision-plain", "-m", str(path), "-f", f32.name)  # a file name inside -m
    assert res.returncode == 0, res.stderr
    assert res.stdout == want + "\n"
    from mistralrs_cli import ChatCompletionRequest, Runner, Which

    with pytest.MonkeyPatch.context() as mp:  # the Python API's field, the same answer
        mp.setenv("HF_HUB_OFFLINE", "1")
        runner = Runner(Which.VisionPlain(model_id=str(path), quantized_filename=str(f32)), token_source="none")
    parts = [{"type": "image_url", "image_url": {"url": vm.uri("tall")}}, {"type": "text", "text": vm.TEXT}]
    out = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": parts}], max_tokens=8, temperature=0.0, ignore_eos=True))
    assert out.choices[0].message.content == want


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava_bad")
    vm.save_llava(vm.tiny_llava(0), path)
    return path


BAD = {  # name -> (text model written to the GGUF, general.architecture, words of the error)
    "architecture": (lambda: gb.tiny_gemma3(1, vocab_size=gb.VOCAB + 1), None, "holds a gemma3 model"),
    "hidden size": (lambda: gb.tiny_llama(1, vocab_size=gb.VOCAB + 1, hidden_size=32, intermediate_size=64),
                    None, "hidden size 32"),
    # a text token past the file's rows (only the image token may be: its rows are replaced)
    "vocabulary": (lambda: gb.tiny_llama(1, vocab_size=gb.VOCAB - 1), None, f"vocabulary of {gb.VOCAB - 1} tokens"),
    "more rows": (lambda: gb.tiny_llama(1, vocab_size=gb.VOCAB + 2), None, f"vocabulary of {gb.VOCAB + 2} tokens"),
}


@pytest.mark.parametrize("bad", sorted(BAD))
def test_a_gguf_of_another_model_is_one_error_line(llava_dir, bad):
    make, arch, words = BAD[bad]
    f = gb.write_gguf(llava_dir / f"{bad.replace(' ', '_')}.gguf", make(), vocab=None, architecture=arch)
    res = _cli(llava_dir, "--prompt", "hi", "vision-plain", "-m", str(llava_dir), "-f", str(f))
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], res.stderr
    assert str(f) in lines[0] and "-f/--quantized-filename" in lines[0]


def test_missing_file_and_isq_are_errors_naming_the_field(llava_dir):
    from mistralrs_cli.api import Runner, Which

    with pytest.raises(UserError, match=r"nope\.gguf does not exist.*quantized_filename"):
        Runner(which=Which.VisionPlain(model_id=str(llava_dir), quantized_filename="nope.gguf"), token_source="none")
    f = gb.write_gguf(llava_dir / "ok.gguf", text_model(vm.tiny_llava(0)), vocab=None, qtype=Q.Q8_0)
    with pytest.raises(UserError, match="--isq .* already quantized"):
        _load(llava_dir, f, isq="Q4_0")


def test_phi3v_f32_gguf_logits_match_the_reference(tmp_path):
    """Phi-3-vision (a flat config: the text model's own): its Phi-3 text model as a phi3 GGUF
    (fused qkv and gate|up, as llama.cpp writes them), logits within 1e-4 of test_vision_phi3v's
    reference (CLIP + the HD assembly in plain torch + transformers' Phi3ForCausalLM)."""
    import test_vision_phi3v as p3

    ref = p3.build(tmp_path)
    f32 = gb.write_gguf(tmp_path / "text.gguf", ref["text"], vocab=None, qtype=Q.F32)
    assert GGUFFile(f32).architecture == "phi3"
    loaded = _load(tmp_path, f32)
    ids, mm = vm.our_chat(loaded, ["tall"])
    want_ids, feats = p3.ref_prompt(tmp_path, ref, ["tall"])
    assert ids == want_ids
    want = p3.ref_logits(ref, ids, loaded.vision.image_token_id, feats).numpy()
    diff = np.abs(_logits(loaded, ids, mm, cached=False) - want).max()
    print(f"phi3_v 1 image f32 gguf max |logit diff| {diff:.1e}")
    assert diff <= F32_TOL
