"""The planner's top configurations timed for real: the measured fastest is the choice.

:func:`gpipe.planner.autoplan.autoplan` ranks every configuration by a model of its step time; on a
real machine that model is off by a few percent to tens of percent (per-action overheads,
two workers slowing each other, a split backward's extra memory traffic), and the top few
are often that close. :func:`autotune` builds a :class:`gpipe.Pipe` for each of the top
``n`` configurations that fit, on the user's own model and batch, and races them
(:func:`gpipe.local.race.race`); :func:`table` prints the result beside the predictions.

The invariant: tuning leaves no trace on the model (:func:`gpipe.local.race.preserved`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

from gpipe.base.texttable import text_table
from gpipe.core.reduction import Reduction
from gpipe.local.pipe import Pipe
from gpipe.local.race import Measured, median_time, preserved, race
from gpipe.planner.autoplan import Configuration

__all__ = ["Measured", "autotune", "median_time", "preserved", "table"]


def autotune(
    module: nn.Module,
    ranked: Sequence[Configuration],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    devices: Any = None,
    top: int = 4,
    steps: int = 2,
    warmup: int = 1,
    rounds: int = 2,
    close: float = 0.05,
    reduction: Reduction = "mean",
) -> list[Measured]:
    """Time the first ``top`` configurations of ``ranked`` that fit (an :func:`autoplan`
    ranking), each as a :class:`gpipe.Pipe` over ``module`` on ``devices`` (default: the
    pipe's), with one real batch (``inputs``, ``targets``, ``loss_fn`` and ``reduction`` as
    for :meth:`gpipe.Pipe.step`), and return them measured, fastest first; the rounds, the
    race of the close ones and what is restored are :func:`gpipe.local.race.race`'s."""
    build = partial(Pipe.from_configuration, module, devices=devices)
    return race(
        module,
        ranked,
        inputs,
        targets,
        loss_fn,
        build=build,
        top=top,
        steps=steps,
        warmup=warmup,
        rounds=rounds,
        close=close,
        reduction=reduction,
    )


def table(measured: Sequence[Measured]) -> str:
    """A plain-text table: each configuration's planner rank, prediction and measurement."""
    head = ("#", "plan #", "configuration", "predicted", "measured", "error")
    best = measured[0].step_time if measured else 0.0
    rows = []
    for i, x in enumerate(measured):
        c = x.configuration
        ratio = f" ({x.step_time / best:.2f}x)" if i else ""
        predicted, measured_ms = f"{c.step_time * 1e3:.1f} ms", f"{x.step_time * 1e3:.1f} ms"
        rows.append(
            (
                str(i + 1),
                str(c.rank),
                c.describe(),
                predicted,
                measured_ms + ratio,
                f"{x.error:+.0%}",
            )
        )
    return text_table(head, rows)
