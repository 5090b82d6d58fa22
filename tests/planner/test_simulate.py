"""Value checks that kill the mutants of ``gpipe.planner.simulate`` the main tests let live.

They pin: the default costs (backward twice the forward, W half of the backward); exactly when
``comm_cost`` is paid (a dependency on another device only); the peak of live activations (a
split schedule frees a micro-batch at its W); ``compare``'s per-device costs split over an
interleaved schedule's chunks; the markdown of ``table``; and the wording of errors. See
docs/mutation.md.
"""

from __future__ import annotations

import pytest

from gpipe.planner.simulate import SimResult, compare, simulate, table
from gpipe.schedules import Action, Event, custom, get, validate


def _raises(exc: type[Exception], call, *args, **kwargs) -> str:
    with pytest.raises(exc) as info:
        call(*args, **kwargs)
    assert type(info.value) is exc
    return str(info.value)


def _gpipe_makespan(k: int, m: int, f: float, b: float) -> float:
    return (m + k - 1) * (f + b)


# --------------------------------------------------------------------------- simulate


def test_default_costs() -> None:
    r = simulate(get("gpipe", 2, 4))
    assert r.makespan == _gpipe_makespan(2, 4, 1.0, 2.0) == 15.0
    assert r.busy == (12.0, 12.0)
    assert isinstance(r.events, tuple) and len(r.events) == 16
    assert {e.action for e in r.events} == {a for acts in r.schedule.actions for a in acts}
    r = simulate(get("gpipe", 2, 4), 1.0)
    assert r.busy == (12.0, 12.0)


def test_split_backward_defaults_w_to_half_the_backward() -> None:
    r = simulate(get("zb-h1", 2, 2), 1.0, 3.0)
    durations = {
        (e.action.kind, e.action.stage, e.action.microbatch): e.end - e.start for e in r.events
    }
    assert {d for (kind, _, _), d in durations.items() if kind == "W"} == {1.5}
    split = {d for (kind, s, _), d in durations.items() if kind == "B" and s == 1}
    whole = {d for (kind, s, _), d in durations.items() if kind == "B" and s == 0}
    assert (split, whole) == ({1.5}, {3.0})  # a B without a W is the whole backward
    # W may take the whole backward, leaving B free
    r = simulate(get("zb-h1", 2, 2), 1.0, 2.0, weight_costs=2.0)
    assert r.busy == (6.0, 6.0)
    # a split's own cost: B and W of a split micro-batch each grow by split_overhead
    r = simulate(get("zb-h1", 2, 2), 1.0, 3.0, split_overhead=0.25)
    assert r.busy == (2 + 2 * 3.0, 2 + 2 * 3.0 * 1.25)


def test_comm_cost_is_paid_only_across_devices() -> None:
    r = simulate(get("gpipe", 2, 1), 1.0, 2.0, 0.5)
    assert list(r.events) == [
        Event(Action("F", 0, 0), 0, 0.0, 1.0),
        Event(Action("F", 1, 0), 1, 1.5, 2.5),
        Event(Action("B", 1, 0), 1, 2.5, 4.5),
        Event(Action("B", 0, 0), 0, 5.0, 7.0),
    ]
    assert r.makespan == 7.0


def test_bubble_of_small_costs() -> None:
    r = simulate(get("gpipe", 2, 4), 0.01, 0.02)
    assert r.bubble == pytest.approx(1 / 5)


def test_peak_of_a_split_schedule_counts_until_w() -> None:
    # device 1 of zb-h1 runs F0 B0 F1 B1 W0 ...: micro-batch 0 lives until its W
    assert simulate(get("zb-h1", 2, 4)).peak_activations == (2, 2)
    assert simulate(get("1f1b", 2, 4)).peak_activations == (2, 1)


def test_peak_after_a_backward() -> None:
    s = custom([["F0@s0", "B0@s0", "F1@s0", "F2@s0", "B1@s0", "B2@s0"]], 3)
    assert simulate(s).peak_activations == (2,)


def test_a_split_schedule_with_an_empty_name() -> None:
    s = validate(get("zb-h1", 2, 2).actions, 2, name="")
    assert simulate(s).makespan == simulate(get("zb-h1", 2, 2)).makespan


def test_simulate_error_wording() -> None:
    assert _raises(TypeError, simulate, "gpipe") == (
        "simulate takes a Schedule, e.g. gpipe.schedules.get('1f1b', K, M), got str 'gpipe'"
    )
    assert _raises(TypeError, simulate, get("gpipe", 2, 2), {"a": 1}) == (
        "forward_costs must be a number or a sequence of 2 numbers (one per stage), "
        "got dict {'a': 1}"
    )


# ---------------------------------------------------------------------------- compare


def test_compare_defaults() -> None:
    (name, r), (_, ri) = compare(["gpipe", "interleaved"], 2, 4)
    assert name == "gpipe"
    assert r.makespan == 15.0  # forward 1, backward 2, no communication
    assert ri.schedule.virtual_stages == 2
    assert compare(["gpipe"], 1, 2)[0][1].makespan == 6.0


def test_compare_costs_reach_the_simulation() -> None:
    r = compare(["gpipe"], 2, 4, forward_costs=2.0)[0][1]
    assert r.makespan == _gpipe_makespan(2, 4, 2.0, 4.0)
    r = compare(["gpipe"], 2, 4, backward_costs=5.0)[0][1]
    assert r.makespan == _gpipe_makespan(2, 4, 1.0, 5.0)
    r = compare(["gpipe"], 2, 4, comm_cost=0.5)[0][1]
    assert r.makespan == simulate(get("gpipe", 2, 4), 1.0, 2.0, 0.5).makespan > 15.0


def test_compare_splits_device_costs_over_chunks() -> None:
    r = compare(["interleaved"], 2, 4, forward_costs=1.0, backward_costs=5.0)[0][1]
    assert r.schedule.virtual_stages == 2
    assert r.busy == (24.0, 24.0)  # M·(F+B) per device, whatever V
    f = {e.end - e.start for e in r.events if e.action.kind == "F"}
    b = {e.end - e.start for e in r.events if e.action.kind == "B"}
    assert (f, b) == ({0.5}, {2.5})
    r = compare(["interleaved"], 2, 4, virtual_stages=3)[0][1]
    assert r.schedule.virtual_stages == 3


def test_compare_error_wording() -> None:
    assert _raises(TypeError, compare, ["gpipe"], 2.0, 4) == "num_devices must be an int, got float"
    assert _raises(ValueError, compare, ["gpipe"], 2, 4, backward_costs=[1.0]) == (
        "backward_costs has 1 entries but the schedule has 2 stages"
    )
    _raises(TypeError, compare, [3], 2, 4)


# ------------------------------------------------------------------------------ table


def test_table_markdown() -> None:
    rows = compare(["gpipe", "1f1b"], 2, 4)
    assert table(rows) == (
        "| schedule | step time | bubble | peak live micro-batches per device |\n"
        "| --- | ---: | ---: | --- |\n"
        "| gpipe | 15 | 20.0% | 4, 4 |\n"
        "| 1f1b | 15 | 20.0% | 2, 1 |"
    )
    assert table(rows[:1], activation_bytes=2**20) == (
        "| schedule | step time | bubble | peak live micro-batches per device |"
        " peak MiB per device |\n"
        "| --- | ---: | ---: | --- | --- |\n"
        "| gpipe | 15 | 20.0% | 4, 4 | 4.0, 4.0 |"
    )


def test_table_error_wording() -> None:
    r = simulate(get("gpipe", 2, 2))
    assert isinstance(r, SimResult)
    assert _raises(TypeError, table, r) == (
        "rows must be a list of (name, SimResult) pairs as compare() returns, got SimResult; "
        "for one result write table([(name, result)])"
    )
    assert _raises(TypeError, table, 5).startswith(
        "rows must be a list of (name, SimResult) pairs as compare() returns, got int;"
    )
    assert _raises(TypeError, table, [r]).endswith(
        "each row must be a (name, SimResult) pair as compare() returns"
    )


def test_overlap_argument_wording_and_range() -> None:
    s = get("dualpipe-v", 2, 4)
    with pytest.raises(ValueError) as info:
        simulate(s, overlap=1.5)
    assert str(info.value) == (
        "overlap must be in [0, 1] (the share of the shorter part of an overlapped pair "
        "hidden behind the longer), got 1.5"
    )
    with pytest.raises(ValueError, match="overlap must be finite and non-negative"):
        simulate(s, overlap=-0.1)
    half = simulate(s, 1.0, 2.0, weight_costs=1.0, overlap=0.5)
    none = simulate(s, 1.0, 2.0, weight_costs=1.0)
    assert half.makespan < none.makespan
    assert sum(half.busy) < sum(none.busy)
    # an overlap's timeline is its forward, then its backward, splitting the pair's time by cost
    pair_events = [e for e in none.events if e.action.kind == "F" and e.device == 0]
    assert all(e.end - e.start == pytest.approx(1.0) for e in pair_events)


def test_comm_cost_follows_the_placement() -> None:
    """On a V placement the turn (stage K-1 to K, one device) pays no communication."""
    s = get("zb-v", 2, 1)
    base = simulate(s, 1.0, 2.0, 0.0, weight_costs=1.0)
    comm = simulate(s, 1.0, 2.0, 0.5, weight_costs=1.0)
    # one micro-batch: F0 F1 | F2 F3 | B3 B2 | B1 B0 crosses devices twice forward, twice back
    assert comm.makespan == pytest.approx(base.makespan + 4 * 0.5)
