"""Re-materialization modes, the "am I recomputing?" flag, and recomputation without side
effects.

A stage under re-materialization keeps only its boundary input for a micro-batch and runs the
forward again inside backward. The invariants: a layer can ask :func:`is_recomputing` and get
``True`` exactly during that second forward (thread-local, so concurrent stages do not see
each other's state) — how :class:`gpipe.nn.DeferredBatchNorm` avoids counting statistics
twice; and a recomputation leaves every buffer as it found it (:class:`SideEffects`), so a
plain ``BatchNorm``'s running statistics (or any buffer a forward updates in place) take each
micro-batch once, whatever the mode and the schedule, as without re-materialization.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator

import torch

__all__ = ["MODES", "SideEffects", "check_mode", "is_recomputing", "recomputing", "should_remat"]

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


class SideEffects:
    """The buffers of some modules that their forward changes in place, learned by watching
    forwards, and undone around a recomputation.

    A module whose forward moves any of its own buffers' version counters has all its own
    buffers guarded: ``BatchNorm`` bumps ``num_batches_tracked`` in Python, while ATen's
    kernel updates ``running_mean`` and ``running_var`` without a version bump. A recompute
    always follows the original forward of its micro-batch, so by then every such module is
    known; only its buffers are copied, and only while recomputing.
    """

    def __init__(self, modules: Iterable[torch.nn.Module]) -> None:
        owners: dict[int, list[torch.Tensor]] = {}
        for top in modules:
            for m in top.modules():
                own = [b for b in m.buffers(recurse=False) if b is not None]
                if own:
                    owners.setdefault(id(m), own)
        self._owners = list(owners.values())
        self._guarded: dict[int, list[torch.Tensor]] = {}

    @contextlib.contextmanager
    def watch(self) -> Iterator[None]:
        """Note the modules whose buffers the body changes in place."""
        if not self._owners:
            yield
            return
        before = [[b._version for b in own] for own in self._owners]
        try:
            yield
        finally:
            for own, versions in zip(self._owners, before):
                if any(b._version != v for b, v in zip(own, versions)):
                    self._guarded.setdefault(id(own[0]), own)

    @contextlib.contextmanager
    def undone(self) -> Iterator[None]:
        """Put the guarded buffers' values back after the body (a recomputation)."""
        saved = [(b, b.detach().clone()) for own in self._guarded.values() for b in own]
        try:
            yield
        finally:
            # through ``.data``: the recomputed graph saved these buffers (BatchNorm's
            # backward takes them, unread in training), and a tracked in-place write would
            # fail its version check
            for b, value in saved:
                b.data.copy_(value)
