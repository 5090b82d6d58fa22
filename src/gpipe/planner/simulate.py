"""Replay a schedule on a cost model: step time, bubble and live activations, without running it.

Every device runs its actions in the schedule's order; an action starts as soon as its device is
free and its dependencies have finished (plus ``comm_cost`` when a dependency ran on another
device, by the schedule's placement). The replay walks the schedule's integer codes in the
order its validation proved (flat lists, no per-action objects), so pipelines of a hundred
thousand actions simulate in a fraction of a second; the events are made only when asked for. The invariant: the simulated timeline respects exactly the dependencies that
:func:`gpipe.schedules.validate` checks and the runtimes enforce, so a schedule's simulated
bubble is the bubble the runtimes would show with those costs.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpipe.schedules import Event, Overlap, Schedule
from gpipe.schedules.codes import in_order

__all__ = ["SimResult", "compare", "simulate", "table"]


@dataclass(frozen=True)
class SimResult:
    """What :func:`simulate` predicts for one step.

    ``bubble`` is the idle fraction of device-time over the makespan; ``peak_activations[d]``
    is the largest number of (stage, micro-batch) activation sets device ``d`` holds at once
    (from its forward until its last backward action of that micro-batch). ``events`` is the
    timeline, drawable with :func:`gpipe.trace.plot_timeline`.
    """

    schedule: Schedule
    makespan: float
    bubble: float
    busy: tuple[float, ...]
    peak_activations: tuple[int, ...]
    _timeline: tuple[list[tuple[int, int, int]], list[float], list[float]] = field(
        repr=False, compare=False
    )
    _costs: list[float] = field(repr=False, compare=False)  # per action code

    @functools.cached_property
    def events(self) -> tuple[Event, ...]:
        """The timeline, one :class:`Event` per action in replay order (made on first use). An
        overlapped pair gives its forward then its backward, splitting the pair's time in
        proportion to their costs, as the runtimes record the two parts."""
        runs, starts, ends = self._timeline
        codec = self.schedule.codec
        unit = codec.unit
        out = []
        for (d, c), a, b in zip(in_order(self.schedule.codes, runs), starts, ends):
            u = unit(c)
            if isinstance(u, Overlap):
                cf, cb = (self._costs[p] for p in codec.parts(c))
                mid = a + (b - a) * (cf / (cf + cb) if cf + cb > 0 else 0.5)
                out += [Event(u.forward, d, a, mid), Event(u.backward, d, mid, b)]
            else:
                out.append(Event(u, d, a, b))
        return tuple(out)


def _number(value: Any, what: str) -> float:
    """``value`` as a finite, non-negative float (a bool or a string is not a cost)."""
    ok = not isinstance(value, (bool, str, bytes)) and (
        isinstance(value, numbers.Real) or getattr(value, "ndim", None) == 0
    )
    if not ok:
        raise TypeError(f"{what} must be a number, got {type(value).__name__} {value!r:.40}")
    v = float(value)
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{what} must be finite and non-negative, got {v}")
    return v


def _is_scalar(value: Any) -> bool:
    return isinstance(value, numbers.Real) or getattr(value, "ndim", None) == 0


def _per_stage(value: float | Sequence[float], n: int, what: str) -> list[float]:
    """One finite, non-negative cost per stage from a number or a sequence of ``n`` numbers."""
    if _is_scalar(value):
        return [_number(value, what)] * n
    if isinstance(value, (str, bytes, Mapping)) or not hasattr(value, "__iter__"):
        raise TypeError(
            f"{what} must be a number or a sequence of {n} numbers (one per stage), got "
            f"{type(value).__name__} {value!r:.40}"
        )
    vals = [_number(v, f"{what}[{i}]") for i, v in enumerate(value)]
    if len(vals) != n:
        raise ValueError(f"{what} has {len(vals)} entries but the schedule has {n} stages")
    return vals


def simulate(
    schedule: Schedule,
    forward_costs: float | Sequence[float] = 1.0,
    backward_costs: float | Sequence[float] | None = None,
    comm_cost: float = 0.0,
    *,
    weight_costs: float | Sequence[float] | None = None,
    overlap: float = 0.0,
    split_overhead: float = 0.0,
) -> SimResult:
    """Simulate one step of ``schedule``.

    Costs are per (virtual) stage, or one number for all. ``backward_costs`` is the whole
    backward of a stage (default twice the forward). For schedules that split backward,
    ``weight_costs`` is the ``W`` share of it (default half); a split ``B`` costs the rest, a
    ``B`` without a ``W`` (:meth:`~gpipe.schedules.Schedule.splits`) the whole backward.
    ``split_overhead`` is what splitting costs beyond that: a split micro-batch's ``B`` and
    ``W`` each take ``1 + split_overhead`` times their share (on a CPU the separate ``W`` reads
    every kept output gradient back from memory: about 0.05–0.15, BENCHMARKS.md). An
    :class:`~gpipe.schedules.Overlap` pair costs ``F + B − overlap·min(F, B)``: ``0`` (the
    default) runs the two in turn, as the CPU runtime does; ``1`` hides the shorter entirely.
    A dependency on another device (by the schedule's placement) adds ``comm_cost``.
    """
    if not isinstance(schedule, Schedule):
        raise TypeError(
            f"simulate takes a Schedule, e.g. gpipe.schedules.get('1f1b', K, M), got "
            f"{type(schedule).__name__} {schedule!r:.40}"
        )
    n = schedule.num_stages
    fwd = _per_stage(forward_costs, n, "forward_costs")
    bwd = _per_stage(
        [2 * f for f in fwd] if backward_costs is None else backward_costs, n, "backward_costs"
    )
    if schedule.split_backward:
        wgt = _per_stage(
            [b / 2 for b in bwd] if weight_costs is None else weight_costs, n, "weight_costs"
        )
        bad = [s for s, (w, b) in enumerate(zip(wgt, bwd)) if w > b]
        if bad:
            s = bad[0]
            raise ValueError(
                f"weight_costs must not exceed backward_costs (the W share is part of the whole "
                f"backward): stage {s} has weight cost {wgt[s]} > backward cost {bwd[s]}"
            )
    else:
        wgt = [0.0] * n
    comm_cost = _number(comm_cost, "comm_cost")
    overlap = _number(overlap, "overlap")
    split_overhead = _number(split_overhead, "split_overhead")
    if overlap > 1:
        raise ValueError(
            f"overlap must be in [0, 1] (the share of the shorter part of an overlapped pair "
            f"hidden behind the longer), got {overlap}"
        )
    return _replay(schedule, fwd, bwd, wgt, comm_cost, overlap, split_overhead)


def _replay(
    schedule: Schedule,
    fwd: list[float],
    bwd: list[float],
    wgt: list[float],
    comm: float,
    overlap: float,
    split_overhead: float,
) -> SimResult:
    """Time the schedule's stored replay order on flat per-action lists (see
    :mod:`gpipe.schedules.codes` for the integer layout)."""
    k = schedule.num_devices
    m = schedule.num_microbatches
    codec = schedule.codec
    N, first_w, top, last_b = codec.N, codec.first_w, codec.top, codec.last_b
    cost = (
        [f for f in fwd for _ in range(m)]
        + [b - w for b, w in zip(bwd, wgt) for _ in range(m)]
        + [w for w in wgt for _ in range(m)]
    )
    if schedule.split_backward and (split_overhead or schedule.num_split < N):
        grow = 1.0 + split_overhead
        for i, split in enumerate(schedule.split_flags()):
            if split:
                cost[N + i] *= grow
                cost[first_w + i] *= grow
            else:  # B is the whole backward
                cost[N + i] = bwd[i // m]
    dev = [d for d in schedule.placement for _ in range(m)] * 3
    fin = [0.0] * top
    free = [0.0] * k
    busy = [0.0] * k
    starts: list[float] = []
    ends: list[float] = []
    add_start, add_end = starts.append, ends.append
    codes = schedule.codes
    # Only a dependency on another device can hold an action back: one on its own device ran
    # earlier in the device's list (the validator proved it), so the device's clock already
    # covers it. That leaves at most one per action: F(s-1, m) for F(s, m), B(s+1, m) for
    # B(s, m). The replay order comes as runs of one device's consecutive units.
    for d, start, stop in schedule.replay_order:
        now = free[d]
        spent = busy[d]
        for c in codes[d][start:stop]:
            t = now
            if c < N:
                if c >= m:
                    r = fin[c - m]
                    if comm and dev[c - m] != d:
                        r += comm
                    if r > t:
                        t = r
            elif c < last_b:
                r = fin[c + m]
                if comm and dev[c + m] != d:
                    r += comm
                if r > t:
                    t = r
            elif c >= top:  # an overlap: both parts' dependencies, both parts' costs
                f, b = divmod(c - top, N)
                b += N
                if f >= m:
                    r = fin[f - m]
                    if comm and dev[f - m] != d:
                        r += comm
                    if r > t:
                        t = r
                if b < last_b:
                    r = fin[b + m]
                    if comm and dev[b + m] != d:
                        r += comm
                    if r > t:
                        t = r
                cf, cb = cost[f], cost[b]
                now = t + cf + cb
                if overlap:
                    now -= overlap * (cf if cf < cb else cb)
                fin[f] = fin[b] = now
                spent += now - t
                add_start(t)
                add_end(now)
                continue
            now = t + cost[c]
            fin[c] = now
            spent += now - t
            add_start(t)
            add_end(now)
        free[d] = now
        busy[d] = spent

    makespan = max(free) if starts else 0.0
    bubble = 1.0 - sum(busy) / (k * makespan) if makespan > 0 else 0.0
    return SimResult(
        schedule=schedule,
        makespan=makespan,
        bubble=bubble,
        busy=tuple(busy),
        peak_activations=schedule.peak_activations,
        _timeline=(schedule.replay_order, starts, ends),
        _costs=cost,
    )


def compare(
    names: Sequence[str],
    num_devices: int,
    num_microbatches: int,
    forward_costs: float | Sequence[float] = 1.0,
    backward_costs: float | Sequence[float] | None = None,
    comm_cost: float = 0.0,
    *,
    virtual_stages: int = 2,
) -> list[tuple[str, SimResult]]:
    """Simulate several named schedules on the same per-device costs.

    Costs are given per *device* (the whole model's share on it); an interleaved schedule splits
    each device's cost evenly over its ``virtual_stages`` chunks. Returns ``(name, result)``
    pairs in the order given — the data behind ``gpipe plan``'s schedule table.
    """
    from gpipe.schedules import get, interleaving

    if isinstance(names, (str, bytes)) or not hasattr(names, "__iter__"):
        raise TypeError(f"names must be a list of schedule names, e.g. [{names!r}], got {names!r}")
    names = list(names)
    if isinstance(num_devices, bool) or not isinstance(num_devices, numbers.Integral):
        raise TypeError(f"num_devices must be an int, got {type(num_devices).__name__}")
    if num_devices < 1:
        raise ValueError(f"num_devices must be >= 1, got {num_devices}")
    fwd = _per_stage(forward_costs, num_devices, "forward_costs")
    bwd = _per_stage(
        [2 * f for f in fwd] if backward_costs is None else backward_costs,
        num_devices,
        "backward_costs",
    )
    out = []
    for name in names:
        # the name as get() reads it, so "Interleaved" gets virtual_stages too
        key = name.strip().lower().replace("_", "-") if isinstance(name, str) else name
        v = virtual_stages if key in interleaving() else None
        sched = get(name, num_devices, num_microbatches, virtual_stages=v)
        vv = sched.virtual_stages
        f = [fwd[sched.placement[s]] / vv for s in range(sched.num_stages)]
        b = [bwd[sched.placement[s]] / vv for s in range(sched.num_stages)]
        out.append((name, simulate(sched, f, b, comm_cost)))
    return out


def table(rows: Sequence[tuple[str, SimResult]], *, activation_bytes: float | None = None) -> str:
    """A markdown table of :func:`compare`'s rows: step time, bubble, peak live activations.

    With ``activation_bytes`` (what one micro-batch keeps alive on a stage) the peak is also
    given in MiB per device.
    """
    if isinstance(rows, SimResult) or not hasattr(rows, "__iter__"):
        raise TypeError(
            f"rows must be a list of (name, SimResult) pairs as compare() returns, got "
            f"{type(rows).__name__}; for one result write table([(name, result)])"
        )
    rows = list(rows)
    for i, row in enumerate(rows):
        if not (isinstance(row, tuple) and len(row) == 2 and isinstance(row[1], SimResult)):
            raise TypeError(
                f"rows[{i}] is {row!r:.60}; each row must be a (name, SimResult) pair as "
                "compare() returns"
            )
    if activation_bytes is not None:
        activation_bytes = _number(activation_bytes, "activation_bytes")
    head = "| schedule | step time | bubble | peak live micro-batches per device |"
    sep = "| --- | ---: | ---: | --- |"
    if activation_bytes is not None:
        head += " peak MiB per device |"
        sep += " --- |"
    lines = [head, sep]
    for name, r in rows:
        peaks = ", ".join(str(p) for p in r.peak_activations)
        line = f"| {name} | {r.makespan:.4g} | {r.bubble:.1%} | {peaks} |"
        if activation_bytes is not None:
            mib = ", ".join(f"{p * activation_bytes / 2**20:.1f}" for p in r.peak_activations)
            line += f" {mib} |"
        lines.append(line)
    return "\n".join(lines)
