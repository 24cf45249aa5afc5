"""LoRA adapters served unmerged on a sharded model: each adapted module's A/B factors split with
their base module, by the same table (shard.py).

A column-parallel module (q/k/v, gate/up and their fused forms) keeps its output rows, so its
side path keeps the same rows of B and all of A: this rank's rows of B (A x). A row-parallel one
(o, down) keeps its input columns, so its side path keeps those columns of A and all of B:
B (A_r x_r), a partial product that sums over the ranks to B (A x). It is added to the module's
partial output before its one all-reduce (the side path wraps RowParallel.inner), so a
row-parallel module still costs one all-reduce. Merged adapters (a float base) need none of
this: they are in the weights before the split.
"""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
from torch import nn

from ..errors import UserError
from .shard import REDUCED, Plan, kind_of

ROW_KINDS = {"q_rows", "kv_rows", "ffn_rows", "qkv_rows", "gate_up_rows"}


def _rows(runs: list[range]) -> np.ndarray:
    return np.concatenate([np.arange(r.start, r.stop) for r in runs])


def shard_bank(bank, plan: Plan):
    """A copy of `bank` whose Targets hold this rank's slices, each keyed by the module its side
    path wraps (a row-parallel module's inner multiply, before the all-reduce)."""
    targets = {}
    for name, t in bank.targets.items():
        kind = kind_of(name)
        if kind is None:  # a module the table does not split: every rank runs it whole
            targets[name] = t
        elif kind in REDUCED:
            cols = plan.cols(kind)
            targets[f"{name}.inner"] = dataclasses.replace(
                t, A=np.ascontiguousarray(t.A[:, cols.start:cols.stop]))
        elif kind in ROW_KINDS:
            targets[name] = dataclasses.replace(t, B=np.ascontiguousarray(t.B[_rows(plan.rows(kind))]))
        else:
            raise UserError(f"--tp {plan.world}: the adapters change {name}, whose split ({kind}) takes "
                            "no adapters yet; run without --tp or with adapters on the attention and MLP "
                            "projections only.")
    sharded = copy.copy(bank)
    sharded.targets = targets
    return sharded


def install_sharded(model: nn.Module, bank, plan: Plan) -> None:
    """Serve `bank` (rank 0's, whole) on this rank's sharded model through the torch side path."""
    from ..adapters.torch_lora import install

    install(model, shard_bank(bank, plan))
