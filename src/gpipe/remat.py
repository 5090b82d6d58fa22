"""Re-materialization modes and the "am I recomputing?" flag.

A stage under re-materialization keeps only its boundary input for a micro-batch and runs the
forward again inside backward. The invariant: a layer can ask :func:`is_recomputing` and get
``True`` exactly during that second forward (thread-local, so concurrent stages do not see
each other's state) — how :class:`gpipe.nn.DeferredBatchNorm` avoids counting statistics twice.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

__all__ = ["MODES", "check_mode", "is_recomputing", "recomputing", "should_remat"]

MODES = ("always", "except_last", "never")

_state = threading.local()


def check_mode(mode: str) -> str:
    """Normalize ``mode`` (``except-last`` and ``except_last`` are the same) or raise."""
    norm = str(mode).lower().replace("-", "_")
    if norm not in MODES:
        raise ValueError(f"unknown remat mode {mode!r}; choose one of {', '.join(MODES)}")
    return norm


def should_remat(mode: str, microbatch: int, num_microbatches: int) -> bool:
    """Whether micro-batch ``microbatch`` is re-materialized under ``mode``.

    ``except_last`` keeps the last micro-batch's activations: in GPipe's schedule its backward
    follows its forward at once, so recomputing it would only add time.
    """
    if mode == "always":
        return True
    if mode == "except_last":
        return microbatch != num_microbatches - 1
    return False


def is_recomputing() -> bool:
    """True while the current thread re-runs a forward for backward."""
    return getattr(_state, "recomputing", False)


@contextlib.contextmanager
def recomputing() -> Iterator[None]:
    """Mark the body as a recompute pass (see :func:`is_recomputing`)."""
    prev = is_recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = prev
