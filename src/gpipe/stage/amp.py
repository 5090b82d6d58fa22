"""Autocast where the forward runs, and nowhere else.

PyTorch's rule (``torch.amp``): an autocast region covers the forward pass and the loss; the
backward runs outside it, each backward op in the dtype its forward op chose. A pipe runs its
actions elsewhere than the caller's code: ``gpipe.Pipe`` on worker threads (which start
without autocast), ``gpipe.DistributedPipe`` on the caller's thread, inside whatever region
its ``step`` was called in, and the backward of ``pipe(x)`` whenever autograd reaches it. So
the stages apply autocast themselves:

* a forward — ``F``, the last stage's loss, and a re-materialized forward repeated inside a
  backward — runs under :meth:`Autocast.forward`: the state the caller's thread had when the
  step began (:meth:`Autocast.capture`: per device type, enabled and dtype; the cast-cache
  flag);
* a backward — ``B``, ``W``, and the gradients a step sends on to inputs computed before the
  pipe — runs under :func:`off`: autocast disabled on every device type.

The invariant: every op of a step runs in the dtype it has in the un-pipelined loop
``with torch.autocast(...): loss = loss_fn(model(x), y)`` followed by ``loss.backward()``
outside the region: a layer the user keeps in float32 inside the region (autocast disabled
around it) has a float32 backward, and with fp16 its backward matmuls on the loss-scaled
gradients stay in float32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

__all__ = ["Autocast", "off"]

# the device types torch.autocast knows; those this build lacks are left out at import
_DEVICE_TYPES = tuple(
    d
    for d in ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "maia", "xla", "ipu", "privateuseone")
    if torch.amp.is_autocast_available(d)
)


def _enabled_now() -> list[str]:
    """The device types autocast is enabled for on this thread."""
    return [d for d in _DEVICE_TYPES if torch.is_autocast_enabled(d)]


@dataclass(frozen=True)
class Autocast:
    """A thread's autocast state: ``regions`` the (device type, dtype) pairs it is enabled
    for, ``cache`` whether casts of parameters are cached within the region."""

    regions: tuple[tuple[str, torch.dtype], ...] = ()
    cache: bool = True

    @classmethod
    def capture(cls) -> Autocast:
        """The calling thread's state (a step's forward state, taken when the step begins)."""
        regions = tuple((d, torch.get_autocast_dtype(d)) for d in _enabled_now())
        return cls(regions, torch.is_autocast_cache_enabled())

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        """Run the body under exactly this state, on any thread: enabled with its dtype where
        it was, disabled where it was not (a recompute inside a backward that the user runs
        in another autocast region still repeats the forward's arithmetic)."""
        mine = dict(self.regions)
        with contextlib.ExitStack() as stack:
            for d, dtype in self.regions:
                stack.enter_context(torch.autocast(d, dtype=dtype, cache_enabled=self.cache))
            for d in _enabled_now():
                if d not in mine:
                    stack.enter_context(torch.autocast(d, enabled=False))
            yield


@contextlib.contextmanager
def off() -> Iterator[None]:
    """Run the body with autocast disabled on every device type (a backward)."""
    with contextlib.ExitStack() as stack:
        for d in _enabled_now():
            stack.enter_context(torch.autocast(d, enabled=False))
        yield
