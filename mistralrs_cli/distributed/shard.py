"""Tensor parallelism by Hugging Face module name: one table for every architecture.

Column-parallel projections (q/k/v, gate/up and their fused forms) keep this rank's output rows;
row-parallel ones (o, down) keep its input columns and all-reduce their output once; the
embeddings and lm_head are split by vocabulary; Mixtral's experts are each split like an MLP,
with one all-reduce over the whole sparse block. Attention modules learn their local head
counts; the models' own code runs unchanged. GGUF/GGML blocks are sliced as bytes: whole rows,
or whole blocks of a row, never dequantized.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError

# the module's HF name (fnmatch pattern) -> how it is split; the first match wins
TABLE: list[tuple[str, str]] = [
    ("*.block_sparse_moe.experts.*.w1", "ffn_rows"), ("*.block_sparse_moe.experts.*.w3", "ffn_rows"),
    ("*.block_sparse_moe.experts.*.w2", "ffn_cols_partial"),  # partial sums: reduced once per block
    ("*.block_sparse_moe", "reduce"),
    ("*.self_attn.q_proj", "q_rows"), ("*.self_attn.k_proj", "kv_rows"), ("*.self_attn.v_proj", "kv_rows"),
    ("*.self_attn.qkv_proj", "qkv_rows"),  # Phi-3's fused q|k|v
    ("*.self_attn.o_proj", "o_cols"), ("*.self_attn.dense", "o_cols"),
    ("*.mlp.gate_proj", "ffn_rows"), ("*.mlp.up_proj", "ffn_rows"), ("*.mlp.c_fc", "ffn_rows"),
    ("*.mlp.fc1", "ffn_rows"), ("*.mlp.gate_up_proj", "gate_up_rows"),  # Phi-3's fused gate|up
    ("*.mlp.down_proj", "ffn_cols"), ("*.mlp.c_proj", "ffn_cols"), ("*.mlp.fc2", "ffn_cols"),
    ("model.embed_tokens", "vocab_embed"), ("lm_head", "vocab_head"),
]
REDUCED = {"o_cols", "ffn_cols"}  # row-parallel kinds that all-reduce their own output


def kind_of(name: str) -> str | None:
    for pattern, kind in TABLE:
        if fnmatch.fnmatchcase(name, pattern):
            return kind
    return None


@dataclass
class Plan:
    """Which rows/columns rank `rank` of `world` holds, from the model's config."""
    rank: int
    world: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int

    def check(self) -> None:
        n = self.world
        if self.heads % n:
            raise UserError(f"--tp {n}: the model has {self.heads} attention heads, which do not split "
                            f"evenly over {n} ranks; choose a --tp that divides {self.heads}.")
        if self.kv_heads % n and n % self.kv_heads:
            raise UserError(f"--tp {n}: the model's {self.kv_heads} KV heads neither split over nor "
                            f"replicate evenly onto {n} ranks; choose a --tp that divides or is a multiple of it.")
        if self.ffn % n:
            raise UserError(f"--tp {n}: the model's MLP width {self.ffn} does not split evenly over {n} "
                            "ranks; choose a --tp that divides it.")

    @property
    def local_heads(self) -> int:
        return self.heads // self.world

    @property
    def local_kv(self) -> int:
        return max(1, self.kv_heads // self.world)

    def q_range(self) -> range:
        h = self.local_heads
        return range(self.rank * h * self.head_dim, (self.rank + 1) * h * self.head_dim)

    def kv_range(self) -> range:
        """This rank's KV heads: its share, or (fewer KV heads than ranks) the one its query
        heads read, replicated."""
        first = self.rank * self.local_kv if self.kv_heads >= self.world else \
            (self.rank * self.local_heads) // (self.heads // self.kv_heads)
        return range(first * self.head_dim, (first + self.local_kv) * self.head_dim)

    def ffn_range(self) -> range:
        w = self.ffn // self.world
        return range(self.rank * w, (self.rank + 1) * w)

    def vocab_range(self) -> range:
        per = -(-self.vocab // self.world)
        return range(min(self.rank * per, self.vocab), min((self.rank + 1) * per, self.vocab))

    def rows(self, kind: str) -> list[range]:
        """The output rows a column-parallel (or vocabulary) split keeps, as runs."""
        q, kv, f = self.q_range(), self.kv_range(), self.ffn_range()
        qd, kvd = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {"q_rows": [q], "kv_rows": [kv], "ffn_rows": [f],
                "qkv_rows": [q, _shift(kv, qd), _shift(kv, qd + kvd)],
                "gate_up_rows": [f, _shift(f, self.ffn)],
                "vocab_embed": [self.vocab_range()], "vocab_head": [self.vocab_range()]}[kind]

    def cols(self, kind: str) -> range:
        return self.q_range() if kind == "o_cols" else self.ffn_range()  # ffn_cols(_partial)


def _shift(r: range, by: int) -> range:
    return range(r.start + by, r.stop + by)


def _index(runs: list[range]) -> torch.Tensor:
    return torch.cat([torch.arange(r.start, r.stop) for r in runs])


# ---- slicing one module's weights ----
def _qweight_rows(qw, runs: list[range]):
    from ..quant.qweight import QWeight

    raw = qw.raw.index_select(0, _index(runs)) if len(runs) > 1 else qw.raw[runs[0].start:runs[0].stop].clone()
    return QWeight(raw, qw.qtype, (raw.shape[0], qw.shape[1]))


def _qweight_cols(qw, cols: range, name: str, world: int):
    from gguf import GGML_QUANT_SIZES

    from ..quant.qweight import QWeight

    block, size = GGML_QUANT_SIZES[qw.qtype]
    if cols.start % block or cols.stop % block:
        raise UserError(f"--tp {world}: {name} has {qw.shape[1]} inputs per row, split into "
                        f"{len(cols)} per rank, which is not a whole number of {qw.qtype.name} blocks "
                        f"of {block}; choose a smaller --tp or a file quantized with smaller blocks.")
    raw = qw.raw[:, cols.start // block * size: cols.stop // block * size].contiguous()
    return QWeight(raw, qw.qtype, (qw.shape[0], len(cols)))


def _exact_qweight(mod: nn.Module, name: str):
    from ..quant.qweight import QWeight

    qw = getattr(mod, "qweight", None)
    if qw is not None and type(qw) is not QWeight:
        raise UserError(f"--tp: {name} holds {type(qw).__name__} weights, which cannot be split yet; "
                        "run without --tp or without that quantization.")
    return qw


def slice_rows(mod: nn.Module, runs: list[range], name: str) -> nn.Module:
    """Keep the output rows in `runs` (a Linear, QLinear, Embedding or QEmbedding)."""
    from ..quant.qweight import QEmbedding, QLinear

    idx = _index(runs)
    bias = getattr(mod, "bias", None)
    bias = None if bias is None else bias.detach().index_select(0, idx)
    qw = _exact_qweight(mod, name)
    if isinstance(mod, QEmbedding):
        return QEmbedding(_qweight_rows(qw, runs))
    if isinstance(mod, QLinear):
        return QLinear(_qweight_rows(qw, runs), bias, mod.backend)
    if isinstance(mod, nn.Embedding):
        return nn.Embedding(len(idx), mod.embedding_dim, _weight=mod.weight.detach().index_select(0, idx))
    if isinstance(mod, nn.Linear):
        return _linear(mod.weight.detach().index_select(0, idx), bias)
    raise UserError(f"--tp: {name} is a {type(mod).__name__}, which cannot be split yet; run without --tp.")


def slice_cols(mod: nn.Module, cols: range, name: str, world: int) -> tuple[nn.Module, torch.Tensor | None]:
    """Keep the input columns in `cols`; returns the module without its bias, and the bias
    (added once, after the all-reduce)."""
    from ..quant.qweight import QLinear

    bias = getattr(mod, "bias", None)
    bias = None if bias is None else bias.detach().clone()
    qw = _exact_qweight(mod, name)
    if isinstance(mod, QLinear):
        return QLinear(_qweight_cols(qw, cols, name, world), None, mod.backend), bias
    if isinstance(mod, nn.Linear):
        return _linear(mod.weight.detach()[:, cols.start:cols.stop].contiguous(), None), bias
    raise UserError(f"--tp: {name} is a {type(mod).__name__}, which cannot be split yet; run without --tp.")


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin
