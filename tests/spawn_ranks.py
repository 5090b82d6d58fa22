"""Spawned ranks for the multi-process tests: start them, wait within a limit, kill stragglers.

Every multi-process test goes through :func:`spawn`, so none can hang CI: a rank still alive
when the limit is up is killed, and its exit code reads ``None``. :func:`run_gloo` is the
common case: a scenario on the ranks of one gloo group, a rank's traceback failing the test;
:class:`Raise` is the fault the scenarios inject.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn


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


class Raise(nn.Module):
    """Raises in forward while ``on`` (a scenario's injected fault)."""

    on = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.on:
            raise ValueError("injected")
        return x


def run_gloo(
    scenario: Callable[[int, Path], None], tmp: Path, world: int = 2, limit: float = 120
) -> None:
    """Run ``scenario(rank, tmp)`` on ``world`` spawned ranks of one gloo group (one intra-op
    thread each, every wait bounded); a rank that raised fails the test with its traceback."""
    spawn(_gloo_rank, lambda r: (scenario, r, world, str(tmp)), world, limit)
    for r in range(world):
        err = tmp / f"error{r}.txt"
        if err.exists():
            pytest.fail(f"rank {r} failed:\n{err.read_text()}")


def gloo_results(
    scenario: Callable[[int, Path], None], tmp: Path, world: int = 2, limit: float = 120
) -> list[Any]:
    """:func:`run_gloo`, then what each rank saved (``torch.save``) as ``tmp/rank<r>.pt``."""
    run_gloo(scenario, tmp, world, limit)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _gloo_rank(scenario: Callable[[int, Path], None], rank: int, world: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{out}/store", rank=rank, world_size=world,
        timeout=timedelta(seconds=60),
    )  # fmt: skip
    try:
        scenario(rank, Path(out))
    except BaseException:
        (Path(out) / f"error{rank}.txt").write_text(traceback.format_exc())
        raise
    dist.destroy_process_group()
