"""The options both pipes take, checked once into one frozen object.

:class:`gpipe.Pipe` and :class:`gpipe.DistributedPipe` take the same options for the same
things — how many stages, how a mini-batch splits, which schedule, re-materialization, the
random streams' seed — and :func:`pipe_options` is the one place that checks them (with the
words of :mod:`gpipe.base.options`, :mod:`gpipe.stage.remat` and
:class:`gpipe.schedules.ScheduleSpec`). Each pipe holds the result as ``pipe.options``; what is
runtime-specific (devices, threads; process groups, replicas, tied names) each pipe checks
itself. :meth:`PipeOptions.agreed` is the part every rank of a distributed pipe must hold
equal (:mod:`gpipe.dist.agree`).

The invariant: a :class:`PipeOptions` exists only in checked, normal form (ints are ints,
``fetch`` is a tuple of names, ``schedule`` a resolved :class:`~gpipe.schedules.ScheduleSpec`),
so nothing downstream re-checks an option.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from gpipe.base import options as check
from gpipe.schedules import Schedule, ScheduleSpec
from gpipe.stage import remat as remat_mod

__all__ = ["PipeOptions", "pipe_options", "schedule_digest"]


@dataclass(frozen=True)
class PipeOptions:
    """A pipe's checked options (see :func:`pipe_options`)."""

    stages: int | None  # pipeline devices K as given (None: derived from the rest)
    chunks: int | None  # micro-batches M per mini-batch (per replica), if given
    micro_batch_size: int | None  # alternatively the micro-batch size, if given
    batch_dim: int
    schedule: ScheduleSpec = field(compare=False)  # the schedule, resolved per (K, M)
    remat: str
    seed: int
    pinned: int  # the first ``pinned`` layers stay on stage 0
    fetch: tuple[str, ...]  # inner modules whose outputs each step collects
    timeout: float  # seconds any wait may last
    check_finite: bool

    @property
    def schedule_name(self) -> str:
        """The schedule's name."""
        return self.schedule.name

    @property
    def virtual_stages(self) -> int:
        """Stages per pipeline device V."""
        return self.schedule.virtual_stages

    def agreed(self) -> dict[str, Any]:
        """The options that define the model's split and its schedule, as plain data: every
        rank of a distributed pipe must hold the same (keys name the options in errors)."""
        fixed = self.schedule.fixed
        return {
            "chunks": self.chunks,
            "micro_batch_size": self.micro_batch_size,
            "schedule": self.schedule_name,
            "the custom schedule's actions": None
            if fixed is None
            else f"hash {schedule_digest(fixed.actions)} (M={fixed.num_microbatches})",
            "virtual_stages": self.virtual_stages,
            "remat": self.remat,
            "seed": self.seed,
            "pinned": self.pinned,
            "batch_dim": self.batch_dim,
        }


def pipe_options(
    *,
    stages: Any = None,
    chunks: Any = None,
    micro_batch_size: Any = None,
    batch_dim: Any = 0,
    schedule: str | Schedule = "gpipe",
    virtual_stages: Any = None,
    remat: Any = "except_last",
    seed: Any = 0,
    pinned: Any = 0,
    fetch: Any = (),
    timeout: Any = 300.0,
    check_finite: Any = False,
    default_chunks: int | None = None,
) -> PipeOptions:
    """Check a pipe's shared options and return them in normal form; raise, naming the option
    and what to give instead, at the first bad one. With neither ``chunks`` nor
    ``micro_batch_size`` the pipe splits into ``default_chunks`` micro-batches, or (``None``)
    it refuses."""
    if chunks is None and micro_batch_size is None:
        if default_chunks is None:
            raise ValueError("give chunks= (micro-batches per step) or micro_batch_size=")
        chunks = default_chunks
    return PipeOptions(
        chunks=check.optional_count("chunks", chunks),
        micro_batch_size=check.optional_count("micro_batch_size", micro_batch_size),
        stages=check.optional_count("stages", stages),
        pinned=check.count("pinned", pinned, minimum=0),
        batch_dim=check.integer("batch_dim", batch_dim),
        remat=remat_mod.check_mode(remat),
        seed=check.integer("seed", seed),
        timeout=check.seconds("timeout", timeout),
        fetch=tuple(check.names("fetch", fetch)),
        schedule=ScheduleSpec(schedule, virtual_stages),
        check_finite=bool(check_finite),
    )


def schedule_digest(actions: Sequence[Sequence[Any]]) -> str:
    """A short hash of a built schedule's per-device action lists."""
    text = "|".join(" ".join(str(a) for a in acts) for acts in actions)
    return hashlib.sha256(text.encode()).hexdigest()[:12]
