"""What a pipeline configuration holds in memory, per device, without running it.

A device holds, for its stages: the parameters and buffers, one gradient per parameter, the
optimizer's state (``OPTIMIZER_SLOTS`` tensors like each parameter: Adam keeps two, its
``exp_avg`` and ``exp_avg_sq``, in the parameter's own dtype — fp32 for an fp32 model), and
what each micro-batch keeps between its forward and its last backward action:

* not re-materialized: the tensors its forward's autograd graph saves (``LayerCost.saved_bytes``
  of the stage's layers; the last stage also keeps what the loss saves, assumed to be one more
  copy of its output, as cross-entropy keeps its log-probabilities);
* re-materialized: only its boundary input, plus, while its backward runs, the recomputed graph
  of that one micro-batch;
* after a split backward's ``B``, until its ``W``: what :mod:`gpipe.stage.wgrad` keeps for ``W`` —
  each standard module call's input and output gradient (``LayerCost.deferred_bytes``), or on
  a first stage, which captures nothing, the whole saved graph.

While a backward runs it also holds the gradients of the stage's output and input and a
workspace for the gradients inside it, taken as its largest layer's saved graph (one layer's
saved tensors each get a gradient before they are freed) — transient.
:func:`device_memory` walks each device's action list in the schedule's order and reports the
peak of that sum; :func:`process_peak` does the same over a simulated timeline for stages that
share one memory (the one-process pipe on a CPU).

The invariant: every figure is a deterministic function of the layer costs, the balance, the
schedule and the re-materialization mode, and grows (never shrinks) with what is kept — more
micro-batches in flight, less re-materialization, more optimizer slots.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from gpipe.schedules import Event, Schedule
from gpipe.stage.remat import check_mode, should_remat

__all__ = [
    "OPTIMIZER_SLOTS",
    "DeviceMemory",
    "StageMemory",
    "device_memory",
    "optimizer_slots",
    "parse_bytes",
    "parse_limit",
    "process_peak",
    "stage_memory",
]

#: Tensors of a parameter's size and dtype that each optimizer keeps per parameter.
OPTIMIZER_SLOTS: dict[str, int] = {"adam": 2, "adamw": 2, "sgd": 0, "momentum": 1, "none": 0}


def optimizer_slots(optimizer: str | int) -> int:
    """State tensors per parameter for ``optimizer`` (a name of ``OPTIMIZER_SLOTS`` or a count)."""
    if isinstance(optimizer, bool):
        raise TypeError(f"optimizer must be a name or a slot count, got {optimizer!r}")
    if isinstance(optimizer, int):
        if optimizer < 0:
            raise ValueError(f"optimizer slot count must be >= 0, got {optimizer}")
        return optimizer
    key = str(optimizer).strip().lower()
    if key not in OPTIMIZER_SLOTS:
        raise ValueError(
            f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZER_SLOTS)} or give "
            "the number of parameter-sized state tensors it keeps (Adam: 2)"
        )
    return OPTIMIZER_SLOTS[key]


_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_bytes(value: str | int | float) -> int:
    """``"8GiB"``, ``"512 MB"``, ``"1.5e9"`` or a number of bytes, as an int."""
    if isinstance(value, bool):
        raise TypeError(f"a memory size must be bytes or a string like '8GiB', got {value!r}")
    if isinstance(value, (int, float)):
        size = float(value)
    else:
        match = re.fullmatch(
            r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value)
        )
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"cannot read the memory size {value!r}; write a number of bytes or one with a "
                "unit such as '8GiB', '512MiB', '16GB'"
            )
        size = float(match.group(1)) * _UNITS[unit]
    if not math.isfinite(size):
        raise ValueError(
            f"a memory size must be a finite number of bytes, got {value!r}; for no limit pass "
            "memory_limit=None (or leave --memory-limit out)"
        )
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return int(size)


def parse_limit(value: str | int | float | None) -> int | None:
    """A memory limit in bytes; ``None`` or ``float("inf")`` mean no limit. Anything else is
    :func:`parse_bytes`'s (NaN and sizes too large to count are refused)."""
    if value is None or (isinstance(value, float) and value == math.inf):
        return None
    return parse_bytes(value)


@dataclass(frozen=True)
class StageMemory:
    """One (virtual) stage's bytes: its state, and what one micro-batch keeps on it."""

    params: int  # parameter bytes (also the gradients' bytes)
    buffers: int  # buffer bytes
    kept: int  # bytes a micro-batch keeps without re-materialization (its saved graph)
    input: int  # bytes of the stage's boundary input of one micro-batch
    output: int  # bytes of the stage's output of one micro-batch
    workspace: int = 0  # what a backward allocates on top: its largest layer's saved graph
    # what a split backward keeps from B to W: the standard calls' inputs and output gradients
    # (gpipe.stage.wgrad); the whole saved graph on a first stage, which captures nothing
    deferred: int = 0


def stage_memory(
    costs: Sequence, balance: Sequence[int], input_bytes: int, *, loss_copies: int = 1
) -> list[StageMemory]:
    """Per stage of ``balance``, from ``cost.profile``'s layer costs of one micro-batch.

    ``input_bytes`` is the first stage's input of one micro-batch; the last stage keeps
    ``loss_copies`` extra copies of its output for the loss's backward.
    """
    out, start = [], 0
    for s, n in enumerate(balance):
        layers = costs[start : start + n]
        kept = sum(c.saved_bytes for c in layers)
        if s == len(balance) - 1:
            kept += loss_copies * layers[-1].activation_bytes
        out.append(
            StageMemory(
                params=sum(c.param_bytes for c in layers),
                buffers=sum(c.buffer_bytes for c in layers),
                kept=kept,
                input=input_bytes if start == 0 else costs[start - 1].activation_bytes,
                output=layers[-1].activation_bytes,
                workspace=max(c.saved_bytes for c in layers),
                deferred=sum(c.deferred_bytes for c in layers) if start > 0 else kept,
            )
        )
        start += n
    return out


@dataclass(frozen=True)
class DeviceMemory:
    """Predicted peak bytes of one pipeline device, by what they hold."""

    parameters: int
    buffers: int
    gradients: int
    optimizer: int  # optimizer state (slots x parameter bytes)
    activations: int  # saved graphs of the micro-batches live at the peak
    remat_inputs: int  # boundary inputs of re-materialized micro-batches live at the peak
    transient: int  # one backward's recomputed graph and boundary gradients, at the peak

    @property
    def total(self) -> int:
        """Every term added up: the device's predicted peak."""
        return (
            self.parameters
            + self.buffers
            + self.gradients
            + self.optimizer
            + self.activations
            + self.remat_inputs
            + self.transient
        )


def _deltas(kind: str, st: StageMemory, remat: bool, split: bool) -> tuple[int, int, int, int]:
    """(graph bytes added, input bytes added, transient while it runs, freed at its end)."""
    if kind == "F":
        return (0, st.input, 0, 0) if remat else (st.kept, 0, 0, 0)
    if kind == "B":
        grads = st.input + st.output + st.workspace  # boundary gradients, inner gradients
        if split:  # B keeps W's part and frees the graph (kept, or recomputed from the input)
            if remat:
                return (st.deferred, 0, grads + st.kept, st.input)
            return (st.deferred, 0, grads, st.kept)
        return (0, 0, grads + (st.kept if remat else 0), st.input if remat else st.kept)
    return (0, 0, 0, st.deferred)  # W frees what B kept for it


def _static(stages: Sequence[StageMemory], slots: int) -> tuple[int, int, int]:
    params = sum(st.params for st in stages)
    return params, sum(st.buffers for st in stages), params * slots


def device_memory(
    schedule: Schedule,
    stages: Sequence[StageMemory],
    remat: str,
    optimizer: str | int = "adam",
) -> list[DeviceMemory]:
    """Each device's predicted peak, walking its actions in the schedule's order."""
    remat = check_mode(remat)
    slots = optimizer_slots(optimizer)
    m = schedule.num_microbatches
    if len(stages) != schedule.num_stages:
        raise ValueError(
            f"{len(stages)} stage memories for a schedule of {schedule.num_stages} stages"
        )
    out = []
    for d, acts in enumerate(schedule.actions):
        graph = inputs = 0
        best = (0, 0, 0)
        for a in (part for unit in acts for part in getattr(unit, "parts", (unit,))):
            st = stages[a.stage]
            add_g, add_i, transient, freed = _deltas(
                a.kind,
                st,
                should_remat(remat, a.microbatch, m),
                schedule.splits(a.stage, a.microbatch),
            )
            graph += add_g
            inputs += add_i
            if graph + inputs + transient > sum(best):
                best = (graph, inputs, transient)
            if freed:
                if a.kind == "B" and should_remat(remat, a.microbatch, m):
                    inputs -= freed
                else:
                    graph -= freed
        mine = [stages[s] for s, dev in enumerate(schedule.placement) if dev == d]
        params, buffers, opt = _static(mine, slots)
        out.append(DeviceMemory(params, buffers, params, opt, *best))
    return out


def process_peak(
    events: Sequence[Event],
    schedule: Schedule,
    stages: Sequence[StageMemory],
    remat: str,
    optimizer: str | int = "adam",
) -> int:
    """Peak bytes of all devices together over a (simulated) timeline — what one process whose
    stages share one memory holds at its worst moment."""
    remat = check_mode(remat)
    m = schedule.num_microbatches
    points: list[tuple[float, int]] = []
    for e in events:
        for a in getattr(e.action, "parts", (e.action,)):  # an overlapped pair: both parts
            st = stages[a.stage]
            add_g, add_i, transient, freed = _deltas(
                a.kind,
                st,
                should_remat(remat, a.microbatch, m),
                schedule.splits(a.stage, a.microbatch),
            )
            points.append((e.start, add_g + add_i + transient))  # allocated while it runs
            points.append((e.end, -transient - freed))
    points.sort(key=lambda p: (p[0], p[1]))  # at one instant, frees before allocations
    live = peak = 0
    for _, delta in points:
        live += delta
        peak = max(peak, live)
    params, buffers, opt = _static(stages, optimizer_slots(optimizer))
    return 2 * params + buffers + opt + peak
