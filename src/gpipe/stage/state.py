"""What a stage keeps between its actions: one step's state, one micro-batch's saved values,
and what a forward hands on.

The invariant: a :class:`StepState` belongs to one step (a ``pipe(x)`` call or a ``step``)
and is never shared by two; everything a micro-batch left on a stage is in its ``saved``
entry, until that micro-batch's last backward action removes it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gpipe.stage import wgrad
from gpipe.stage.amp import Autocast

__all__ = ["SavedMicrobatch", "StageOutput", "StepState"]


@dataclass
class StageOutput:
    """What ``Stage.forward`` produced: the boundary value, the loss (last stage, when a loss
    function was given) and the activations fetched from named inner layers."""

    value: Any
    loss: torch.Tensor | None
    fetched: dict[str, Any]


@dataclass
class SavedMicrobatch:
    """What a stage keeps of one micro-batch's forward for its backward actions."""

    inputs: Any
    outputs: Any  # output pytree (or scaled loss) with its graph, or None when re-materialized
    remat: bool
    target: Any
    out_tensors: list[torch.Tensor] | None = None  # for a deferred W
    out_grads: list[torch.Tensor | None] | None = None
    calls: wgrad.Calls | None = None  # standard modules' calls, for a W without the graph
    draws: dict | None = None  # random modules' generator states (gpipe.stage.rng_replay)


@dataclass
class StepState:
    """What one step (a ``pipe(x)`` call, or a ``step``) keeps on a stage between its actions.

    A new one is made by :meth:`Stage.begin_step`. ``pipe(x)`` holds on to each stage's state
    until its backward, so two forwards before one backward (siamese losses, two views of a
    batch) each keep their own random-stream step and saved activations, and the backward of
    either one recomputes and differentiates exactly what its own forward ran.
    """

    step: int = 0
    num_microbatches: int = 1
    grad_mode: bool = True
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    loss_scale: float | Sequence[float] = 1.0  # one for all, or each micro-batch's
    saved: dict[int, SavedMicrobatch] = field(default_factory=dict)
    # id(borrowed parameter) → this step's alias (:mod:`gpipe.stage.shared_params`)
    aliases: dict[int, nn.Parameter] = field(default_factory=dict)
    # the caller's autocast when the step began: its forwards (and recomputes) run under it
    autocast: Autocast = field(default_factory=Autocast)
