"""Checks of the options users give a pipe: one place, one wording for each mistake.

The invariant: every function here returns the value in its normal form or raises
``TypeError``/``ValueError`` whose message names the argument, the value it got and what to
give instead. Nothing is coerced silently: ``True`` is not one stage, ``2.5`` is not two
micro-batches, ``"fc"`` is not the list ``["f", "c"]``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["balance", "count", "device", "integer", "names", "optional_count", "seconds"]


def integer(name: str, value: Any) -> int:
    """``value`` as an int; bools, floats and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def count(name: str, value: Any, *, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def optional_count(name: str, value: Any, *, minimum: int = 1) -> int | None:
    """Like :func:`count`, with ``None`` meaning "not given"."""
    return None if value is None else count(name, value, minimum=minimum)


def seconds(name: str, value: Any) -> float:
    """A finite, positive duration in seconds."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {value}")
    return float(value)


def names(name: str, value: Any) -> list[str]:
    """A list of strings; a lone string is refused (it would be read letter by letter)."""
    if isinstance(value, str):
        raise TypeError(
            f"{name} must be a list of names, got the string {value!r}; use [{value!r}]"
        )
    out = list(value)
    bad = [v for v in out if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{name} must hold strings, got {bad[0]!r}")
    return out


def balance(value: Any, num_layers: int, num_stages: int, pinned: int = 0) -> list[int]:
    """Layers per stage: ``num_stages`` ints >= 1 that add up to ``num_layers``."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"balance must be a list of layer counts, one per stage, got {type(value).__name__} "
            f"{value!r}"
        )
    out = [count(f"balance[{i}]", b, minimum=0) for i, b in enumerate(value)]
    if 0 in out:
        raise ValueError(
            f"every stage needs at least one layer; balance={out} gives stage {out.index(0)} none"
        )
    if len(out) != num_stages:
        raise ValueError(
            f"balance has {len(out)} entries but the pipeline has {num_stages} stages; give one "
            "layer count per stage"
        )
    if sum(out) != num_layers:
        raise ValueError(
            f"balance={out} sums to {sum(out)} but the model has {num_layers} layers; the counts "
            f"must add up to {num_layers}"
        )
    if pinned and out[0] < pinned:
        raise ValueError(f"balance[0]={out[0]} cannot hold the {pinned} pinned layers")
    return out


def device(value: Any, name: str = "devices holds") -> torch.device:
    """A device that exists on this machine (an int means that CUDA device); ``name`` starts
    the message (``"devices holds"`` for a list of devices, ``"device="`` for one)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} {value!r}: a device must be a torch.device, str or int")
    try:
        dev = torch.device(f"cuda:{value}") if isinstance(value, int) else torch.device(value)
    except (RuntimeError, TypeError) as e:
        count = (
            f"; for {value} stages write stages={value}, for CUDA device {value} the int {value}"
            if isinstance(value, str) and value.strip().isdigit()
            else ""
        )
        raise ValueError(
            f"{name} {value!r}, which is not a device ({e}); use e.g. 'cpu' or 'cuda:0'{count}"
        ) from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            raise ValueError(
                f"{name} {value!r}, but this machine has {n} CUDA device(s); "
                "pass a device that exists (e.g. 'cpu')"
            )
    return dev
