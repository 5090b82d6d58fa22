"""A layer's own ``torch.utils.checkpoint`` inside a pipeline stage: its recompute draws the
forward's random numbers again.

The recompute runs inside the stage's backward, outside the forward's keyed region
(:mod:`gpipe.stage.rng`), where a dropout would draw from the global generator — another mask,
and gradients of another function. Each grad-mode forward records, per hooked random-module
call, the region generator's state just before it (:func:`gpipe.stage.rng.recording`);
backward actions run under :func:`backward_of`, where such a call takes its recorded state, in
order, and draws again. This module keeps only which backward a thread (or a device) runs; the
keyed-region state is :mod:`gpipe.stage.rng`'s, reached through its functions.

The invariant: a random module recomputed by a layer's own checkpoint draws exactly what its
forward drew, bit for bit; a random draw there that cannot be matched to a forward call (a
functional op, or nothing recorded) is refused, naming the stage and micro-batch — never a
silent other mask.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from gpipe.stage import rng

__all__ = ["backward_of", "on_device", "replay"]


def _unkeyed(where: tuple[int, int], what: str) -> RuntimeError:
    stage, microbatch = where
    return RuntimeError(
        f"stage {stage}, micro-batch {microbatch}: {what} drew random numbers during the "
        "backward, outside the forward's keyed stream (a layer's own torch.utils.checkpoint "
        "recomputing?), so its mask would not be the forward's and the gradients would be "
        "wrong; draw it with a module (nn.Dropout: recomputed exactly), or drop the layer's "
        "own checkpointing and use the pipe's re-materialization (remat='always' or "
        "'except_last'), which replays every random draw exactly"
    )


class _Unkeyed(TorchDispatchMode):
    """A stage's backward: a seeded random op outside any keyed region is refused."""

    def __init__(self, where: tuple[int, int]) -> None:
        super().__init__()
        self.where = where

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        seeded = torch.Tag.nondeterministic_seeded in func.tags
        if seeded and not rng.in_region() and not rng.draws_nothing(func, args, kwargs):
            raise _unkeyed(self.where, f"aten.{func.overloadpacket.__name__}")
        return func(*args, **kwargs)


#: non-CPU device -> the backwards running on it, oldest first, each (stage, micro-batch,
#: draws): a CUDA graph's backward runs on the autograd engine's device thread, which sees
#: none of the stage thread's locals. Each backward removes its own entry when it ends, so two
#: workers on one device never leave the other's stale (the newest is the one replayed).
on_device: dict[torch.device, list[tuple[int, int, dict | None]]] = {}
_ON_DEVICE_LOCK = threading.Lock()


#: This thread's backward: (stage, micro-batch, draws) while :func:`backward_of` runs.
_tls = threading.local()


@contextlib.contextmanager
def backward_of(
    stage: int,
    microbatch: int,
    watch_ops: bool,
    draws: dict | None = None,
    device: torch.device | None = None,
) -> Iterator[None]:
    """Mark the body as ``stage``'s backward of ``microbatch`` on ``device``. A hooked random
    module (:func:`gpipe.stage.rng.install_hooks`) that runs in it outside a keyed region is a
    layer's own ``torch.utils.checkpoint`` recomputing: it draws again what its forward drew
    (the states :func:`gpipe.stage.rng.recording` kept in ``draws``), or, with nothing
    recorded, raises rather than draw a mask the forward never drew. ``watch_ops`` (a stage
    with layers that draw outside random modules) refuses every other seeded ATen op there
    too, at a dispatch mode's cost."""
    where = (stage, microbatch, draws)
    prev = getattr(_tls, "backward_of", None)
    _tls.backward_of = where
    shared = device is not None and device.type != "cpu"
    if shared:
        with _ON_DEVICE_LOCK:
            on_device.setdefault(device, []).append(where)
    try:
        with _Unkeyed((stage, microbatch)) if watch_ops else contextlib.nullcontext():
            yield
    finally:
        _tls.backward_of = prev
        if shared:
            with _ON_DEVICE_LOCK:
                active = on_device[device]
                del active[next(i for i, w in enumerate(active) if w is where)]
                if not active:
                    del on_device[device]


@contextlib.contextmanager
def _replaying(inner: Any) -> Iterator[None]:
    """A recorded call's draws again: ``inner`` (a mode over a generator restored to the
    recorded state) entered as a keyed region."""
    with rng.region(), inner:
        yield


def replay(module: nn.Module, args: Any, index: int | None) -> Any:
    """For a random module called outside every keyed region: inside a stage's backward
    (this thread's, or the device's), the context that draws its recorded call again;
    elsewhere ``None`` (a module run outside any pipeline draws as usual)."""
    device = rng.input_device(args)
    active = on_device.get(device)
    where = getattr(_tls, "backward_of", None) or (active[-1] if active else None)
    if where is None:
        return None
    stage, microbatch, draws = where
    states = draws.get((index, id(module))) if draws is not None and index is not None else None
    if not states:
        raise _unkeyed((stage, microbatch), type(module).__name__)
    mode = rng.KeyedRandom(0)
    g = mode.generator(device)
    g.set_state(states.pop(0))
    return _replaying(rng.module_mode(mode, module, args))
