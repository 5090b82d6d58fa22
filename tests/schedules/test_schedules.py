"""Schedules as data: every named schedule validates, simulates to its textbook bubble, and
the validator rejects broken schedules with a message naming the stuck action."""

from __future__ import annotations

import pytest

from gpipe.planner.simulate import compare, simulate
from gpipe.schedules import (
    Action,
    Overlap,
    ScheduleError,
    ScheduleSpec,
    available,
    custom,
    get,
    interleaving,
    placement_of,
    validate,
)

V_SHAPED = ("zb-v", "dualpipe-v")


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_named_schedules_are_complete_and_valid(name: str, k: int, m: int) -> None:
    s = get(name, k, m)
    n = s.num_stages
    seen = [a for acts in s.actions for u in acts for a in u.parts]
    assert len(seen) == len(set(seen)) == 2 * n * m + s.num_split  # a W only where split
    ws = {(a.stage, a.microbatch) for a in seen if a.kind == "W"}
    assert ws == {(st, i) for st in range(n) for i in range(m) if s.splits(st, i)}
    assert s.split_backward == bool(ws)
    for d, acts in enumerate(s.actions):
        assert all(s.placement[a.stage] == d for u in acts for a in u.parts)
    if name in V_SHAPED:  # device d holds stages d and 2K-1-d
        assert s.num_stages == 2 * k
        assert all(s.stages_of(d) == sorted({d, 2 * k - 1 - d}) for d in range(k))
    else:
        assert s.placement == tuple(st % k for st in range(n))


@pytest.mark.parametrize("name", available())
@pytest.mark.parametrize("k", [1, 2, 5])
def test_placement_is_known_before_the_microbatch_count(name: str, k: int) -> None:
    spec = ScheduleSpec(name)
    assert spec.placement(k) == placement_of(name, k) == get(name, k, 2 * k).placement
    assert spec.get(k, 3).placement == spec.placement(k)


def test_dualpipe_v_overlaps_a_forward_with_a_backward_in_the_steady_state() -> None:
    s = get("dualpipe-v", 3, 12)
    for d, acts in enumerate(s.actions):
        pairs = [u for u in acts if isinstance(u, Overlap)]
        assert pairs, f"device {d} has no overlapped pair"
        for u in pairs:  # F of one stage with B of the device's other stage
            assert u.forward.stage != u.backward.stage
            assert {u.forward.stage, u.backward.stage} == {d, 5 - d}
    assert not s.forward_backward_separable
    assert len(s.forward_part()[0]) == 2 * 12 and len(s.backward_part()[0]) == 4 * 12


def test_overlap_units_are_validated_and_simulated() -> None:
    ok = custom([["F0@s0", "F1@s0+B0@s0", "W0@s0", "B1@s0", "W1@s0"]], 2)
    assert ok.actions[0][1] == Overlap(Action("F", 0, 1), Action("B", 0, 0))
    r = simulate(ok, 1.0, 3.0, weight_costs=1.0)
    assert r.makespan == pytest.approx(1 + (1 + 2) + 1 + 2 + 1)
    hidden = simulate(ok, 1.0, 3.0, weight_costs=1.0, overlap=1.0)
    assert hidden.makespan == pytest.approx(r.makespan - 1.0)  # min(F, B) = 1 hidden
    assert r.peak_activations == (2,)
    # the pair waits for its backward's forward, which comes after it: a deadlock
    with pytest.raises(ScheduleError, match=r"stuck at F0@s0\+B1@s0 waiting for F1@s0"):
        custom([["F0@s0+B1@s0", "F1@s0", "B0@s0"]], 2)
    with pytest.raises(ValueError, match="needs its own forward first"):
        Overlap(Action("F", 0, 0), Action("B", 0, 0))
    with pytest.raises(ScheduleError, match="cannot parse overlap"):
        custom([["F0@s0+F1@s0"]], 2)


def test_custom_placement_is_checked_and_used() -> None:
    acts = [["F0@s0", "F0@s1", "B0@s1", "B0@s0"], ["F0@s2", "F0@s3", "B0@s3", "B0@s2"]]
    s = custom(acts, 1, 2, placement=[0, 0, 1, 1])
    assert s.stages_of(0) == [0, 1] and s.device_of(2) == 1
    assert simulate(s, 1.0, 2.0, 0.5).makespan == pytest.approx(4 * 1 + 4 * 2 + 2 * 0.5)
    with pytest.raises(
        ScheduleError, match=r"F0@s2 belongs on device 1 \(the placement puts stage 2 there\)"
    ):
        custom([acts[1], acts[0]], 1, 2, placement=[0, 0, 1, 1])
    with pytest.raises(ScheduleError, match="leaves device 1 without a stage"):
        custom(acts, 1, 2, placement=[0, 0, 0, 0])
    with pytest.raises(ScheduleError, match="has 2 entries"):
        custom(acts, 1, 2, placement=[0, 1])


def test_v_shaped_schedules_take_no_other_virtual_stage_count() -> None:
    with pytest.raises(ValueError, match="always has 2 stages per device"):
        get("zb-v", 2, 4, virtual_stages=3)
    assert get("zb-v", 2, 4, virtual_stages=2).num_stages == 4


@pytest.mark.parametrize("k", range(1, 9))
@pytest.mark.parametrize("m", [1, 2, 4, 7, 8, 16, 32, 64])
def test_gpipe_and_1f1b_bubble_match_formula(k: int, m: int) -> None:
    for name in ("gpipe", "1f1b"):
        r = simulate(get(name, k, m), 1.0, 2.0)
        assert r.bubble == pytest.approx((k - 1) / (m + k - 1), abs=1e-12)


@pytest.mark.parametrize("k", [2, 3, 4, 8])
@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize("mult", [1, 2, 4])
def test_interleaved_bubble_matches_formula(k: int, v: int, mult: int) -> None:
    m = k * mult
    r = simulate(get("interleaved", k, m, virtual_stages=v), 1.0, 2.0)
    assert r.bubble == pytest.approx((k - 1) / (v * m + k - 1), abs=1e-12)


@pytest.mark.parametrize(
    ("k", "m"), [(k, m) for k in (2, 3, 4, 8) for m in (4, 8, 16, 32) if m >= k]
)
def test_zero_bubble_h1_idles_a_third_of_1f1b(k: int, m: int) -> None:
    """(ZB-H1 reaches its steady state only with M >= K.)"""
    one = simulate(get("1f1b", k, m), 1.0, 2.0)
    zb = simulate(get("zb-h1", k, m), 1.0, 2.0, weight_costs=1.0)
    work = 3.0 * m  # per device: F + B + W per micro-batch
    assert zb.makespan - work <= (one.makespan - work) / 3 + 1e-9
    assert max(zb.peak_activations) <= k


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("v", [2, 3])
@pytest.mark.parametrize("mult", [2, 4])
def test_interleaved_zero_bubble_idles_less_than_interleaved_within_1f1b_memory(
    k: int, v: int, mult: int
) -> None:
    """F = B = W per stage: the W's fill interleaved 1F1B's waits, and fewer warm-up forwards
    keep every device at V·K stage activations (K whole-device units, 1F1B's peak) against
    interleaved 1F1B's (V-1)·K + 2K-1."""
    m = k * mult
    il = simulate(get("interleaved", k, m, virtual_stages=v), 1.0, 2.0)
    zb = simulate(get("interleaved-zb", k, m, virtual_stages=v), 1.0, 2.0, weight_costs=1.0)
    assert zb.bubble < il.bubble
    assert zb.peak_activations == (v * k,) * k
    assert il.peak_activations[0] == (v - 1) * k + 2 * k - 1


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_interleaved_zero_bubble_with_one_chunk_is_zb_h1(k: int) -> None:
    for m in (1, k, 2 * k + 1):
        one = get("interleaved-zb", k, m, virtual_stages=1)
        assert one.actions == get("zb-h1", k, m).actions


@pytest.mark.parametrize("k", [2, 3, 4, 5])
@pytest.mark.parametrize("v", [2, 3, 4])
def test_interleaved_zero_bubble_is_valid_for_every_microbatch_count(k: int, v: int) -> None:
    """Any M >= 1, also where M is not a multiple of K (where interleaved 1F1B's own warm-up
    deadlocks on some, e.g. K=4, M=5, V=3, interleaved takes this one's, B not split)."""
    for m in range(1, 3 * k + 2):
        s = get("interleaved-zb", k, m, virtual_stages=v)
        assert s.split_backward and s.placement == tuple(st % k for st in range(k * v))
        assert max(s.peak_activations) <= v * k
        fused = get("interleaved", k, m, virtual_stages=v)  # the same order, B not split
        if m % k:  # where the Megatron warm-up deadlocks, interleaved takes this one's
            assert [[a for a in acts if a.kind != "W"] for acts in s.actions] == [
                list(acts) for acts in fused.actions
            ]


@pytest.mark.parametrize("k", [1, 2, 4, 8])
@pytest.mark.parametrize("m", [1, 4, 8, 16])
def test_peak_activations(k: int, m: int) -> None:
    assert simulate(get("gpipe", k, m)).peak_activations == (m,) * k
    one = simulate(get("1f1b", k, m)).peak_activations
    assert all(one[s] <= k - s for s in range(k))
    assert all(one[s] == min(k - s, m) for s in range(k))


def test_validate_rejects_deadlock_naming_stuck_stage() -> None:
    # device 1 wants backward of micro-batch 0 before it ever ran a forward
    bad = [
        [Action("F", 0, 0), Action("B", 0, 0)],
        [Action("B", 1, 0), Action("F", 1, 0)],
    ]
    with pytest.raises(ScheduleError, match=r"device 1 stuck at B0@s1 waiting for F0@s1"):
        validate(bad, 1)


def test_validate_rejects_cross_wait_deadlock() -> None:
    # device 0 runs backward of mb 0 before forward of mb 1; device 1 waits for F1 first
    bad = [
        [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
        [Action("F", 1, 1), Action("F", 1, 0), Action("B", 1, 0), Action("B", 1, 1)],
    ]
    with pytest.raises(ScheduleError, match="deadlocks"):
        validate(bad, 2)


def test_validate_rejects_missing_repeated_and_misplaced() -> None:
    with pytest.raises(ScheduleError, match="missing"):
        validate([[Action("F", 0, 0)]], 1)
    with pytest.raises(ScheduleError, match="twice"):
        validate([[Action("F", 0, 0), Action("F", 0, 0), Action("B", 0, 0)]], 1)
    with pytest.raises(ScheduleError, match="belongs on device 1"):
        validate([[Action("F", 1, 0)], []], 1)
    with pytest.raises(ScheduleError, match="only 1"):
        validate([[Action("F", 0, 3)]], 1)


def test_custom_schedule_from_strings() -> None:
    s = custom([["F0@s0", "F1@s0", "B1@s0", "B0@s0"]], 2)
    assert s.actions[0][2] == Action("B", 0, 1)
    with pytest.raises(ScheduleError, match="cannot parse"):
        custom([["forward"]], 1)


def test_get_rejects_unknown_and_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'pipedream'"):
        get("pipedream", 2, 4)
    with pytest.raises(ValueError, match="needs schedule='interleaved' or 'interleaved-zb'"):
        get("gpipe", 2, 4, virtual_stages=2)
    assert set(available()) >= {"gpipe", "1f1b", "interleaved", "interleaved-zb", "zb-h1"}
    assert interleaving() == ["interleaved", "interleaved-zb"]


def test_forward_backward_separability() -> None:
    assert get("gpipe", 4, 8).forward_backward_separable
    assert not get("1f1b", 4, 8).forward_backward_separable
    assert get("1f1b", 4, 1).forward_backward_separable


def test_simulator_handles_large_pipelines() -> None:
    r = simulate(get("gpipe", 64, 512))  # 65k actions; its speed is a benchmark's business
    assert r.bubble == pytest.approx(63 / (512 + 63))


def test_comm_cost_and_uneven_stages_lengthen_makespan() -> None:
    s = get("gpipe", 2, 4)
    base = simulate(s, 1.0, 2.0)
    assert simulate(s, 1.0, 2.0, comm_cost=0.5).makespan > base.makespan
    slow = simulate(s, [1.0, 3.0], [2.0, 6.0])
    assert slow.makespan == pytest.approx(1 + 4 * 3 + 4 * 6 + 2)
    with pytest.raises(ValueError, match="has 3 entries"):
        simulate(s, [1.0, 2.0, 3.0])


def test_compare_gives_a_row_per_schedule() -> None:
    names = ["gpipe", "1f1b", "interleaved", "zb-h1", "interleaved-zb"]
    rows = compare(names, 4, 16)
    assert [n for n, _ in rows] == names
    bubbles = dict((n, r.bubble) for n, r in rows)
    assert bubbles["interleaved"] < bubbles["1f1b"]
    assert bubbles["interleaved-zb"] < bubbles["zb-h1"]
    three = dict(compare(["interleaved-zb", "zb-v"], 4, 16, virtual_stages=3))
    assert three["interleaved-zb"].schedule.virtual_stages == 3
    assert three["zb-v"].schedule.virtual_stages == 2


def test_table_lists_every_schedule() -> None:
    from gpipe.planner.simulate import table

    text = table(compare(["gpipe", "1f1b"], 2, 4), activation_bytes=2**20)
    lines = text.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| gpipe |")
    assert "| 4, 4 |" in lines[2] or "4, 4" in lines[2]
    assert lines[3].rstrip().endswith("| 2.0, 1.0 |")
