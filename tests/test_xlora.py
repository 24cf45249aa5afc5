"""X-LoRA against peft's XLoraModel on tiny random models (adapters/xlora.py, loaders/xlora.py,
the two passes of engine/xlora_step.py): logits within 1e-4 and scalings within 1e-5 on plain,
GGUF and GGML bases with each knob varied, ours running the passes with two KV caches (a prefill
chunk, then one token per step); the native runtime on a Q8_0 file; orderings; the classifier
file's two layouts; bad X-LoRA folders (tests/xlora_models.py builds the models).
"""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import gguf_builder as gb
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.load import load
from mistralrs_cli.loaders.xlora import attach_xlora
from mistralrs_cli.types import GGUFSpec, LoadOptions, PlainSpec
from xlora_models import (IDS, LOGIT_TOL, NAMES, SCALING_TOL, VARIANTS, build_base, load_x, make_xlora,
                          ours_chunked, peft_reference)

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_base(tmp_path_factory.mktemp("xlora"))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_peft_plain(base, variant):
    folder, xm = make_xlora(base, variant, VARIANTS[variant])
    want_logits, want_scalings = peft_reference(xm, IDS)
    with torch.no_grad():  # the adapters must matter, or parity proves nothing
        plain = base["hf"](torch.tensor([IDS])).logits[0].numpy()
    assert np.abs(want_logits - plain).max() > 0.05
    logits, scalings = ours_chunked(load_x(base, folder), IDS)
    assert scalings.shape == want_scalings.shape
    assert np.abs(scalings - want_scalings).max() < SCALING_TOL
    assert np.abs(logits - want_logits).max() < LOGIT_TOL


@pytest.mark.parametrize("variant", ["defaults", "layerwise_scalings", "top_k_lora"])
def test_parity_with_peft_gguf(base, variant):
    folder, xm = make_xlora(base, "g" + variant, VARIANTS[variant])
    want_logits, want_scalings = peft_reference(xm, IDS)
    logits, scalings = ours_chunked(load_x(base, folder, "gguf"), IDS)
    assert np.abs(scalings - want_scalings).max() < SCALING_TOL
    assert np.abs(logits - want_logits).max() < LOGIT_TOL


# ---- the native runtime and GGML bases ----
def test_native_runtime_q8_0(base):
    """A Q8_0 GGUF served by the native runtime (NativeModel: the scaling pass, the classifier and
    the side paths without torch) against peft on the file's dequantized weights. "precise"
    numerics round activations to 16 bits: measured here the base model alone is off by 1.3e-3,
    the scalings by 6e-4 and the X-LoRA logits by 1.1e-2, while the adapters move them by 6.9."""
    from gguf import GGMLQuantizationType as Q

    from mistralrs_cli.backends.native_model import NativeModel
    from test_ggml import q4_0_reference

    path = gb.write_gguf(base["root"] / "q8.gguf", base["hf"], gb.gguf_vocab(gb.train_tokenizer()), qtype=Q.Q8_0)
    deq = q4_0_reference(copy.deepcopy(base["hf"]), Q.Q8_0)  # what the file holds, as transformers runs it
    folder, xm = make_xlora(base, "native", {"layerwise_scalings": True, "top_k_lora": 2}, hf=deq)
    loaded = attach_xlora(load(GGUFSpec(str(path)), LoadOptions(token_source="none")), str(folder))
    assert isinstance(loaded.model, NativeModel)
    want_logits, want_scalings = peft_reference(xm, IDS)
    logits, scalings = ours_chunked(loaded, IDS)
    with torch.no_grad():
        effect = np.abs(want_logits - deq(torch.tensor([IDS])).logits[0].numpy()).max()
    assert effect > 1.0
    assert np.abs(scalings - want_scalings).max() < 2e-3
    assert np.abs(logits - want_logits).max() < 0.005 * effect
    assert (logits.argmax(-1) == want_logits.argmax(-1)).all()


def test_ggml_base(base, tmp_path):
    """x-lora-ggml's loading path: a GGML v3 file (F32, exact numerics) against peft."""
    from mistralrs_cli.types import GGMLSpec, XLoraSpec
    from test_ggml import ROPE_THETA, write_ggjt

    tok = gb.train_tokenizer()
    tok.save(str(tmp_path / "tokenizer.json"))
    path = write_ggjt(tmp_path / "tiny.bin", base["hf"], gb.gguf_vocab(tok).tokens)
    folder, xm = make_xlora(base, "ggml", {"softmax_temperature": 0.5, "global_scaling_weight": 1.5})
    spec = XLoraSpec(GGMLSpec(str(path), None, None, str(tmp_path / "tokenizer.json"), 2, 1e-5, ROPE_THETA),
                     str(folder))
    loaded = load(spec, LoadOptions(token_source="none", numerics="exact"))
    want_logits, want_scalings = peft_reference(xm, IDS)
    logits, scalings = ours_chunked(loaded, IDS)
    assert np.abs(scalings - want_scalings).max() < SCALING_TOL
    assert np.abs(logits - want_logits).max() < LOGIT_TOL


# ---- bad input: one sentence each, no traceback ----
def _one_sentence(msg: str) -> None:
    assert "\n" not in msg and msg.endswith(".") and "Traceback" not in msg, msg


@pytest.fixture(scope="module")
def good(base):
    folder, _ = make_xlora(base, "good", {})
    return folder


def _broken(base, good, name: str) -> Path:
    folder = base["root"] / f"bad_{name}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(good, folder)
    return folder


def _error(base, folder) -> str:
    loaded = load(PlainSpec(str(base["plain"])), LoadOptions(token_source="none"))
    with pytest.raises(UserError) as e:
        attach_xlora(loaded, str(folder))
    _one_sentence(str(e.value))
    return str(e.value)


def test_missing_config(base, good):
    folder = _broken(base, good, "config")
    (folder / "xlora_config.json").unlink()
    assert "has no xlora_config.json; -x/--xlora-model-id must name an X-LoRA model folder" in _error(base, folder)


def test_classifier_for_other_adapters(base, good):
    """A classifier trained for two adapters, in a folder of three."""
    from safetensors.torch import save_file

    folder = _broken(base, good, "classifier")
    save_file({"layers.0.weight": torch.zeros(2, 64), "layers.0.bias": torch.zeros(2)},
              str(folder / "xlora_classifier.safetensors"))
    msg = _error(base, folder)
    assert "last layer gives 2 outputs but this X-LoRA model needs 3 (3 adapters in xlora_config.json)" in msg


def test_missing_adapter_folder(base, good):
    folder = _broken(base, good, "adapter")
    shutil.rmtree(folder / "2")
    msg = _error(base, folder)
    assert "names adapter 2 but" in msg and "(adapter folders found: 0, 1)" in msg


def test_ordering_file(base, tmp_path):
    """-o: an ordering written by scripts/create_ordering.py numbers the modules as peft does (the
    layerwise scalings land on the right modules); one listing the adapters in another order than
    the classifier's is refused in one sentence."""
    import subprocess
    import sys

    folder, xm = make_xlora(base, "ordered", {"layerwise_scalings": True})
    order = tmp_path / "ordering.json"
    subprocess.run([sys.executable, "scripts/create_ordering.py", "--model", str(base["plain"]),
                    "--adapters", str(folder), "-o", str(order)], check=True, cwd=Path(__file__).parents[1])
    loaded = load(PlainSpec(str(base["plain"])), LoadOptions(token_source="none"))
    want_logits, want_scalings = peft_reference(xm, IDS)
    logits, scalings = ours_chunked(attach_xlora(loaded, str(folder), order=str(order)), IDS)
    assert np.abs(scalings - want_scalings).max() < SCALING_TOL
    assert np.abs(logits - want_logits).max() < LOGIT_TOL
    # no model_id: the base is the ordering's base_model_id (the seed's x-lora-plain command has no -m)
    from mistralrs_cli.api import Which

    spec = Which.XLora(xlora_model_id=str(folder), order=str(order))
    assert np.abs(ours_chunked(load(spec, LoadOptions(token_source="none")), IDS)[0] - want_logits).max() < LOGIT_TOL
    data = json.loads(order.read_text())
    data["order"] = ["1", "0", "2"]
    order.write_text(json.dumps(data))
    with pytest.raises(UserError) as e:
        attach_xlora(load(PlainSpec(str(base["plain"])), LoadOptions(token_source="none")), str(folder),
                     order=str(order))
    _one_sentence(str(e.value))
    assert "lists adapters ['1', '0', '2'] but the X-LoRA model's xlora_config.json has ['0', '1', '2']" in str(e.value)


def test_classifier_layouts_by_hand():
    """The classifier file in peft's layout (`layers.N`, a ReLU between linears) and in the X-LoRA
    library's that mistral.rs reads (`inner.N`, `last`; ReLU only with enable_relu_and_dropout),
    against the MLP and temperature softmax written here."""
    from mistralrs_cli.adapters.xlora import XLoraClassifier, XLoraConfig

    rng = np.random.default_rng(3)
    w0, b0 = rng.normal(size=(16, 64)).astype(np.float32), rng.normal(size=16).astype(np.float32)
    w1, b1 = rng.normal(size=(3, 16)).astype(np.float32), rng.normal(size=3).astype(np.float32)
    h = rng.normal(size=(5, 64)).astype(np.float32)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    cfg = dict(hidden_size=64, adapters=NAMES, xlora_depth=2, xlora_size=16, softmax_temperature=2.0)
    with_relu = softmax((np.maximum(h @ w0.T + b0, 0) @ w1.T + b1) / 2.0)
    without = softmax(((h @ w0.T + b0) @ w1.T + b1) / 2.0)
    peft = XLoraClassifier(XLoraConfig(**cfg), {"layers.0.weight": w0, "layers.0.bias": b0,
                                                "layers.3.weight": w1, "layers.3.bias": b1}, n_slots=4)
    lib = {"inner.0.weight": w0, "inner.0.bias": b0, "last.weight": w1, "last.bias": b1}
    relu = XLoraClassifier(XLoraConfig(**cfg, enable_relu_and_dropout=True), lib, n_slots=4)
    plain = XLoraClassifier(XLoraConfig(**cfg), lib, n_slots=4)
    for clf, want in ((peft, with_relu), (relu, with_relu), (plain, without)):
        got = clf.scalings(h)
        assert got.shape == (5, 4, 3)
        assert np.abs(got - want[:, None, :]).max() < 1e-6


@pytest.mark.parametrize("text, says", [
    ('{"adapters": ["a"]}', "has no `hidden_size`; an X-LoRA config needs it"),
    ('{"hidden_size": 64, "adapters": []}', "`adapters` must be a non-empty list or object of adapter names."),
    ('{"hidden_size": "64", "adapters": ["a"]}', "`hidden_size` must be a number, got '64'."),
    ('{"hidden_size": 64, "adapters": ["a", "b"], "top_k_lora": 3}',
     "`top_k_lora` must be between 1 and the 2 adapters, got 3."),
    ('{"hidden_size": 64, "adapters": ["a"], "layerwise_scalings": 1}', "`layerwise_scalings` must be true or false, got 1."),
    ('{"hidden_size": 64,', "as JSON"),
])
def test_bad_config_fields(tmp_path, text, says):
    from mistralrs_cli.adapters.xlora import read_config

    (tmp_path / "xlora_config.json").write_text(text)
    with pytest.raises(UserError) as e:
        read_config(tmp_path)
    _one_sentence(str(e.value))
    assert says in str(e.value) and "xlora_config.json" in str(e.value)


@pytest.mark.parametrize("make", ["tiny_llama", "tiny_phi3", "tiny_phi2", "tiny_qwen2", "tiny_starcoder2"])
def test_slots_follow_the_module_order(make):
    """Without an ordering file each adapted module's scalings slot is its place in the model's
    module order (how peft numbers its X-LoRA layers: model.modules())."""
    from mistralrs_cli.adapters.xlora import module_slots

    hf = getattr(gb, make)(0)
    names = [n for n, m in hf.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    slots = module_slots(sorted(names))  # the order handed in does not matter
    assert sorted(names, key=slots.get) == names


@pytest.mark.parametrize("make, targets", [("tiny_phi3", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
                                           ("tiny_qwen2", ["q_proj", "v_proj", "down_proj"])])
def test_parity_other_architectures(tmp_path, make, targets):
    """Phi-3 (fused qkv and gate_up, o_proj registered first) and Qwen2 (qkv bias, three targets),
    layerwise scalings so every module's own slot matters."""
    other = build_base(tmp_path, getattr(gb, make)(0), targets)
    folder, xm = make_xlora(other, "arch", {"layerwise_scalings": True, "top_k_lora": 2})
    want_logits, want_scalings = peft_reference(xm, IDS)
    logits, scalings = ours_chunked(load_x(other, folder), IDS)
    assert np.abs(scalings - want_scalings).max() < SCALING_TOL
    assert np.abs(logits - want_logits).max() < LOGIT_TOL
