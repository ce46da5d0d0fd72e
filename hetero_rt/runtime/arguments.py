"""Checks of the runtime API's arguments, before any compute: token ids are integers (never a bool,
float, string, bytes or nested sequence silently converted), counts are integers in range, sampling
numbers are finite reals in range, a seed is any Python integer. Each failure is an InputError that
names the argument and says what it got."""
from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from ..errors import InputError

SEED_MODULUS = 1 << 64   # torch generators take 64-bit seeds; larger (or negative) ints wrap onto them


def token_ids(value: Any, what: str = "token ids") -> list[int]:
    """A 1-D sequence (list, tuple, numpy array, torch tensor) of integers -> list[int]."""
    if isinstance(value, (str, bytes, bytearray)) or not hasattr(value, "__len__"):
        raise InputError(f"{what} must be a sequence of integers, got {type(value).__name__}")
    if isinstance(value, (np.ndarray, torch.Tensor)):
        if value.ndim != 1:
            raise InputError(f"{what} must be 1-D, got shape {tuple(value.shape)}")
        if value.dtype in (torch.bool, np.bool_) or not _integer_dtype(value.dtype):
            raise InputError(f"{what} must hold integers, got dtype {value.dtype}")
        return [int(t) for t in value.tolist()]
    out = []
    for i, t in enumerate(value):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise InputError(f"{what}[{i}] must be an integer, got {type(t).__name__} {t!r:.40}")
        out.append(int(t))
    return out


def _integer_dtype(dtype) -> bool:
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and not dtype.is_complex
    return np.issubdtype(dtype, np.integer)


def count(value: Any, what: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InputError(f"{what} must be an integer >= {minimum}, got {value!r:.40}")
    return int(value)


def real(value: Any, what: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with low_open)."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and value <= high
    if not ok:
        bounds = f"{'(' if low_open else '['}{low}, {high}]"
        raise InputError(f"{what} must be a finite number in {bounds}, got {value!r:.40}")
    return float(value)


def seed(value: Any) -> int | None:
    """None (a fresh random seed) or any Python integer, taken modulo 2**64."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InputError(f"seed must be an integer or None, got {type(value).__name__} {value!r:.40}")
    return int(value) % SEED_MODULUS


def flag(value: Any, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{what} must be true or false, got {value!r:.40}")
    return bool(value)


ROLES = ("system", "user", "assistant", "tool")


def is_messages(value: Any) -> bool:
    """A non-empty list or tuple whose first item is a mapping: chat messages, not token ids."""
    return isinstance(value, (list, tuple)) and bool(value) and isinstance(value[0], dict)


def messages(value: Any) -> list[dict[str, str]]:
    """Chat messages: a list of {"role": one of ROLES, "content": text}; other keys are kept for the
    template (name, tool_call_id). Content given as a list of {"type": "text", "text": ...} parts (the
    OpenAI format) is joined into one text."""
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}] must be a mapping with role and content, got {type(m).__name__}")
        role, content = m.get("role"), m.get("content", "")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r:.40}")
        if isinstance(content, list):
            content = _text_parts(content, f"messages[{i}].content")
        if content is None:
            content = ""
        if not isinstance(content, str):
            raise InputError(f"messages[{i}].content must be text, got {type(content).__name__}")
        out.append({**m, "role": role, "content": content})
    return out


def _text_parts(parts: list, what: str) -> str:
    texts = []
    for j, p in enumerate(parts):
        if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
            raise InputError(f"{what}[{j}] must be {{\"type\": \"text\", \"text\": ...}} (only text is supported)")
        texts.append(p["text"])
    return "".join(texts)


def strings(value: Any, what: str) -> tuple[str, ...]:
    """None, one string, or a sequence of strings -> tuple of strings."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{what} must be a string or a list of strings, got {value!r:.60}")
    return tuple(value)
