"""X-LoRA against peft's XLoraModel on tiny random models (adapters/xlora.py, engine/xlora_step.py,
loaders/xlora.py).

Three random PEFT LoRA adapters (init_lora_weights=False, all seven linear targets) and a seeded
classifier make an X-LoRA model folder (xlora_config.json, xlora_classifier.safetensors saved from
the XLoraModel's classifier state_dict: peft's save_pretrained is broken for X-LoRA, and peft
needs the adapter names "0", "1", "2"). Independent references: peft's logits and
get_latest_scalings for a whole sequence, while ours runs the two passes with two KV caches (a
prefill chunk, then one token per step); --tgt-non-granular-index against a greedy loop written
here with peft's own layers and the rule injected by hand.
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
from mistralrs_cli.engine.engine import Engine
from mistralrs_cli.engine.kv_cache import cache_for
from mistralrs_cli.engine.request import Request
from mistralrs_cli.engine.scheduler import Scheduled
from mistralrs_cli.engine.xlora_step import XLoraStep
from mistralrs_cli.errors import UserError
from mistralrs_cli.loaders.load import load
from mistralrs_cli.loaders.xlora import attach_xlora
from mistralrs_cli.models.batch import SeqSlice
from mistralrs_cli.types import EngineConfig, GGUFSpec, LoadOptions, PlainSpec, SamplingParams

pytest.importorskip("peft")

NAMES = ["0", "1", "2"]  # peft's X-LoRA loads its adapters as "0", "1", ... and activates them by key
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = [0, 17, 260, 301, 44, 90, 412, 7, 33]
SPLIT = [0, 5, 6, 7, 8, 9]  # a 5-token prefill chunk, then one token per step
LOGIT_TOL, SCALING_TOL = 1e-4, 1e-5
# each varies one knob of the defaults (depth 1, softmax at temperature 1, no top-k, weight 1)
VARIANTS = {
    "defaults": {},
    "top_k_lora": {"top_k_lora": 2},
    "softmax_temperature": {"softmax_temperature": 0.3},
    "layerwise_scalings": {"layerwise_scalings": True},
    "global_scaling_weight": {"global_scaling_weight": 0.6},
    "scaling_pass_value": {"scaling_pass_value": 0.4},
    "deep_topk_softmax": {"xlora_depth": 3, "xlora_size": 16, "top_k_lora": 2, "enable_softmax_topk": True,
                          "enable_softmax": False},
}


def _hf():
    return gb.tiny_llama(0)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The tiny llama as a plain folder and an F32 GGUF, and three peft adapters of it."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("xlora")
    hf = _hf()
    plain = root / "plain"
    hf.save_pretrained(plain)
    tok = gb.train_tokenizer()
    tok.save(str(plain / "tokenizer.json"))
    (plain / "tokenizer_config.json").write_text(json.dumps({"bos_token": gb.BOS, "eos_token": gb.EOS}))
    gguf = gb.write_gguf(root / "tiny.gguf", hf, gb.gguf_vocab(tok))
    adapters = root / "adapters"
    for i, name in enumerate(NAMES):
        torch.manual_seed(100 + i)
        pm = get_peft_model(copy.deepcopy(hf), LoraConfig(r=2 + i, lora_alpha=4 + 2 * i, target_modules=TARGETS,
                                                          init_lora_weights=False))
        with torch.no_grad():  # peft's random B is small: make each adapter move the logits clearly
            for n, p in pm.named_parameters():
                if "lora_B" in n:
                    p.mul_(4.0)
        pm.save_pretrained(adapters / name)
    return {"root": root, "plain": plain, "gguf": gguf, "adapters": adapters, "hf": hf}


def make_xlora(base, name: str, cfg: dict, classifier=None, hf=None):
    """An X-LoRA folder for `cfg` and peft's XLoraModel on the same files (on `hf`, default the
    tiny llama), with its classifier's seeded weights saved from its state_dict."""
    from peft import XLoraConfig, get_peft_model
    from safetensors.torch import save_file

    folder = base["root"] / f"x_{name}"
    if folder.exists():
        shutil.rmtree(folder)
    for n in NAMES:
        shutil.copytree(base["adapters"] / n, folder / n)
    model = copy.deepcopy(base["hf"] if hf is None else hf)
    model.config.use_cache = False  # peft's X-LoRA refuses a base that caches
    xc = XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters={n: str(folder / n) for n in NAMES}, **cfg)
    xm = get_peft_model(model, xc).eval()
    clf = xm.base_model.internal_xlora_classifier
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in clf.parameters():
            p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    state = classifier if classifier is not None else {k: v.contiguous() for k, v in clf.state_dict().items()}
    save_file(state, str(folder / "xlora_classifier.safetensors"))
    (folder / "xlora_config.json").write_text(json.dumps({"hidden_size": 64, "adapters": {n: n for n in NAMES},
                                                          "peft_type": "XLORA", **cfg}))
    return folder, xm


def peft_reference(xm, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = xm(input_ids=torch.tensor([ids]))
    return out.logits[0].numpy(), xm.base_model.get_latest_scalings()[0].numpy()


def load_x(base, folder, fmt: str = "plain", tgt=None):
    if fmt == "plain":
        loaded = load(PlainSpec(str(base["plain"])), LoadOptions(token_source="none"))
    else:  # the torch executor on the GGUF (F32, exact numerics)
        loaded = load(GGUFSpec(str(base["gguf"])), LoadOptions(token_source="none", numerics="exact"))
    return attach_xlora(loaded, str(folder), tgt_non_granular_index=tgt)


def ours_chunked(loaded, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Our two passes over `ids` in SPLIT's chunks, each on its own KV cache: (logits, scalings)."""
    model = loaded.model
    xs = XLoraStep(model, loaded.xlora, loaded.adapters)
    xs.record = {}
    req = Request("r", list(ids), SamplingParams())
    req.cache = cache_for(model)
    logits = []
    for a, b in zip(SPLIT, SPLIT[1:]):
        w = xs.fill(None, [Scheduled(req, b - a)], b - a)
        logits.append(model.step(ids[a:b], list(range(a, b)), [SeqSlice(0, b - a, req.cache)], list(range(b - a)),
                                 adapter_weights=w))
        req.n_computed = b
    return np.concatenate(logits), np.concatenate(xs.record["r"])


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


# ---- the engine: continuous batching, --tgt-non-granular-index ----
def generate(engine: Engine, prompts: list[tuple[list[int], list[str] | None]], n: int) -> list[list[int]]:
    """Greedy continuations of every (prompt ids, adapters) added at once, stepped to the end."""
    reqs = [engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0.0, adapters=names, ignore_eos=True))
            for ids, names in prompts]
    while engine.has_unfinished():
        engine.step()
    return [r.output_ids for r in reqs]


def peft_greedy(xm, ids: list[int], n: int, tgt: int | None = None) -> list[int]:
    """The reference: peft's layers over the whole sequence each step. With `tgt`, the rule by
    hand: the scaling pass (the base model: scaling_pass_value 0) and peft's classifier give each
    position its scalings, and every position from prompt + tgt on takes those of the one before."""
    from peft.tuners.lora import LoraLayer

    seq, P = list(ids), len(ids)
    inner = xm.base_model.lora_model.model
    clf = xm.base_model.internal_xlora_classifier
    layers = [m for m in xm.modules() if isinstance(m, LoraLayer)]

    def run(scalings, x):
        hooks = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "scalings": scalings}), with_kwargs=True)
                 for m in layers]
        try:
            return inner(x, output_hidden_states=True, return_dict=True)
        finally:
            for h in hooks:
                h.remove()

    with torch.no_grad():
        for _ in range(n):
            x = torch.tensor([seq])
            if tgt is None:
                logits = xm(input_ids=x).logits
            else:
                dummy = clf.make_dummy_scalings(input_ids=x)
                s = clf(result=run(dummy, x), input_ids=x).clone()
                if len(seq) > P + tgt:
                    s[:, P + tgt:] = s[:, P + tgt - 1:P + tgt]
                logits = run(s, x).logits
            seq.append(int(logits[0, -1].argmax()))
    return seq[P:]


@pytest.fixture(scope="module")
def served(base):
    folder, xm = make_xlora(base, "served", {"top_k_lora": 2})
    return load_x(base, folder), xm


def test_xlora_text_equals_peft_and_batching_changes_nothing(served):
    """An X-LoRA request gives peft's greedy tokens, alone and in the same steps as requests naming
    none, one or two of its adapters as plain LoRA (some on the same prompt: the prefix cache must
    not hand one the other's keys); each of those gives what it gives alone."""
    loaded, xm = served
    engine = Engine(loaded, EngineConfig(block_size=4))
    other = [5, 77, 300, 12, 9, 250, 31]
    jobs = [(IDS, None), (IDS, []), (other, ["0"]), (IDS, ["1", "2"]), (other, None), (other, [])]
    alone = [generate(engine, [job], 6)[0] for job in jobs]
    assert alone[0] == peft_greedy(xm, IDS, 6)
    assert len({tuple(a) for a in alone[:4]}) == 4  # four adapter sets, four texts: the sets matter
    assert generate(engine, jobs, 6) == alone
    assert generate(engine, jobs[::-1], 6) == alone[::-1]
    assert not engine.xlora.state  # every scaling-pass cache freed with its sequence


@pytest.mark.parametrize("config", [EngineConfig(no_kv_cache=True), EngineConfig(paged_attn=False)],
                         ids=["no-kv-cache", "contiguous-cache"])
def test_other_caches(served, config):
    """--no-kv-cache (every step recomputes the sequence, the scaling pass too) and --no-paged-attn."""
    loaded, xm = served
    assert generate(Engine(loaded, config), [(IDS, None), ([5, 77, 300], [])], 4)[0] == peft_greedy(xm, IDS, 4)


@pytest.mark.parametrize("tgt", [0, 2])
def test_tgt_non_granular_index(base, tgt):
    folder, xm = make_xlora(base, f"ng{tgt}", {"layerwise_scalings": True})
    loaded = load_x(base, folder, tgt=tgt)
    engine = Engine(loaded, EngineConfig(block_size=4))
    out = generate(engine, [(IDS, None), ([5, 77, 300, 12], [])], 6)
    assert out[0] == peft_greedy(xm, IDS, 6, tgt)
    assert out[0] != peft_greedy(xm, IDS, 6)  # reusing the scalings changes this text: the rule is seen
    # the scaling pass ran for the prompt and the first tgt generated tokens only
    assert engine.xlora.scaling_rows == len(IDS) + tgt


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


def test_bad_input_through_the_cli(base, good, tmp_path):
    """The subcommand answers a bad X-LoRA folder with the sentence alone and a non-zero exit."""
    import os
    import subprocess
    import sys

    folder = _broken(base, good, "cli")
    shutil.rmtree(folder / "1")
    exe = Path(sys.executable).with_name("mistralrs")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MISTRALRS_CLI_CACHE": str(tmp_path)}
    p = subprocess.run([str(exe), "--prompt", "hi", "x-lora", "-m", str(base["plain"]), "-x", str(folder)],
                       env=env, text=True, capture_output=True, timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "names adapter 1 but" in lines[0], p.stderr


def test_cli_and_api_text_equal_peft(base, tmp_path):
    """`mistralrs x-lora-plain` (the seed's command), Runner(Which.XLora(...)) and
    Runner(Which.XLoraGGUF(...)) on the F32 GGUF: peft's greedy text."""
    import os
    import subprocess
    import sys

    from mistralrs_cli import CompletionRequest, Runner, Which

    folder, xm = make_xlora(base, "cli_text", {"top_k_lora": 2, "softmax_temperature": 0.7})
    prompt, steps = "the quick brown fox", 6
    exe = Path(sys.executable).with_name("mistralrs")
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "HF_HUB_OFFLINE": "1", "MISTRALRS_CLI_CACHE": str(tmp_path)}
    proc = subprocess.Popen([str(exe), "--raw", "--temperature", "0", "--max-tokens", str(steps), "--prompt", prompt,
                             "x-lora-plain", "-m", str(base["plain"]), "-x", str(folder)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # bytes: the text may hold a CR
    texts = []
    for which in (Which.XLora(xlora_model_id=str(folder), order=None, model_id=str(base["plain"])),
                  Which.XLoraGGUF(None, str(base["gguf"]), xlora_model_id=str(folder), tgt_non_granular_index=None)):
        runner = Runner(which, token_source="none")
        tok = runner.loaded.tokenizer
        want = tok.decode(peft_greedy(xm, tok.encode(prompt), steps))
        res = runner.send_completion_request(CompletionRequest(prompt=prompt, max_tokens=steps, temperature=0.0))
        assert res.choices[0].text == want
        texts.append(want)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.decode("utf-8") == texts[0] + "\n", (out, err)


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
