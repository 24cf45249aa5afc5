"""Which LoRA adapters each request runs with, and the per-forward weights that say so.

A request's adapters are fixed when it is added: the names it gives, or the engine's active set
at that moment (Loaded.default_adapters at start, then Engine.set_active_adapters). A forward's
weights are AdapterBank.weights_for over the scheduled chunks: 1.0 where a row's sequence has an
adapter, so sequences with different sets share one forward. Adapters merged into the weights at
load (a float base with no preloads) have no bank: they are always on, so a request may name them
but not leave one out.
"""
from __future__ import annotations

import numpy as np

from ..errors import UserError


def _listed(names: list[str]) -> str:
    return ", ".join(names) if names else "none"


class AdapterRows:
    def __init__(self, loaded):
        self.bank = getattr(loaded, "adapters", None)
        self.default = list(getattr(loaded, "default_adapters", None) or [])
        self.names = list(self.bank.names) if self.bank is not None else list(self.default)
        self.active = list(self.default)

    def check(self, names: list[str], what: str) -> list[str]:
        """`names` without repeats, or a UserError naming the unknown ones and the served ones."""
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in self.names]
        if unknown:
            served = f"its adapters are {_listed(self.names)}" if self.names else "it was loaded without adapters"
            raise UserError(f"{what} names {_listed(unknown)}, which this model does not serve; {served}.")
        if self.bank is None and self.names and set(names) != set(self.names):
            raise UserError(f"{what} leaves out {_listed([n for n in self.names if n not in names])}, but the "
                            "adapters are merged into the weights (the ordering has no preload_adapters), so "
                            "they are always on; add preload_adapters to the ordering to choose per request.")
        return names

    def resolve(self, requested: list[str] | None) -> list[str]:
        """A request's adapters: its own (checked) or, for None, the active set now."""
        return list(self.active) if requested is None else self.check(requested, "the request's adapters")

    def weights(self, chunks: list[tuple[int, list[str]]]) -> np.ndarray | None:
        """(n_slots, T, n_adapters) for chunks of (rows, adapter names), or None when no row of
        this forward uses a bank adapter."""
        if self.bank is None or not any(names for _, names in chunks):
            return None
        return self.bank.weights_for([(n, [self.bank.index(a) for a in names]) for n, names in chunks])

