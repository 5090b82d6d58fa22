"""``schedule="auto"``: a pipe asks the planner for its configuration at its first step.

``Pipe(model, schedule="auto")`` (or ``schedule=gpipe.Auto(memory_limit="8GiB", ...)``)
builds nothing until its first batch arrives; then :meth:`Auto.rank` runs
:func:`gpipe.planner.autoplan.autoplan` on that batch for the pipe's devices and the pipe takes the
top configuration — schedule, virtual stages, balance, re-materialization and, unless the user
fixed ``chunks`` or ``micro_batch_size``, the micro-batch count.

The invariant: the pipe then runs exactly the configuration ranked first (``Pipe.plan``), so
what ``gpipe plan --auto`` prints for the same model, batch and devices is what trains; and
like every configuration it computes the un-pipelined model's gradients.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gpipe.planner import memory_model as mm
from gpipe.planner.autoplan import Configuration, autoplan, check_search

__all__ = ["Auto"]

#: the planner's options an ``Auto`` passes on as given (the others it sets itself)
SEARCH_OPTIONS = tuple(
    name
    for name, p in inspect.signature(autoplan).parameters.items()
    if p.kind is p.KEYWORD_ONLY
    and name not in ("devices", "memory_limit", "batch_size", "optimizer", "measure", "pinned")
)
_CHECKED = tuple(inspect.signature(check_search).parameters)


class Auto:
    """The options of the planner for ``schedule="auto"``; see :func:`gpipe.planner.autoplan.autoplan`.

    ``memory_limit`` defaults to each CUDA device's total memory (no limit on CPUs).
    ``optimizer`` names the optimizer whose state counts (default Adam: two slots).
    ``tune``: time the planner's first ``tune`` configurations that fit on the first batch
    (:func:`gpipe.local.race.race`, ``tune_steps`` timed steps each in two rounds) and take
    the measured fastest; the first call must then be ``pipe.step(inputs, targets, loss_fn)``.
    ``0`` (the default) takes the planner's top configuration untimed.
    """

    def __init__(
        self,
        memory_limit: int | str | None = None,
        optimizer: str | int = "adam",
        measure: bool = False,
        tune: int = 0,
        tune_steps: int = 2,
        **search: Any,
    ) -> None:
        for name, value, least in (("tune", tune, 0), ("tune_steps", tune_steps, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"Auto: {name} must be an integer >= {least}, got {value!r}")
        unknown = sorted(set(search) - set(SEARCH_OPTIONS))
        if unknown:
            near = {u: difflib.get_close_matches(u, SEARCH_OPTIONS, n=1) for u in unknown}
            hints = "".join(f" ({u!r}: did you mean {c[0]!r}?)" for u, c in near.items() if c)
            raise TypeError(
                f"Auto got unknown option(s) {unknown}{hints}; it takes memory_limit, "
                f"optimizer, measure, tune, tune_steps and the planner's {list(SEARCH_OPTIONS)}"
            )
        check_search(**{k: v for k, v in search.items() if k in _CHECKED})
        mm.parse_limit(memory_limit)
        mm.optimizer_slots(optimizer)
        self.memory_limit = memory_limit
        self.optimizer = optimizer
        self.measure = measure
        self.tune, self.tune_steps = tune, tune_steps
        self.search = search
        self.chunks: int | None = None  # the pipe's own chunks, when the user fixed them
        #: the timed configurations, fastest first, once ``tune`` has run
        self.measured: list[Any] | None = None

    @staticmethod
    def of(schedule: Any) -> Auto | None:
        """An :class:`Auto` for ``"auto"`` or an ``Auto`` given; ``None`` for anything else."""
        if isinstance(schedule, Auto):
            return schedule
        if isinstance(schedule, str) and schedule.strip().lower() == "auto":
            return Auto()
        return None

    def _limit(self, devices: Sequence[torch.device]) -> int | str | None:
        if self.memory_limit is not None:
            return self.memory_limit
        cuda = [d for d in devices if d.type == "cuda"]
        if not cuda:
            return None
        return min(torch.cuda.get_device_properties(d).total_memory for d in cuda)

    def rank(
        self,
        layers: Sequence[nn.Module],
        inputs: tuple,
        devices: Sequence[torch.device],
        *,
        chunks: int | None,
        batch_rows: int,
        pinned: int = 0,
        stepping: bool = False,
    ) -> list[Configuration]:
        """The planner's ranking for one batch ``inputs`` (``batch_rows`` rows, bound to the
        first layer's arguments) on ``devices``, best first; ``chunks`` fixes M when the user
        gave it. The pipe takes the first, or with ``tune`` races the top ones itself
        (:func:`gpipe.local.race.race`) and records them in :attr:`measured`; ``stepping`` says
        whether the first call is ``step`` (tuning times training steps, so it must be)."""
        if self.tune and not stepping:
            raise ValueError(
                f"Auto(tune={self.tune}) times training steps on the first batch, so the first "
                "call must be pipe.step(inputs, targets, loss_fn), not pipe(inputs); or use "
                "Auto(tune=0) for the planner's choice untimed"
            )
        search = dict(self.search)
        if chunks is not None:
            search["chunks"] = [chunks]
        return autoplan(
            list(layers),
            inputs,
            devices=list(devices),
            memory_limit=self._limit(devices),
            batch_size=batch_rows,
            optimizer=self.optimizer,
            measure=self.measure,
            pinned=pinned,
            **search,
        )

    def for_distributed(
        self,
        module: Any,
        sample: Any,
        *,
        stages: int,
        data_parallel: int,
        chunks: int | None,
        fixed: tuple[Any, Any] = (None, None),
        batch_dim: int = 0,
        pinned: int = 0,
    ) -> Configuration:
        """The top configuration for ``DistributedPipe``: planned at construction on its
        global ``sample`` (each replica gets ``1 / data_parallel`` of the rows), on ``stages``
        separate devices. FLOP-based only, so that every rank reaches the same plan."""
        from gpipe.base.microbatch import tree_flatten
        from gpipe.capture.sequence import layers_of

        if sample is None:
            raise ValueError(
                "DistributedPipe(schedule='auto') plans at construction: pass sample=<one "
                "global mini-batch> (real or meta tensors)"
            )
        if fixed != (None, None):
            raise ValueError(
                "DistributedPipe(schedule='auto') chooses the balance and the micro-batch size; "
                "drop balance= and micro_batch_size= (chunks= may fix M)"
            )
        if self.tune:
            raise ValueError(
                "DistributedPipe(schedule='auto') cannot tune: each rank would time "
                "differently and choose differently; use Auto(tune=0), or tune the local "
                "gpipe.Pipe and pass its choice to DistributedPipe"
            )
        if self.measure:
            raise ValueError(
                "DistributedPipe(schedule='auto') cannot measure=True: each rank would time "
                "differently and choose differently; use FLOP-based costs"
            )
        inputs = sample if isinstance(sample, tuple) else (sample,)
        leaves = [v for _, v in tree_flatten(inputs)[0] if isinstance(v, torch.Tensor) and v.dim()]
        rows = leaves[0].shape[batch_dim] // data_parallel
        search = dict(self.search)
        if chunks is not None:
            search["chunks"] = [chunks]
        return autoplan(
            [m for _, m in layers_of(module, "DistributedPipe")],
            inputs,
            devices=stages,
            memory_limit=self.memory_limit,
            batch_size=rows,
            optimizer=self.optimizer,
            pinned=pinned,
            **search,
        )[0]
