"""Spawned ranks for the multi-process tests: start them, wait within a limit, kill stragglers.

Every multi-process test goes through :func:`spawn`, so none can hang CI: a rank still alive
when the limit is up is killed, and its exit code reads ``None``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def spawn(
    entry: Callable[..., Any], args_of: Callable[[int], tuple], world: int, limit: float
) -> list[int | None]:
    """Run ``entry(*args_of(r))`` in ``world`` spawned processes; return their exit codes
    (``None`` for a rank killed at ``limit`` seconds)."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=entry, args=args_of(r), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + limit
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    codes: list[int | None] = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(5)
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes
