"""The executor loop every runtime shares: walk one device's actions, move boundary values.

The loop is the only place that knows what an action means: ``F`` takes the stage's input
(the micro-batch, or what the previous stage sent), runs the stage and sends the output on;
``B`` takes the output gradient (from the user, the loss, or the next stage), runs backward and
sends the input gradient back; ``W`` runs the deferred weight gradient. A runtime supplies a
:class:`Transport` (queues between threads, or ``torch.distributed`` P2P between processes).

The invariant: every failure leaves this loop as a :class:`StageError` naming the stage,
device, action and micro-batch, with the original exception as its cause — or as
:class:`Aborted` when another device failed first.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from gpipe.base.microbatch import tree_detach, tree_flatten
from gpipe.schedules import KIND_WORDS, Action, Event, Overlap
from gpipe.stage.stage import Stage

__all__ = [
    "Aborted",
    "StageError",
    "StepData",
    "Timeline",
    "Transport",
    "execute",
    "resolve_gpu_times",
]


class Aborted(Exception):
    """Raised in a device's loop when another device failed and the step was abandoned."""


class StageError(RuntimeError):
    """An exception raised while running ``action`` on ``stage``; the original is ``__cause__``."""

    def __init__(
        self, action: Action, device_index: int, error: BaseException, rank: int | None = None
    ):
        self.action = action
        self.stage = action.stage
        self.microbatch = action.microbatch
        self.device = device_index  # the pipeline device's index (public name kept)
        self.rank = rank
        where = f"rank {rank}, " if rank is not None else ""
        super().__init__(
            f"{where}stage {action.stage} (device {device_index}) failed in "
            f"{KIND_WORDS[action.kind]} of micro-batch {action.microbatch}: "
            f"{type(error).__name__}: {error}"
        )


class Transport(Protocol):
    """Moves boundary pytrees between stages, tagged by (kind, destination stage, micro-batch).

    ``kind`` is ``"act"`` (a forward output, sent to the next stage) or ``"grad"`` (an input
    gradient, sent to the previous stage). ``recv`` blocks until the value arrives, raising
    :class:`Aborted` if the step is abandoned and ``TimeoutError`` past the transport's limit.
    """

    def send(self, kind: str, stage: int, microbatch: int, value: Any) -> None: ...

    def recv(self, kind: str, stage: int, microbatch: int) -> Any: ...


@dataclass
class StepData:
    """One step's inputs and results, shared by the devices' loops (each writes its own keys)."""

    num_stages: int
    # per micro-batch, for stage 0 (a runtime may give a sequence whose item ``m``, when read,
    # orders the reader after that micro-batch's copy to its device)
    inputs: Sequence[Any] | None = None
    targets: Sequence[Any] | None = None  # per micro-batch, for the last stage's loss
    grad_outputs: Sequence[Any] | None = None  # per micro-batch, for the last stage (no loss)
    # whether the backward of (stage, micro-batch) is split into B and W: the schedule's
    # ``Schedule.splits``; the bridge's inputs-only backward splits every one (and runs no W)
    splits: Callable[[int, int], bool] = field(default=lambda stage, microbatch: False)
    # the last stage's outputs, per micro-batch: the values (detached) when the caller returns
    # them; otherwise only their shapes (tensors on the meta device), so a step whose loss is
    # computed inside holds no logits beyond their micro-batch's backward
    keep_outputs: bool = True
    outputs: dict[int, Any] = field(default_factory=dict)
    losses: dict[int, Any] = field(default_factory=dict)
    input_grads: dict[int, Any] = field(default_factory=dict)
    fetched: dict[int, dict[str, Any]] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    # per device: the most micro-batches whose state (activations or inputs kept for
    # backward) its stages held at once — the runtime's measure of the simulator's
    # ``peak_activations``
    peak_live: dict[int, int] = field(default_factory=dict)
    t0: float = field(default_factory=time.perf_counter)
    # On GPUs an action's host times say when its kernels were queued, not when they ran:
    # each device's loop records CUDA events around its actions (``gpu_marks``) against one
    # reference event per device (``gpu_ref``: the event and its host time), and
    # :func:`resolve_gpu_times` (or a :class:`Timeline`, read late) turns them into
    # ``events`` times after the step.
    gpu_marks: list[tuple[Action, int, Any, Any]] = field(default_factory=list)
    gpu_ref: dict[int, tuple[Any, float]] = field(default_factory=dict)
    cancelled: bool = False  # set when the step is abandoned; loops stop before the next action


def execute(
    device_index: int,
    actions: Sequence[Action | Overlap],
    stages: dict[int, Stage],
    transport: Transport,
    data: StepData,
    rank: int | None = None,
) -> None:
    """Run ``actions`` of device ``device_index`` in order on ``stages`` (its stages by index).

    A boundary value between two stages that are both in ``stages`` (consecutive stages on one
    device, as V-shaped placements have) is handed over here, never through ``transport``.

    An :class:`~gpipe.schedules.Overlap` runs its forward, then its backward. A GPU runtime
    would issue the two on separate streams so that one's compute hides the other's
    communication (DualPipe's overlapped chunk); on the CPU they run in turn, and each part is
    timed and counted as its own action.
    """
    last = data.num_stages - 1
    gpu = any(_timed_by_events(getattr(st, "device", None)) for st in stages.values())
    if gpu:
        data.gpu_ref.setdefault(device_index, (_event(), time.perf_counter() - data.t0))
    local: dict[tuple[str, int, int], Any] = {}  # handoffs between this device's own stages
    for a in (a for u in actions for a in u.parts):
        if data.cancelled:
            raise Aborted()
        st = stages[a.stage]
        m = a.microbatch
        start = time.perf_counter()
        ev0 = _event() if gpu else None
        try:
            if a.kind == "F":
                if a.stage == 0:
                    assert data.inputs is not None
                    x = data.inputs[m]
                elif a.stage - 1 in stages:
                    x = local.pop(("act", a.stage, m))
                else:
                    x = transport.recv("act", a.stage, m)
                    start = time.perf_counter()
                    ev0 = _event() if gpu else None
                target = data.targets[m] if (a.stage == last and data.targets is not None) else None
                res = st.forward(m, x, target, split=data.splits(a.stage, m))
                if res.fetched:
                    data.fetched.setdefault(m, {}).update(res.fetched)
                if a.stage == last:
                    data.outputs[m] = (
                        tree_detach(res.value) if data.keep_outputs else _shapes(res.value)
                    )
                    if res.loss is not None:
                        data.losses[m] = res.loss.detach()
                elif a.stage + 1 in stages:
                    local[("act", a.stage + 1, m)] = res.value
                else:
                    transport.send("act", a.stage + 1, m, res.value)
            elif a.kind == "B":
                if a.stage == last:
                    g = data.grad_outputs[m] if data.grad_outputs is not None else None
                elif a.stage + 1 in stages:
                    g = local.pop(("grad", a.stage, m))
                else:
                    g = transport.recv("grad", a.stage, m)
                    start = time.perf_counter()
                    ev0 = _event() if gpu else None
                gin = st.backward(m, g, split=data.splits(a.stage, m))
                if a.stage == 0:
                    data.input_grads[m] = gin
                elif a.stage - 1 in stages:
                    local[("grad", a.stage - 1, m)] = gin
                else:
                    transport.send("grad", a.stage - 1, m, gin)
            else:
                st.backward_weight(m)
        except (Aborted, StageError):
            raise
        except Exception as e:
            raise StageError(a, device_index, e, rank) from e
        data.events.append(Event(a, device_index, start - data.t0, time.perf_counter() - data.t0))
        if gpu:
            data.gpu_marks.append((a, device_index, ev0, _event()))
        live = sum(len(s.pending) for s in stages.values())
        if live > data.peak_live.get(device_index, 0):
            data.peak_live[device_index] = live


def _shapes(obj: Any) -> Any:
    """``obj`` with every tensor replaced by a meta tensor of its shape and dtype."""
    leaves, rebuild = tree_flatten(obj)
    return rebuild(
        [
            torch.empty(v.shape, dtype=v.dtype, device="meta") if isinstance(v, torch.Tensor) else v
            for _, v in leaves
        ]
    )


def _timed_by_events(device: torch.device | None) -> bool:
    """Whether actions on ``device`` are timed by device events (CUDA), not host clocks."""
    return device is not None and device.type == "cuda"


def _event() -> Any:
    """A recorded timing event on the current stream of the current device."""
    ev = torch.cuda.Event(enable_timing=True)
    ev.record()
    return ev


@dataclass
class Timeline:
    """A step's timeline whose GPU times are read late: ``events`` in host times, and the CUDA
    events recorded around the actions that ran on GPUs (``marks``) against one reference
    event per device (``ref``: the event and its host time). Holding one keeps no tensor
    alive; reading it (:meth:`resolved`) waits only for events not yet complete, so a step
    never waits for the GPU to drain unless its timings are asked for."""

    events: list[Event]
    marks: list[tuple[Action, int, Any, Any]] = field(default_factory=list)
    ref: dict[int, tuple[Any, float]] = field(default_factory=dict)

    @classmethod
    def of(cls, data: StepData) -> Timeline:
        """The timing part of ``data`` (its lists are taken over, not copied)."""
        return cls(data.events, data.gpu_marks, data.gpu_ref)

    def ready(self) -> bool:
        """Whether every CUDA event has completed (``event.query()``: no waiting)."""
        return all(ev1.query() for _, _, ev0, ev1 in self.marks if ev0 is not None)

    def resolved(self) -> list[Event]:
        """The events, sorted by start, with the times of actions that ran on GPUs replaced by
        their devices' own (seconds from the step's start, from each device's reference
        event); waits for the events not yet complete. A step that failed, whose events
        cannot all be read, keeps its host times."""
        if self.marks:
            with contextlib.suppress(RuntimeError):  # a failed step keeps its host times
                self.events = _device_times(self.events, self.marks, self.ref)
            self.marks = []
        return sorted(self.events, key=lambda e: (e.start, e.device))


def _device_times(
    events: list[Event], marks: list[tuple[Action, int, Any, Any]], ref: dict[int, Any]
) -> list[Event]:
    out = list(events)
    index = {(e.action, e.device): i for i, e in enumerate(out)}
    for a, dev, ev0, ev1 in marks:
        i = index.get((a, dev))
        if i is None or ev0 is None:
            continue
        ref_ev, host = ref[dev]
        ev1.synchronize()  # at once where it already completed (``ready``)
        start = host + ref_ev.elapsed_time(ev0) / 1e3
        out[i] = Event(a, dev, start, host + ref_ev.elapsed_time(ev1) / 1e3)
    return out


def resolve_gpu_times(data: StepData) -> None:
    """Replace the host times of actions that ran on GPUs by their devices' own: seconds from
    the step's start, from each device's reference event (waits for the events to complete,
    so call it after the step). A no-op for CPU-only steps."""
    if not data.gpu_marks:
        return
    data.events[:] = _device_times(data.events, data.gpu_marks, data.gpu_ref)
    data.gpu_marks.clear()
