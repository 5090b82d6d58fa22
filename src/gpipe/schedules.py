"""Pipeline schedules as data.

A schedule says, for every device of the pipeline, the ordered list of actions it runs in one
training step: ``F`` (forward of one micro-batch through one stage), ``B`` (backward; the full
backward, or only the input-gradient when the schedule also has ``W`` actions) and ``W`` (the
weight-gradient half of a split backward). Everything else in gpipe interprets this data: the
validator proves it can run, the simulator times it, and both runtimes execute it.

The invariant kept here: a :class:`Schedule` that exists has been validated — every
(kind, stage, micro-batch) occurs exactly once, on the device that owns the stage, and the
dependencies can be met in the listed order without deadlock.

Stages are *virtual*: with ``V`` virtual stages per device the model is cut into ``K·V`` stages and
stage ``s`` lives on device ``s % K`` (round-robin, as in interleaved 1F1B). With ``V = 1`` stage
and device are the same number.
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "KIND_WORDS",
    "Action",
    "Event",
    "Schedule",
    "ScheduleError",
    "ScheduleSpec",
    "available",
    "custom",
    "dependencies",
    "device_of",
    "execution_order",
    "get",
    "register",
    "validate",
]

Kind = Literal["F", "B", "W"]
KINDS: tuple[str, ...] = ("F", "B", "W")
#: What each kind of action does, in words (error messages and timelines).
KIND_WORDS: dict[str, str] = {"F": "forward", "B": "backward", "W": "weight-gradient"}


def device_of(stage: int, num_devices: int) -> int:
    """The device that runs (virtual) ``stage``: stages go round the devices (``s % K``), so
    with V virtual stages device ``d`` holds ``d, d + K, ..., d + (V-1)·K``."""
    return stage % num_devices


class ScheduleError(ValueError):
    """A schedule that cannot run: a missing or repeated action, or a deadlock."""


def _int(value: Any, name: str, minimum: int, error: type[Exception] = ValueError) -> int:
    """``value`` as an int >= ``minimum``; bools, floats and strings are refused by name."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _unknown(name: object) -> ValueError:
    close = difflib.get_close_matches(str(name).strip().lower(), available(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown schedule {name!r}{hint}; choose one of {available()}")


def _key(name: object) -> str:
    """A schedule name as the registry spells it: case, ``_`` and surrounding blanks ignored."""
    if not isinstance(name, str):
        raise TypeError(
            f"schedule must be a name (one of {available()}) or a Schedule, got "
            f"{type(name).__name__} {name!r}"
        )
    return name.strip().lower().replace("_", "-")


@dataclass(frozen=True, order=True)
class Action:
    """One unit of pipeline work: ``kind`` of micro-batch ``microbatch`` through ``stage``.

    ``stage`` is the virtual-stage index in ``[0, K·V)``; the device that runs it is
    ``stage % K``.
    """

    kind: str
    stage: int
    microbatch: int

    def __post_init__(self) -> None:
        s, m = self.stage, self.microbatch
        if type(s) is int and type(m) is int and s >= 0 and m >= 0 and self.kind in KINDS:
            return  # the common case, kept cheap: schedules and the simulator build many
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(f"Action kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("stage", "microbatch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(
                    f"Action {name} must be an int, got {type(value).__name__} {value!r}"
                )
            object.__setattr__(self, name, int(value))
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"Action indices must be >= 0, got {self}")

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@s{self.stage}"


@dataclass(frozen=True)
class Event:
    """An action that ran (or was simulated to run) on ``device`` from ``start`` to ``end``.

    Times are seconds for real runs and cost units for simulations. The timeline plotter in
    :mod:`gpipe.trace` draws both.
    """

    action: Action
    device: int
    start: float
    end: float


@dataclass(frozen=True)
class Schedule:
    """A validated schedule: ``actions[d]`` is device ``d``'s ordered action list.

    Build one with :func:`get` (a named schedule) or :func:`custom` (your own lists); both
    validate. ``split_backward`` is true when backward is split into ``B`` (input gradient) and
    ``W`` (weight gradient).
    """

    name: str
    num_devices: int
    num_microbatches: int
    virtual_stages: int
    actions: tuple[tuple[Action, ...], ...]
    split_backward: bool = field(default=False)

    @property
    def num_stages(self) -> int:
        """Number of (virtual) stages the model is cut into: ``K · V``."""
        return self.num_devices * self.virtual_stages

    def device_of(self, stage: int) -> int:
        """Device that runs virtual stage ``stage``."""
        return device_of(stage, self.num_devices)

    def stages_of(self, device: int) -> list[int]:
        """Virtual stages held by ``device``, in model order."""
        return list(range(device, self.num_stages, self.num_devices))

    @property
    def forward_backward_separable(self) -> bool:
        """True when every device runs all its ``F`` actions before any backward action.

        Only such schedules can run as ``pipe(x)`` followed by ``loss.backward()``; the others
        need the loss inside the pipeline (``Pipe.step``).
        """
        for acts in self.actions:
            seen_backward = False
            for a in acts:
                if a.kind == "F" and seen_backward:
                    return False
                seen_backward |= a.kind != "F"
        return True

    def forward_part(self) -> tuple[tuple[Action, ...], ...]:
        """The ``F`` prefix of each device's list (see :attr:`forward_backward_separable`)."""
        return tuple(tuple(a for a in acts if a.kind == "F") for acts in self.actions)

    def backward_part(self) -> tuple[tuple[Action, ...], ...]:
        """Each device's backward actions (``B`` and ``W``) in order."""
        return tuple(tuple(a for a in acts if a.kind != "F") for acts in self.actions)

    def __str__(self) -> str:
        lines = [
            f"{self.name}: K={self.num_devices} M={self.num_microbatches} V={self.virtual_stages}"
        ]
        for d, acts in enumerate(self.actions):
            lines.append(f"  device {d}: " + " ".join(str(a) for a in acts))
        return "\n".join(lines)


def dependencies(action: Action, num_stages: int, split_backward: bool) -> list[Action]:
    """The actions that must finish before ``action`` may start.

    ``F(s, m)`` needs ``F(s-1, m)``; ``B(s, m)`` needs ``F(s, m)`` and ``B(s+1, m)``;
    ``W(s, m)`` needs ``B(s, m)``. The last stage computes the loss inside its ``F``, so its
    ``B`` needs only its own ``F``.
    """
    s, m = action.stage, action.microbatch
    if action.kind == "F":
        return [Action("F", s - 1, m)] if s > 0 else []
    if action.kind == "B":
        deps = [Action("F", s, m)]
        if s < num_stages - 1:
            deps.append(Action("B", s + 1, m))
        return deps
    if not split_backward:
        raise ScheduleError(f"{action}: a W action needs a schedule with split backward")
    return [Action("B", s, m)]


def validate(
    actions: Sequence[Sequence[Action]],
    num_microbatches: int,
    virtual_stages: int = 1,
    name: str = "custom",
) -> Schedule:
    """Check ``actions`` and return it as a :class:`Schedule`.

    Proves that every (kind, stage, micro-batch) occurs exactly once on the device that owns
    the stage, and that executing each device's list in order never deadlocks (every device
    waits only on actions that another device will still run). Raises :class:`ScheduleError`
    naming the offending action, or, for a deadlock, the action each stuck device waits at and
    the dependency it waits for.
    """
    _check_lists(actions, "actions")
    k = len(actions)
    if k < 1:
        raise ScheduleError("a schedule needs at least one device")
    num_microbatches = _int(num_microbatches, "num_microbatches", 1, ScheduleError)
    virtual_stages = _int(virtual_stages, "virtual_stages", 1, ScheduleError)
    num_stages = k * virtual_stages
    lists = tuple(tuple(acts) for acts in actions)
    split = False
    seen: dict[Action, int] = {}
    for d, acts in enumerate(lists):
        for a in acts:
            if not isinstance(a, Action):
                raise ScheduleError(
                    f"device {d}: expected an Action, got {type(a).__name__} {a!r}; write "
                    "Action('F', stage, microbatch) or use custom() with strings like 'F0@s1'"
                )
            split = split or a.kind == "W"
            if a.stage >= num_stages:
                raise ScheduleError(
                    f"device {d}: {a} names stage {a.stage}, but the schedule has only "
                    f"{num_stages} stages (K={k} devices x V={virtual_stages})"
                )
            if a.microbatch >= num_microbatches:
                raise ScheduleError(
                    f"device {d}: {a} names micro-batch {a.microbatch}, but there are only "
                    f"{num_microbatches}"
                )
            if a.stage % k != d:
                raise ScheduleError(
                    f"device {d}: {a} belongs on device {a.stage % k} (stage s runs on device s % K)"
                )
            if a in seen:
                raise ScheduleError(f"device {d}: {a} occurs twice")
            seen[a] = d
    wanted = ("F", "B", "W") if split else ("F", "B")
    for kind in wanted:
        for s in range(num_stages):
            for m in range(num_microbatches):
                if Action(kind, s, m) not in seen:
                    raise ScheduleError(
                        f"action {Action(kind, s, m)} is missing (device {s % k} must run it)"
                    )

    execution_order(lists, num_stages, split, name)  # raises on a deadlock
    return Schedule(
        name=name,
        num_devices=k,
        num_microbatches=num_microbatches,
        virtual_stages=virtual_stages,
        actions=lists,
        split_backward=split,
    )


def execution_order(
    actions: Sequence[Sequence[Action]], num_stages: int, split_backward: bool, name: str = "custom"
) -> list[tuple[int, Action]]:
    """Replay every device's list in order and return ``(device, action)`` pairs in an order in
    which each action comes after all its dependencies (devices advance greedily in turn).

    Raises :class:`ScheduleError` when no device can advance: the schedule deadlocks. The
    message names, per stuck device, the action it waits at and the dependencies it waits for.
    """
    k = len(actions)
    done: set[Action] = set()
    order: list[tuple[int, Action]] = []
    pos = [0] * k
    remaining = sum(len(a) for a in actions)
    while remaining:
        progressed = False
        for d in range(k):
            acts = actions[d]
            while pos[d] < len(acts):
                a = acts[pos[d]]
                if all(dep in done for dep in dependencies(a, num_stages, split_backward)):
                    done.add(a)
                    order.append((d, a))
                    pos[d] += 1
                    remaining -= 1
                    progressed = True
                else:
                    break
        if not progressed:
            stuck = []
            for d in range(k):
                if pos[d] < len(actions[d]):
                    a = actions[d][pos[d]]
                    missing = [
                        str(dep)
                        for dep in dependencies(a, num_stages, split_backward)
                        if dep not in done
                    ]
                    stuck.append(f"device {d} stuck at {a} waiting for {', '.join(missing)}")
            raise ScheduleError(f"schedule {name!r} deadlocks: " + "; ".join(stuck))
    return order


def _check_lists(actions: Any, what: str) -> None:
    """``actions`` must be one list of actions per device (a flat list is a common slip)."""
    example = "e.g. [['F0@s0', 'B0@s0'], ['F0@s1', 'B0@s1']]"
    if isinstance(actions, (str, bytes)) or not isinstance(actions, Sequence):
        raise ScheduleError(
            f"{what} must be a list with one list of actions per device ({example}), got "
            f"{type(actions).__name__} {actions!r:.60}"
        )
    for d, acts in enumerate(actions):
        if isinstance(acts, (str, bytes, Action)) or not isinstance(acts, Sequence):
            raise ScheduleError(
                f"{what}[{d}] is {type(acts).__name__} {acts!r:.40}, not a list of actions: give "
                f"one list per device ({example})"
            )


def custom(
    actions: Sequence[Sequence[Action | str]], num_microbatches: int, virtual_stages: int = 1
) -> Schedule:
    """A user's own schedule, validated. Actions may be :class:`Action` or strings like ``"F3@s1"``."""
    _check_lists(actions, "actions")
    parsed = [[_parse(a) if isinstance(a, str) else a for a in acts] for acts in actions]
    return validate(parsed, num_microbatches, virtual_stages, name="custom")


def _parse(text: str) -> Action:
    try:
        head, stage = text.strip().split("@s")
        return Action(head[0], int(stage), int(head[1:]))
    except (ValueError, IndexError, TypeError):
        raise ScheduleError(
            f"cannot parse action {text!r}; write it as <kind><micro-batch>@s<stage> with kind "
            "F, B or W, e.g. 'F3@s1'"
        ) from None


# --------------------------------------------------------------------------- named schedules

Builder = Callable[..., list[list[Action]]]
_REGISTRY: dict[str, tuple[Builder, bool]] = {}


def register(name: str, *, virtual: bool = False) -> Callable[[Builder], Builder]:
    """Register ``fn(K, M, V) -> list of per-device action lists`` under ``name``.

    The name is stored as :func:`get` looks it up (lower case, ``-`` for ``_``), so
    ``register("My_Sched")`` is found by ``get("My_Sched", ...)``.
    """
    key = _key(name)
    if not key:
        raise ValueError("a schedule needs a non-empty name")

    def deco(fn: Builder) -> Builder:
        if not callable(fn):
            raise TypeError(f"register({name!r}) decorates a function, got {fn!r:.40}")
        _REGISTRY[key] = (fn, virtual)
        return fn

    return deco


def available() -> list[str]:
    """Names accepted by :func:`get`."""
    return sorted(_REGISTRY)


def get(
    name: str, num_devices: int, num_microbatches: int, *, virtual_stages: int | None = None
) -> Schedule:
    """The named schedule for ``num_devices`` devices and ``num_microbatches`` micro-batches.

    ``virtual_stages`` (V) applies to ``"interleaved"`` only (default 2); the other schedules
    have one stage per device.
    """
    key = _key(name)
    if key not in _REGISTRY:
        raise _unknown(name)
    num_devices = _int(num_devices, "num_devices", 1)
    num_microbatches = _int(num_microbatches, "num_microbatches", 1)
    if virtual_stages is not None:
        virtual_stages = _int(virtual_stages, "virtual_stages", 1)
    fn, virtual = _REGISTRY[key]
    if virtual:
        v = 2 if virtual_stages is None else virtual_stages
    else:
        if virtual_stages not in (None, 1):
            raise ValueError(
                f"schedule {name!r} has one stage per device; virtual_stages={virtual_stages} "
                "needs schedule='interleaved'"
            )
        v = 1
    return validate(fn(num_devices, num_microbatches, v), num_microbatches, v, name=key)


@register("gpipe")
def _gpipe(k: int, m: int, v: int) -> list[list[Action]]:
    """GPipe fill-drain: every forward, then every backward in reverse micro-batch order."""
    return [
        [Action("F", d, i) for i in range(m)] + [Action("B", d, i) for i in reversed(range(m))]
        for d in range(k)
    ]


@register("1f1b")
def _one_f_one_b(k: int, m: int, v: int) -> list[list[Action]]:
    """PipeDream-flush: ``K-d-1`` warm-up forwards, then alternate one forward, one backward.

    Device ``d`` holds at most ``K - d`` micro-batches of activations at once.
    """
    out = []
    for d in range(k):
        warm = min(k - d - 1, m)
        acts = [Action("F", d, i) for i in range(warm)]
        f, b = warm, 0
        while f < m:
            acts.append(Action("F", d, f))
            f += 1
            acts.append(Action("B", d, b))
            b += 1
        acts += [Action("B", d, i) for i in range(b, m)]
        out.append(acts)
    return out


@register("interleaved", virtual=True)
def _interleaved(k: int, m: int, v: int) -> list[list[Action]]:
    """Interleaved 1F1B (Megatron-LM): V model chunks per device, round-robin.

    Micro-batches go through the device's chunks in groups of ``K``; the forward order on a
    device is group-major (K micro-batches on chunk 0, the same K on chunk 1, ...), the backward
    order mirrors it from the last chunk. Warm-up is ``(K-d-1)·2 + (V-1)·K`` forwards, then one
    forward and one backward alternate. When ``M`` is not a multiple of ``K`` the last group is
    shorter; the schedule stays valid (checked by :func:`validate`).
    """
    total = m * v

    def fwd_order() -> list[tuple[int, int]]:
        order = []
        for g0 in range(0, m, k):
            group = range(g0, min(g0 + k, m))
            for c in range(v):
                order += [(c, i) for i in group]
        return order

    out = []
    for d in range(k):
        fo = fwd_order()
        bo = [(v - 1 - c, i) for c, i in fo]
        warm = min((k - d - 1) * 2 + (v - 1) * k, total)
        acts = [Action("F", c * k + d, i) for c, i in fo[:warm]]
        f, b = warm, 0
        while f < total:
            c, i = fo[f]
            acts.append(Action("F", c * k + d, i))
            f += 1
            c, i = bo[b]
            acts.append(Action("B", c * k + d, i))
            b += 1
        acts += [Action("B", c * k + d, i) for c, i in bo[b:]]
        out.append(acts)
    return out


@register("zb-h1")
def _zb_h1(k: int, m: int, v: int) -> list[list[Action]]:
    """Zero-bubble H1 (Qi et al., 2024): 1F1B with backward split into B and W.

    ``B`` (input gradient) stays on the critical path; ``W`` (weight gradient) is deferred.
    Device ``d`` runs ``K-d-1`` warm-up forwards, then pairs ``F B`` and, once ``d`` W's are
    owed, ``F B W``; the cool-down interleaves the remaining ``B`` with deferred ``W`` so that
    ``W`` fills the slots where 1F1B would idle. With ``F = B = W`` costs the idle time per
    device is ``(K-1)·(F+B-W)``, a third of 1F1B's ``(K-1)·(F+B+W)``. Every device holds at most
    ``K`` micro-batches of activations (1F1B's peak on device 0).
    """
    out = []
    for d in range(k):
        warm = min(k - d - 1, m)
        acts = [Action("F", d, i) for i in range(warm)]
        f = warm
        b = w = 0
        while f < m:
            acts.append(Action("F", d, f))
            f += 1
            acts.append(Action("B", d, b))
            b += 1
            if b - w > d:  # keep at most d weight-gradients deferred
                acts.append(Action("W", d, w))
                w += 1
        while b < m:
            acts.append(Action("B", d, b))
            b += 1
            if b - w > d:
                acts.append(Action("W", d, w))
                w += 1
        acts += [Action("W", d, i) for i in range(w, m)]
        out.append(acts)
    return out


class ScheduleSpec:
    """A pipe's ``schedule`` argument — a name or a built :class:`Schedule` — resolved once
    per micro-batch count. Both runtimes' pipes hold one.

    ``virtual_stages`` applies to ``"interleaved"`` (default 2); ``num_devices`` is fixed only
    when a built schedule was given.
    """

    def __init__(self, schedule: str | Schedule, virtual_stages: int | None = None) -> None:
        self._cache: dict[tuple[int, int], Schedule] = {}
        if isinstance(schedule, Schedule):
            if virtual_stages is not None and virtual_stages != schedule.virtual_stages:
                raise ValueError(
                    f"virtual_stages={virtual_stages} but the given schedule is built with "
                    f"{schedule.virtual_stages}; drop virtual_stages= or rebuild the schedule"
                )
            self.fixed: Schedule | None = schedule
            self.name = schedule.name
            self.virtual_stages = schedule.virtual_stages
            self.num_devices: int | None = schedule.num_devices
            return
        self.fixed = None
        self.name = _key(schedule)
        if self.name not in _REGISTRY:
            raise _unknown(schedule)
        if virtual_stages is not None:
            virtual_stages = _int(virtual_stages, "virtual_stages", 1)
        interleaved = _REGISTRY[self.name][1]
        if virtual_stages not in (None, 1) and not interleaved:
            raise ValueError(
                f"virtual_stages={virtual_stages} needs schedule='interleaved', not {schedule!r}"
            )
        self.virtual_stages = (
            (2 if virtual_stages is None else virtual_stages) if interleaved else 1
        )
        self.num_devices = None

    def get(self, num_devices: int, num_microbatches: int) -> Schedule:
        """The schedule for this many devices and micro-batches (validated, cached)."""
        if self.fixed is not None:
            if self.fixed.num_devices != num_devices:
                raise ValueError(
                    f"the given schedule is built for {self.fixed.num_devices} devices but the "
                    f"pipeline has {num_devices}; build it for {num_devices} devices"
                )
            if self.fixed.num_microbatches != num_microbatches:
                raise ValueError(
                    f"the given schedule is built for {self.fixed.num_microbatches} "
                    f"micro-batches but this batch splits into {num_microbatches}"
                )
            return self.fixed
        key = (num_devices, num_microbatches)
        if key not in self._cache:
            v = self.virtual_stages if _REGISTRY[self.name][1] else None
            self._cache[key] = get(self.name, num_devices, num_microbatches, virtual_stages=v)
        return self._cache[key]
