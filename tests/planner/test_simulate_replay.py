"""The fast replay (integer codes, flat lists) against a straightforward one written here.

The reference walks Action objects with a dictionary of finish times, exactly as the
dependencies are stated (F(s) after F(s-1); B(s) after F(s) and B(s+1); W after B; an overlap
after both parts' dependencies), on random deadlock-free schedules — random topological orders
of every action, some adjacent F/B pairs fused into overlaps, random placements — and on
random lists that may deadlock, which both must refuse alike.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpipe.planner.simulate import simulate
from gpipe.schedules import Action, Overlap, ScheduleError, dependencies, validate


def reference_replay(
    lists: list[list], n: int, split: bool, placement: tuple, cost: dict, comm: float
) -> tuple[float, list[float], list[tuple]]:
    """Round-robin greedy replay; returns makespan, busy per device and the events."""
    k = len(lists)
    finish: dict[Action, float] = {}
    free = [0.0] * k
    pos = [0] * k
    events = []
    left = sum(len(x) for x in lists)
    while left:
        moved = False
        for d in range(k):
            while pos[d] < len(lists[d]):
                u = lists[d][pos[d]]
                deps = dependencies(u, n, split)
                if not all(x in finish for x in deps):
                    break
                t = free[d]
                for x in deps:
                    t = max(t, finish[x] + (comm if placement[x.stage] != d else 0.0))
                parts = u.parts
                e = t + sum(cost[a] for a in parts)
                for a in parts:
                    finish[a] = e
                free[d] = e
                if len(parts) == 2:  # drawn as its forward, then its backward
                    mid = t + cost[parts[0]]
                    events += [(parts[0], d, t, mid), (parts[1], d, mid, e)]
                else:
                    events.append((u, d, t, e))
                pos[d] += 1
                left -= 1
                moved = True
        if not moved:
            raise ScheduleError("deadlock")
    busy = [0.0] * k
    for _, d, t, e in events:
        busy[d] += e - t  # (a pair's two parts add up to its span)
    return max(free), busy, events


@st.composite
def schedules(draw: st.DrawFn) -> tuple:
    k = draw(st.integers(1, 3))
    v = draw(st.integers(1, 2))
    m = draw(st.integers(1, 4))
    split = draw(st.booleans())
    n = k * v
    placement = list(range(k)) + [draw(st.integers(0, k - 1)) for _ in range(n - k)]
    placement = draw(st.permutations(placement))
    kinds = ("F", "B", "W") if split else ("F", "B")
    todo = {Action(kind, s, i) for kind in kinds for s in range(n) for i in range(m)}
    done: set[Action] = set()
    lists: list[list] = [[] for _ in range(k)]
    shuffle = draw(st.booleans())  # True: any order per device (may deadlock)
    while todo:
        ready = sorted(
            a for a in todo if shuffle or all(x in done for x in dependencies(a, n, split))
        )
        a = ready[draw(st.integers(0, len(ready) - 1))]
        todo.discard(a)
        done.add(a)
        lists[placement[a.stage]].append(a)
    for d in range(k):  # fuse some adjacent F, B pairs into overlaps
        out, i = [], 0
        acts = lists[d]
        while i < len(acts):
            a = acts[i]
            nxt = acts[i + 1] if i + 1 < len(acts) else None
            if (
                a.kind == "F"
                and nxt is not None
                and nxt.kind == "B"
                and (a.stage, a.microbatch) != (nxt.stage, nxt.microbatch)
                and draw(st.booleans())
            ):
                out.append(Overlap(a, nxt))
                i += 2
            else:
                out.append(a)
                i += 1
        lists[d] = out
    fwd = [draw(st.sampled_from([0.5, 1.0, 2.0])) for _ in range(n)]
    comm = draw(st.sampled_from([0.0, 0.25]))
    return lists, m, v, tuple(placement), split, fwd, comm


@settings(max_examples=150, deadline=None)
@given(schedules())
def test_fast_replay_equals_reference_replay(case: tuple) -> None:
    lists, m, v, placement, split, fwd, comm = case
    n = len(lists) * v
    bwd = [3 * f for f in fwd]
    wgt = [f for f in fwd] if split else [0.0] * n
    cost = {}
    for s in range(n):
        for i in range(m):
            cost[Action("F", s, i)] = fwd[s]
            cost[Action("B", s, i)] = bwd[s] - wgt[s]
            cost[Action("W", s, i)] = wgt[s]
    try:
        want = reference_replay(lists, n, split, placement, cost, comm)
    except ScheduleError:
        with pytest.raises(ScheduleError, match="deadlocks"):
            validate(lists, m, v, placement=placement)
        return
    sched = validate(lists, m, v, placement=placement)
    r = simulate(sched, fwd, bwd, comm, weight_costs=wgt if split else None)
    makespan, busy, events = want
    assert r.makespan == pytest.approx(makespan, abs=1e-12)
    assert list(r.busy) == pytest.approx(busy, abs=1e-12)
    assert [(e.action, e.device, e.start, e.end) for e in r.events] == [
        (u, d, pytest.approx(t, abs=1e-12), pytest.approx(e, abs=1e-12)) for u, d, t, e in events
    ]
