"""Typed GGUF metadata values: a file can store any key with any type, so every value the
loaders use is read through one of these, which check its type and range and name the key in
the error (BadValue; MissingKey when a required key is absent). The callers add the file.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_SIZE = 1 << 31  # no dimension, layer count or context of a real model comes near this


class MissingKey(KeyError):
    pass


class BadValue(ValueError):
    """A metadata value of the wrong type, length or range: the message names the key."""


def describe(value: Any) -> str:
    """What a value is, for a message (never the whole of a long one)."""
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    if isinstance(value, np.ndarray):
        return "an array of numbers"
    return "an array" if hasattr(value, "__len__") else repr(value)[:40]


def meta_int(meta: Mapping[str, Any], key: str, default: Any = None, low: int = 1) -> int:
    """An integer value in [low, MAX_SIZE]; MissingKey when absent with no default."""
    value = meta.get(key, default)
    if value is None:
        raise MissingKey(key)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise BadValue(f"{key} is {describe(value)}, not a whole number")
    if not low <= int(value) <= MAX_SIZE:
        raise BadValue(f"{key} is {int(value)}, outside {low}..{MAX_SIZE}")
    return int(value)


def meta_float(meta: Mapping[str, Any], key: str, default: Any = None, positive: bool = False) -> float:
    """A finite numeric value (>= 0; > 0 when positive)."""
    value = meta.get(key, default)
    if value is None:
        raise MissingKey(key)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BadValue(f"{key} is {describe(value)}, not a number")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise BadValue(f"{key} is {value}, not a finite {'positive' if positive else 'non-negative'} number")
    return value


def numbers(meta: Mapping[str, Any], key: str, n: int | None = None) -> np.ndarray | None:
    """A numeric array (token types, scores), one value per token when n is given."""
    value = meta.get(key)
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "iuf":
        raise BadValue(f"{key} is {describe(value)}, not an array of numbers")
    if n is not None and len(value) != n:
        raise BadValue(f"{key} has {len(value)} entries but tokenizer.ggml.tokens has {n}")
    return value


def strings(meta: Mapping[str, Any], key: str) -> Sequence[str] | None:
    """A string array (tokens, merges): a GGUF array of strings, nothing else."""
    value = meta.get(key)
    if value is None:
        return None
    if isinstance(value, (str, np.ndarray)) or not isinstance(value, Sequence) \
            or not all(isinstance(t, str) for t in value):
        raise BadValue(f"{key} is {describe(value)}, not an array of strings")
    return value


def token_id(meta: Mapping[str, Any], key: str, default: int | None, n: int) -> int | None:
    """A special token id: an integer (else the file is broken); one outside the vocabulary is
    ignored with a warning, as llama.cpp does ("bad special token")."""
    value = meta.get(key, default)
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise BadValue(f"{key} is {describe(value)}, not a token id")
    if not 0 <= int(value) < n:
        log.warning("GGUF %s is %d, outside the vocabulary of %d tokens: ignored", key, int(value), n)
        return None
    return int(value)


def flag(meta: Mapping[str, Any], key: str, default: bool) -> bool:
    value = meta.get(key, default)
    if not isinstance(value, (bool, np.bool_, int, np.integer)):
        raise BadValue(f"{key} is {describe(value)}, not a boolean")
    return bool(value)


def text(meta: Mapping[str, Any], key: str) -> str | None:
    value = meta.get(key)
    if value is not None and not isinstance(value, str):
        raise BadValue(f"{key} is {describe(value)}, not a string")
    return value
