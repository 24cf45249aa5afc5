"""LoRA side paths in the native CPU runtime (backends/native_lora.py, csrc/lora.c) against peft.

Tiny GGUF files of the llama family (Q8_0 and Q4_0 bases; qwen2 for a projection bias before the
side path; gemma3 for the post-norms after it) are served by NativeModel with a bank of random
peft adapters (init_lora_weights=False) on all seven linear targets (one of them on q/v/down
only, as many real adapters). The reference is transformers' model with the same peft adapters
on the base's dequantized weights (gguf.quants.dequantize(quantize(w))): the native logits differ
from it by the ~16-bit activation rounding of "precise" numerics, which the base model without
adapters measures, and the f16 storage of the factors (11 significant bits, checked alone in
the last test), while the adapters move the logits many times that. Also bit for bit: a row
whose sequence uses no adapter equals the forward without adapter weights, a sequence alone
equals itself in a mixed batch, and the all-layers-in-C path equals the per-layer loop.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import gguf_builder as gb
from mistralrs_cli.adapters.bank import AdapterBank, AdapterFactors
from mistralrs_cli.backends.native_model import NativeModel
from mistralrs_cli.engine.kv_cache import cache_for
from mistralrs_cli.loaders.load import load
from mistralrs_cli.models.batch import SeqSlice
from mistralrs_cli.types import GGUFSpec, LoadOptions

peft = pytest.importorskip("peft")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES = {
    "llama-q8_0": (lambda: gb.tiny_llama(11), Q.Q8_0),
    "llama-q4_0": (lambda: gb.tiny_llama(12), Q.Q4_0),
    "qwen2-q8_0": (lambda: gb.tiny_qwen2(13), Q.Q8_0),
    "gemma3-q8_0": (lambda: gb.tiny_gemma3(14, num_hidden_layers=3), Q.Q8_0),
}
RANKS = [(4, 8.0), (8, 4.0), (2, 2.0)]  # (r, lora_alpha) of adapters a0, a1, a2
MODULES = [TARGETS, TARGETS, ["q_proj", "v_proj", "down_proj"]]  # a2: some modules only, as many real adapters
PROMPTS = [[5, 9, 14, 3, 22, 7], [40, 41, 2, 8], [17, 30, 6, 11, 12]]
SETS = [[], [0], [1, 2]]  # the adapters each prompt's sequence runs with


@pytest.fixture(scope="module")
def vocab():
    return gb.gguf_vocab(gb.train_tokenizer())


class Case:
    """A GGUF base served natively, the peft model on its dequantized weights, the bank."""

    def __init__(self, tmp, name, vocab):
        make, qtype = CASES[name]
        hf = make()
        path = gb.write_gguf(tmp / f"{name}.gguf", hf, vocab=vocab, qtype=qtype)
        self.native = load(GGUFSpec(str(path)), LoadOptions(token_source="none")).model
        assert isinstance(self.native, NativeModel)
        with torch.no_grad():  # the weights the file holds, as transformers multiplies them
            for p in hf.parameters():
                if p.ndim == 2 and p.shape[1] % 32 == 0:
                    w = p.detach().float().numpy()
                    p.copy_(torch.from_numpy(dequantize(quantize(w, qtype), qtype).reshape(w.shape)))
        self.peft = peft.get_peft_model(hf, _config(0), adapter_name="a0")
        for i in range(1, len(RANKS)):
            self.peft.add_adapter(f"a{i}", _config(i))
        self.peft.eval()
        self.bank = AdapterBank([_factors(self.peft, f"a{i}") for i in range(len(RANKS))],
                                hf.config.num_hidden_layers)
        self.native.set_adapters(self.bank)

    def peft_logits(self, ids: list[int], active: list[int], layer_weights=None) -> np.ndarray:
        """peft's logits of ids with adapters `active`; layer_weights (layers, adapters) scale each
        layer's side paths (peft's per-module scaling), as an X-LoRA forward would."""
        with torch.no_grad():
            if not active:
                with self.peft.disable_adapter():
                    return self.peft(torch.tensor([ids])).logits[0].float().numpy()
            self.peft.base_model.set_adapter([f"a{i}" for i in active])
            saved = _scale_layers(self.peft, layer_weights)
            try:
                return self.peft(torch.tensor([ids])).logits[0].float().numpy()
            finally:
                _restore(saved)


def _config(i: int):
    r, alpha = RANKS[i]
    return peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=MODULES[i], init_lora_weights=False,
                           lora_dropout=0.0)


def _factors(model, name: str) -> AdapterFactors:
    """The adapter's factors as peft holds them, by HF module name."""
    factors, scale = {}, None
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and name in mod.lora_A:
            hf_name = mod_name.removeprefix("base_model.model.")
            factors[hf_name] = (mod.lora_A[name].weight.detach().float().numpy(),
                                mod.lora_B[name].weight.detach().float().numpy())
            scale = mod.scaling[name]
    return AdapterFactors(name, float(scale), factors)


def _scale_layers(model, layer_weights):
    saved = []
    if layer_weights is None:
        return saved
    from mistralrs_cli.adapters.bank import layer_of

    for mod_name, mod in model.named_modules():
        if hasattr(mod, "scaling") and hasattr(mod, "lora_A") and ".layers." in mod_name:
            for name in list(mod.scaling):
                saved.append((mod.scaling, name, mod.scaling[name]))
                mod.scaling[name] *= float(layer_weights[layer_of(mod_name), int(name[1:])])
    return saved


def _restore(saved):
    for d, name, v in saved:
        d[name] = v


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory, vocab):
    torch.manual_seed(0)
    return Case(tmp_path_factory.mktemp("native_lora"), request.param, vocab)


def _run(model, prompts, sets, weights_fn=None, per_layer=False, none=False):
    """Every prompt prefilled in one batch, then one decode step of token 4 for each: the logits
    of every row (per sequence: prompt rows, then the decoded row)."""
    caches = [cache_for(model) for _ in prompts]
    if per_layer:  # the per-layer Python loop instead of decoder_layers
        for c in caches:
            c.native_layers_ok = lambda: False
    bank = model.adapter_bank
    outs = [[] for _ in prompts]
    for step in range(2):
        rows = [p if step == 0 else [4] for p in prompts]
        ids, pos, seqs, t = [], [], [], 0
        for r, p, c in zip(rows, prompts, caches):
            start = 0 if step == 0 else len(p)
            ids += r
            pos += list(range(start, start + len(r)))
            seqs.append(SeqSlice(t, t + len(r), c))
            t += len(r)
        w = None if none else (weights_fn(rows) if weights_fn else
                               bank.weights_for([(len(r), s) for r, s in zip(rows, sets)]))
        logits = model.forward(np.asarray(ids), np.asarray(pos), seqs, None, w)
        for j, s in enumerate(seqs):
            outs[j].append(logits[s.start:s.end])
    return [np.concatenate(o) for o in outs]


def _rel(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_mixed_batch_matches_peft(case):
    got = _run(case.native, PROMPTS, SETS)
    base = _run(case.native, PROMPTS, SETS, none=True)
    for p, s, g, b in zip(PROMPTS, SETS, got, base):
        want = case.peft_logits(p + [4], s)
        noise = _rel(b, case.peft_logits(p + [4], []))  # the activation rounding alone
        err, moved = _rel(g, want), _rel(want, case.peft_logits(p + [4], []))
        print(f"adapters {s}: |native - peft| {err:.1e} (base {noise:.1e}), adapters moved {moved:.1e}")
        assert err < max(3 * noise, 1e-5)
        if s:
            assert moved > 30 * err  # the side paths matter: a dropped or misplaced one would show
        else:  # a sequence without adapters keeps the base's bits in a batch with adapters
            assert np.array_equal(g, b)


def test_rows_are_batch_invariant_and_both_paths_agree(case):
    mixed = _run(case.native, PROMPTS, SETS)
    for j in (1, 2):
        alone = _run(case.native, [PROMPTS[j]], [SETS[j]])
        assert np.array_equal(alone[0], mixed[j])
    loop = _run(case.native, PROMPTS, SETS, per_layer=True)
    for a, b in zip(loop, mixed):
        assert np.array_equal(a, b)


def test_layerwise_weights_match_peft(case):
    """X-LoRA-shaped weights: a fraction per layer and adapter (the same for the sequence's rows)."""
    bank = case.bank
    lw = np.random.default_rng(3).uniform(0.2, 1.5, (bank.n_layers, len(bank.names))).astype(np.float32)
    lw[:, 1] = 0.0  # an adapter off on every row: skipped

    def weights(rows):
        return np.repeat(lw[:, None, :], sum(len(r) for r in rows), axis=1)

    got = _run(case.native, [PROMPTS[0]], None, weights_fn=weights)[0]
    want = case.peft_logits(PROMPTS[0] + [4], [0, 2], layer_weights=lw)
    noise = _rel(_run(case.native, [PROMPTS[0]], None, none=True)[0], case.peft_logits(PROMPTS[0] + [4], []))
    assert _rel(got, want) < max(3 * noise, 1e-5)


def test_bad_banks_and_weights_are_refused(case):
    n = case.bank.n_layers
    with pytest.raises(ValueError, match="lm_head"):
        case.native.set_adapters(AdapterBank([AdapterFactors("x", 1.0, {"model.layers.0.lm_head": (
            np.zeros((2, 64), np.float32), np.zeros((64, 2), np.float32))})], n))
    with pytest.raises(ValueError, match="q_proj"):
        case.native.set_adapters(AdapterBank([AdapterFactors("x", 1.0, {"model.layers.0.self_attn.q_proj": (
            np.zeros((2, 7), np.float32), np.zeros((64, 2), np.float32))})], n))
    case.native.set_adapters(case.bank)  # a refused bank leaves the model without adapters until set again
    with pytest.raises(ValueError, match="adapter weights of shape"):
        case.native.forward(np.asarray([3]), np.asarray([0]), [SeqSlice(0, 1, cache_for(case.native))], None,
                            np.zeros((n, 2, 3), np.float32))


@pytest.fixture(scope="module")
def no_f16c(tmp_path_factory):
    """The kernels built for a CPU without F16C (csrc/lora.c decodes f16 itself)."""
    from mistralrs_cli.backends import native

    return native.build(("-mno-f16c", "-mno-avx", "-mno-avx2", "-mno-avx512f"), tmp_path_factory.mktemp("no_f16c"))


@pytest.mark.parametrize("build", ["native", "scalar", "no_f16c"])
@pytest.mark.parametrize("T", [2, 5])  # one thread rounds the rows / the rows split between threads
def test_one_projection_side_path_against_numpy(kernel_builds, no_f16c, build, T):
    """The side path alone, in the build as used, one without AVX2 (csrc/lora.c's scalar loops)
    and one without F16C: y(with adapters) - y(without) equals ((x_in A^T) * weights * scale) B^T
    in numpy, x_in being the normed rows (fused q|k|v) or silu(gate) * up (down), within the f16
    storage of the factors (11 significant bits); rows with weight 0 keep the base's bits."""
    from mistralrs_cli.backends import native
    from mistralrs_cli.backends.native_lora import NativeAdapters, Projection

    lib = no_f16c if build == "no_f16c" else kernel_builds[build]
    rng = np.random.default_rng(5)
    k, eps = 64, 1e-5
    for name, segs, act in (("qkv", [48, 16, 16], 0), ("down", [64], 1)):
        mods = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] if name == "qkv" else ["mlp.down_proj"]
        w = rng.standard_normal((sum(segs), k)).astype(np.float32)
        plan = native.Plan([(quantize(w, Q.Q8_0), Q.Q8_0, sum(segs))], lib)
        nw = rng.uniform(0.5, 1.5, k).astype(np.float32)
        opts = native.qmm_opts(None if act else nw, eps, act=act, precise=True)
        bank = AdapterBank([AdapterFactors(f"a{i}", s, {f"model.layers.0.{m}": (
            # A below f16's normal range, B above its largest value: each is scaled into range first
            rng.standard_normal((r, k)).astype(np.float32) * 1e-6, rng.standard_normal((o, r)).astype(np.float32) * 1e5)
            for m, o in zip(mods, segs)}) for i, (r, s) in enumerate([(4, 2.0), (3, 0.5)])], 1)
        sides = NativeAdapters(bank, [{name: Projection(opts, k, segs)}])
        sides.attach()
        x = rng.standard_normal((T, 2 * k if act else k)).astype(np.float32)
        weights = rng.uniform(0, 2, (1, T, 2)).astype(np.float32)
        weights[0, 0] = 0.0  # row 0 uses no adapter
        weights[0, 1, 1] = 0.0
        sides.begin(None, T)
        base = native.qmatmul(x, plan, lib, opts, n_threads=2)
        sides.begin(weights, T)
        got = native.qmatmul(x, plan, lib, opts, n_threads=2)
        sides.end()
        if act:
            g = x[:, :k].astype(np.float64)
            x_in = g / (1 + np.exp(-g)) * x[:, k:]
        else:
            x64 = x.astype(np.float64)
            x_in = x64 / np.sqrt((x64 ** 2).mean(axis=1, keepdims=True) + eps) * nw
        want = np.concatenate([bank.targets[f"model.layers.0.{m}"].delta(x_in, weights) for m in mods], axis=1)
        assert np.array_equal(got[0], base[0])
        assert np.abs((got - base)[1:] - want[1:]).max() < 2e-3 * np.abs(want).max()
