"""--isq: in-situ quantization of a plain model's linear layers at load, as mistral.rs does.

Every nn.Linear becomes a QLinear holding its weight as blocks of the chosen type: attention,
MLP, MoE experts and router, and lm_head too (mistral.rs's `get_layers` lists lm_head and the
router first; its docs: "all layers which would be Linear"). Embeddings and norms stay as they are.
A weight whose rows are not whole blocks takes mistral.rs's fallback type (a K type on rows not a
multiple of 256 falls back to a 32-block type), or stays unquantized when that does not fit either.
"""
from __future__ import annotations

import contextlib
import logging
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from ..errors import UserError
from .dequant import block_size
from .hqq import HQQ
from .qweight import QLinear, QWeight
from .quantize import quantize

log = logging.getLogger(__name__)

# names as mistral.rs's --isq spells them
ISQ_TYPES = {
    "Q4_0": Q.Q4_0, "Q4_1": Q.Q4_1, "Q5_0": Q.Q5_0, "Q5_1": Q.Q5_1, "Q8_0": Q.Q8_0, "Q8_1": Q.Q8_1,
    "Q2K": Q.Q2_K, "Q3K": Q.Q3_K, "Q4K": Q.Q4_K, "Q5K": Q.Q5_K, "Q6K": Q.Q6_K, "Q8K": Q.Q8_K,
    "HQQ4": HQQ.HQQ4, "HQQ8": HQQ.HQQ8,
}
# mistral.rs's get_fallback (isq.rs): K types on rows that are not whole 256-blocks
FALLBACK = {Q.Q2_K: Q.Q4_0, Q.Q3_K: Q.Q4_0, Q.Q4_K: Q.Q4_1, Q.Q5_K: Q.Q5_0, Q.Q6_K: Q.Q5_1,
            Q.Q8_K: Q.Q8_1}


def parse_isq(name: str):
    """An --isq value (any case; Q4_K and Q4K both) -> its block type."""
    key = re.sub(r"^Q(\d)_K$", r"Q\1K", name.strip().upper().replace("-", "_"))
    if key not in ISQ_TYPES:
        raise UserError(f"--isq {name} is not a quantization type; use one of {', '.join(ISQ_TYPES)}.")
    return ISQ_TYPES[key]


def layer_type(qtype, in_features: int):
    """The type a weight with rows of `in_features` gets: `qtype`, its fallback, or None."""
    for t in (qtype, FALLBACK.get(qtype)):
        if t is not None and in_features % block_size(t) == 0:
            return t
    return None


@contextlib.contextmanager
def _progress(total: int, enabled: bool):
    """A rich progress bar on stderr; yields a function to call once per layer."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("ISQ"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("isq", total=total)
        yield lambda: bar.advance(task)


def _show_progress(progress: bool) -> bool:
    return progress and sys.stderr.isatty() and log.isEnabledFor(logging.WARNING)


def quantize_linear(lin: nn.Linear, qtype, backend) -> QLinear:
    w = lin.weight.detach()
    raw = quantize(w, qtype)
    bias = None if lin.bias is None else lin.bias.detach().clone()
    return QLinear(QWeight(raw, qtype, tuple(w.shape)), bias, backend)


def apply_isq(model: nn.Module, isq_type: str, backend, progress: bool = True) -> Counter:
    """Swap every nn.Linear of `model` for a QLinear of `isq_type` (mistral.rs's names); returns
    how many layers got each type (None: left unquantized). The float weights are released."""
    qtype = parse_isq(isq_type)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears and any(isinstance(m, QLinear) for m in model.modules()):
        raise UserError(f"--isq {isq_type}: this model's weights are already quantized; run it without --isq.")
    counts = _swap(model, linears, qtype, backend, _show_progress(progress))
    linears.clear()  # the float weights go now (reference counts: no collection needed)
    _report(isq_type, qtype, counts)
    return counts


@contextlib.contextmanager
def _layer_workers():
    """One thread per layer instead of OpenMP threads inside each small op: the ops of a block
    search are too small to split, and on a busy machine OpenMP's barriers made ISQ 6x slower.
    The C quantizers (csrc/quantize.c) release the GIL and also run one thread per layer here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(threads) as pool:
            yield pool
    finally:
        torch.set_num_threads(threads)


def _swap(model: nn.Module, linears: list, qtype, backend, show: bool) -> Counter:
    jobs = [(name, lin, layer_type(qtype, lin.in_features)) for name, lin in linears]
    counts = Counter(t for _, _, t in jobs)
    with _progress(len(jobs), show) as advance, _layer_workers() as pool:
        done = pool.map(lambda job: None if job[2] is None else quantize_linear(job[1], job[2], backend), jobs)
        for (name, _, t), qlin in zip(jobs, done):  # in order, as each finishes
            if t is not None:
                parent_name, _, child = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, child, qlin)
                if hasattr(parent, "reset"):  # e.g. Phi-3 names its fused projection's call
                    parent.reset()
            advance()
    jobs.clear()
    return counts


def _report(isq_type: str, qtype, counts: Counter) -> None:
    for t, n in counts.items():
        if t is None:
            log.warning("--isq %s: %d linear layer(s) have rows that are not whole %s blocks; "
                        "they stay unquantized.", isq_type, n, qtype.name)
        elif t != qtype:
            log.warning("--isq %s: %d linear layer(s) have rows that are not a multiple of %d; "
                        "they use %s instead, as mistral.rs does.", isq_type, n, block_size(qtype), t.name)


def isq_model(model: nn.Module, isq_type: str, numerics: str = "precise", progress: bool = True) -> None:
    """The loader's one call: quantize, fuse q/k/v and gate/up where the backend can, and build
    the compute forms now so the first token does not pay for them."""
    from ..backends.torch_backend import TorchBackend
    from ..loaders.weights import fuse_projections, prepare_weights, unfuse_float_projections

    backend = TorchBackend(numerics)
    unfuse_float_projections(model)  # the float q/k/v, gate/up fusions would bypass the quantized parts
    apply_isq(model, isq_type, backend, progress)
    # what stays float (embeddings, norms) may be views of the checkpoint's memory map: copies let
    # the map go, and with it every page the quantizer read (a 135M model: 930 -> 520 MB RSS)
    for p in model.parameters():
        p.data = p.data.clone()
    fuse_projections(model, backend.can_fuse)
    prepare_weights(model)
