"""load(spec) with --tp N: join (or start) the ranks, load, shard, and either hand rank 0's
model to the engine or follow rank 0's steps until it stops."""
from __future__ import annotations

import dataclasses
import logging
import os
import sys
from typing import Any, Callable

from ..errors import UserError

BACKENDS = ("gloo", "nccl")


def check(opts, spec: Any, field: Callable[[str], str] = lambda f: f"--{f.replace('_', '-')}") -> str:
    """The --tp options, checked before anything starts; returns the backend to use."""
    if not isinstance(opts.tp, int) or isinstance(opts.tp, bool) or opts.tp < 1:
        raise UserError(f"{field('tp')} must be a whole number of ranks, 1 or more; got {opts.tp!r}.")
    backend = opts.dist_backend or ("nccl" if opts.device.startswith("cuda") else "gloo")
    if backend not in BACKENDS:
        raise UserError(f"{field('dist_backend')} {backend!r} is not one of {', '.join(BACKENDS)}.")
    return backend


def _share_cores(opts) -> None:
    """On the CPU, N ranks of one host share its cores (N x all cores oversubscribes them);
    OMP_NUM_THREADS, when set (torchrun sets 1), decides instead. The ranks started here inherit it."""
    if opts.device.startswith("cuda") or "OMP_NUM_THREADS" in os.environ or "RANK" in os.environ:
        return
    import torch

    n = max(1, (os.cpu_count() or 1) // opts.tp)
    os.environ["OMP_NUM_THREADS"] = str(n)
    torch.set_num_threads(n)


def _pin_gpu(opts) -> None:
    """--device cuda: one GPU per rank on a host (LOCAL_RANK), before anything touches CUDA."""
    if opts.device.startswith("cuda") and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = os.environ.get("LOCAL_RANK", "0")


def load_sharded(spec: Any, opts, load_one: Callable) -> Any:
    """Every rank loads and shards the model; rank 0 returns a Loaded whose model sends each
    step to the others (step.TPModel), the others follow and exit when rank 0 stops."""
    from ..types import SpeculativeSpec
    from .comm import join
    from .step import TPModel, follow
    from .tp_layers import shard_model

    target = spec.target if isinstance(spec, SpeculativeSpec) else spec  # a draft runs on rank 0 alone
    backend = check(opts, spec)
    _share_cores(opts)
    level = logging.getLogger().getEffectiveLevel()
    comm = join(opts.tp, backend, (spec, opts, level))
    _pin_gpu(opts)
    try:
        loaded = load_one(target, dataclasses.replace(opts, runtime="torch"))
        if not hasattr(loaded.model, "named_modules"):
            raise UserError(f"--tp {opts.tp}: this model runs on the native runtime only, which is not sharded.")
        plan = shard_model(loaded.model, comm.rank, comm.world)
        from ..loaders.weights import prepare_weights

        prepare_weights(loaded.model)  # the compute forms of this rank's slices only
        if loaded.adapters is not None:  # LoRA served unmerged: A/B split with their modules
            from .tp_lora import install_sharded

            install_sharded(loaded.model, loaded.adapters, plan)
    except UserError:
        comm.stopping = True  # every rank hit it: each stops on its own
        comm._stop_children(wait=5)
        raise
    if comm.rank == 0:
        loaded.model = TPModel(loaded.model, comm)
        return loaded if target is spec else _with_draft(spec, opts, loaded, load_one)
    follow(loaded.model, comm)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _with_draft(spec: Any, opts, target: Any, load_one: Callable) -> Any:
    """`speculative` under --tp: the sharded target, and the draft loaded whole on rank 0 (it is
    small; its steps stay on rank 0, only the target's verifying steps go to every rank)."""
    from ..loaders.speculative import load_speculative

    one = dataclasses.replace(opts, tp=1)
    return load_speculative(spec, one, lambda s, o: target if s is spec.target else load_one(s, o))
