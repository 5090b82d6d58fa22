"""Schedules as data: every named schedule validates, simulates to its textbook bubble, and
the validator rejects broken schedules with a message naming the stuck action.

Value checks that kill the mutants of ``gpipe.schedules`` the main tests let live.

Each test pins one behaviour a mutation changed: the schedule helpers nothing else here called
(``str``, ``forward_part``, ``stages_of``...), ``ScheduleSpec``, and the exact wording of the
errors (each names the stage, micro-batch, device or value that is wrong). See docs/mutation.md.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest

from gpipe.planner.simulate import compare, simulate
from gpipe.schedules import (
    Action,
    Overlap,
    ScheduleError,
    ScheduleSpec,
    available,
    custom,
    dependencies,
    execution_order,
    get,
    interleaving,
    placement_of,
    register,
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


@pytest.mark.parametrize("k, m", [(2, 4), (3, 6), (4, 8), (4, 16)])
def test_dualpipe_v_issues_its_deferred_ws_oldest_first(k: int, m: int) -> None:
    s = get("dualpipe-v", k, m)
    held = 0
    for d, acts in enumerate(s.actions):
        parts = [a for u in acts for a in u.parts]
        # a W held back: one that is not in the unit right after its B's unit
        after = {a: acts[i + 1].parts for i, u in enumerate(acts[:-1]) for a in u.parts}
        late = [
            a for a in parts if a.kind == "W" and a not in after[dataclasses.replace(a, kind="B")]
        ]
        their_bs = [a for a in parts if a.kind == "B" and dataclasses.replace(a, kind="W") in late]
        assert [dataclasses.replace(w, kind="B") for w in late] == their_bs, f"device {d}"
        held += len(late)
    assert held, "no W is held back past the next unit; the check checks nothing"


def _torch_dualpipe_v(k: int, m: int) -> list[list]:
    """torch's ScheduleDualPipeV order for ``k`` ranks, ``m`` micro-batches, as units of
    ``(kind, stage, micro-batch)`` (an overlapped pair: a tuple of two): its full backward
    ``B`` is our ``B`` with its ``W`` right after, its ``I`` our split ``B``."""
    from torch.distributed.pipelining import schedules as tps

    if not hasattr(tps.ScheduleDualPipeV, "_calculate_single_rank_operations"):
        pytest.skip("this torch computes ScheduleDualPipeV's order elsewhere")
    ref = tps.ScheduleDualPipeV.__new__(tps.ScheduleDualPipeV)  # the order needs no stages
    ref.pp_group_size, ref._n_microbatches = k, m
    kinds = {tps.FORWARD: "F", tps.BACKWARD_INPUT: "B", tps.BACKWARD_WEIGHT: "W"}
    out = []
    for d in range(k):
        units = []
        for a in ref._calculate_single_rank_operations(d):
            parts = a.sub_actions or (a,)
            full = [p for p in parts if p.computation_type == tps.FULL_BACKWARD]
            names = [
                ("B" if p in full else kinds[p.computation_type], p.stage_index, p.microbatch_index)
                for p in parts
            ]
            units.append(tuple(names) if len(names) == 2 else names[0])
            units += [("W", p.stage_index, p.microbatch_index) for p in full]
        out.append(units)
    return out


@pytest.mark.parametrize("k, m", [(1, 2), (2, 4), (2, 7), (3, 6), (3, 10), (4, 8), (4, 13)])
def test_dualpipe_v_is_torchs_schedule_dualpipe_v(k: int, m: int) -> None:
    ours = [
        [
            tuple((a.kind, a.stage, a.microbatch) for a in u.parts)
            if isinstance(u, Overlap)
            else (u.kind, u.stage, u.microbatch)
            for u in acts
        ]
        for acts in get("dualpipe-v", k, m).actions
    ]
    assert ours == _torch_dualpipe_v(k, m)


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


# ----------------------------------------------------------------------------- values
# Value checks that pin what a mutation of the module changes (tools/mutants.py).


A = Action


def _parse_all(*devices: str) -> list[list[Action]]:
    out = []
    for text in devices:
        acts = []
        for word in text.split():
            head, stage = word.split("@s")
            acts.append(Action(head[0], int(stage), int(head[1:])))
        out.append(acts)
    return out


def _raises(exc: type[Exception], call, *args, **kwargs) -> str:
    with pytest.raises(exc) as info:
        call(*args, **kwargs)
    assert type(info.value) is exc
    return str(info.value)


# ----------------------------------------------------------------------------- Schedule


def test_str_lists_every_device() -> None:
    assert str(get("gpipe", 2, 2)) == (
        "gpipe: K=2 M=2 V=1\n"
        "  device 0: F0@s0 F1@s0 B1@s0 B0@s0\n"
        "  device 1: F0@s1 F1@s1 B1@s1 B0@s1"
    )


def test_forward_and_backward_parts_split_each_device() -> None:
    s = get("zb-h1", 2, 2)
    assert s.forward_part() == tuple(
        tuple(acts) for acts in _parse_all("F0@s0 F1@s0", "F0@s1 F1@s1")
    )
    assert s.backward_part() == tuple(
        # device 0 has no earlier stage to send to: its backwards stay whole
        tuple(acts)
        for acts in _parse_all("B0@s0 B1@s0", "B0@s1 B1@s1 W0@s1 W1@s1")
    )


def test_interleaved_stage_to_device_map() -> None:
    s = get("interleaved", 2, 4, virtual_stages=2)
    assert [s.device_of(st) for st in range(4)] == [0, 1, 0, 1]
    assert all(type(s.device_of(st)) is int for st in range(4))
    assert s.stages_of(0) == [0, 2]
    assert s.stages_of(1) == [1, 3]


# ----------------------------------------------------------------------------- Action


def test_action_with_numpy_indices_becomes_plain_ints() -> None:
    a = Action("F", np.int64(0), np.int64(0))
    assert a == Action("F", 0, 0)
    assert type(a.stage) is int and type(a.microbatch) is int
    b = Action("B", np.int64(2), np.int64(3))
    assert (b.stage, b.microbatch) == (2, 3)


@pytest.mark.parametrize(("stage", "mb"), [(-1, 0), (0, -1), (-2, -3)])
def test_action_refuses_negative_indices(stage: int, mb: int) -> None:
    msg = _raises(ValueError, Action, "F", stage, mb)
    assert msg == f"Action indices must be >= 0, got F{mb}@s{stage}"


def test_action_errors_name_the_value() -> None:
    assert _raises(ValueError, Action, "X", 0, 0) == (
        "Action kind must be one of ('F', 'B', 'W'), got 'X'"
    )
    assert _raises(TypeError, Action, "F", 1.0, 0) == "Action stage must be an int, got float 1.0"


# ------------------------------------------------------------------- validate / custom


def test_validate_defaults_and_name() -> None:
    lists = _parse_all("F0@s0 B0@s0")
    assert validate(lists, 1).name == "custom"
    assert validate(lists, 1, name="mine").name == "mine"
    assert custom([["F0@s0", "B0@s0"]], 1).name == "custom"


def test_custom_passes_virtual_stages_on() -> None:
    s = custom([["F0@s0", "F0@s1", "B0@s1", "B0@s0"]], 1, virtual_stages=2)
    assert (s.virtual_stages, s.num_stages) == (2, 2)


def test_validate_errors_are_exact() -> None:
    assert _raises(ScheduleError, validate, [], 1) == "a schedule needs at least one device"
    ok = _parse_all("F0@s0 B0@s0")
    assert _raises(ScheduleError, validate, ok, 1, virtual_stages=0) == (
        "virtual_stages must be >= 1, got 0"
    )
    msg = _raises(ScheduleError, validate, [["F0@s0"]], 1)
    assert "; write Action('F', stage, microbatch) or use custom() with strings like 'F0@s1'" in msg
    assert msg.endswith("'F0@s1'")


def test_validate_names_out_of_range_stage_and_microbatch() -> None:
    msg = _raises(ScheduleError, validate, _parse_all("F0@s0 F0@s1 B0@s0"), 1)
    assert msg == (
        "device 0: F0@s1 names stage 1, but the schedule has only 1 stages (K=1 devices x V=1)"
    )
    msg = _raises(ScheduleError, validate, _parse_all("F0@s0 B0@s0 F1@s0"), 1)
    assert msg == "device 0: F1@s0 names micro-batch 1, but there are only 1"


def test_validate_names_missing_actions_and_their_device() -> None:
    msg = _raises(ScheduleError, validate, _parse_all("F0@s0 B0@s0", "F0@s1"), 1)
    assert msg == "action B0@s1 is missing (device 1 must run it)"
    # a W is optional: B1 without one is micro-batch 1's whole backward
    s = validate(_parse_all("F0@s0 F1@s0 B0@s0 B1@s0 W0@s0"), 2)
    assert s.split_backward and s.splits(0, 0) and not s.splits(0, 1) and s.num_split == 1
    assert s.peak_activations == (2,)
    # but never twice, and never without its B
    msg = _raises(ScheduleError, validate, _parse_all("F0@s0 B0@s0 W0@s0 W0@s0"), 1)
    assert msg == "device 0: W0@s0 occurs twice"
    msg = _raises(ScheduleError, validate, _parse_all("F0@s0 F1@s0 B0@s0 W1@s0 W0@s0"), 2)
    assert msg == "action B1@s0 is missing (device 0 must run it)"


def test_validate_deadlock_names_the_schedule() -> None:
    lists = _parse_all("F0@s0 B0@s0", "B0@s1 F0@s1")
    msg = _raises(ScheduleError, validate, lists, 1, name="mine")
    assert msg == (
        "schedule 'mine' deadlocks: device 0 stuck at B0@s0 waiting for B0@s1; "
        "device 1 stuck at B0@s1 waiting for F0@s1"
    )


def test_validate_deadlock_of_a_split_schedule() -> None:
    # device 0's W waits for its B, which waits for device 1's B, which waits for its F
    lists = _parse_all("F0@s0 W0@s0 B0@s0", "F0@s1 B0@s1 W0@s1")
    msg = _raises(ScheduleError, validate, lists, 1, name="split")
    assert msg == "schedule 'split' deadlocks: device 0 stuck at W0@s0 waiting for B0@s0"


# ------------------------------------------------------------------------ execution_order


def test_deadlock_message_lists_every_stuck_device_and_dependency() -> None:
    msg = _raises(ScheduleError, execution_order, _parse_all("B0@s0", "B0@s1"), 3, False)
    assert msg == (
        "schedule 'custom' deadlocks: device 0 stuck at B0@s0 waiting for F0@s0, B0@s1; "
        "device 1 stuck at B0@s1 waiting for F0@s1, B0@s2"
    )


def test_deadlock_with_a_finished_device() -> None:
    msg = _raises(ScheduleError, execution_order, _parse_all("F0@s0", "B0@s1"), 2, False)
    assert msg == "schedule 'custom' deadlocks: device 1 stuck at B0@s1 waiting for F0@s1"


def test_deadlock_on_a_w_action() -> None:
    msg = _raises(ScheduleError, execution_order, [[A("W", 0, 0)]], 1, True)
    assert msg == "schedule 'custom' deadlocks: device 0 stuck at W0@s0 waiting for B0@s0"


def test_w_without_split_backward_is_named() -> None:
    msg = _raises(ScheduleError, dependencies, A("W", 1, 2), 3, False)
    assert msg == "W2@s1: a W action needs a schedule with split backward"


# ------------------------------------------------------------------------------- parsing


def test_check_lists_messages_show_the_example() -> None:
    example = "(e.g. [['F0@s0', 'B0@s0'], ['F0@s1', 'B0@s1']])"
    msg = _raises(ScheduleError, custom, "F0@s0", 1)
    assert msg == (
        f"actions must be a list with one list of actions per device {example}, got str 'F0@s0'"
    )
    msg = _raises(ScheduleError, custom, ["F0@s0"], 1)
    assert msg == (
        f"actions[0] is str 'F0@s0', not a list of actions: give one list per device {example}"
    )


def test_parse_error_says_how_to_write_an_action() -> None:
    msg = _raises(ScheduleError, custom, [["Q"]], 1)
    assert msg == (
        "cannot parse action 'Q'; write it as <kind><micro-batch>@s<stage> with kind "
        "F, B or W, e.g. 'F3@s1' (an overlapped pair: 'F3@s1+B0@s6')"
    )


# ------------------------------------------------------------------------- get / register


def test_get_errors_name_the_value() -> None:
    assert _raises(TypeError, get, "gpipe", 2.0, 4) == "num_devices must be an int, got float 2.0"
    msg = _raises(ValueError, get, "zzzzzz", 2, 4)
    assert msg == f"unknown schedule 'zzzzzz'; choose one of {available()}"
    msg = _raises(ValueError, get, "gpip", 2, 4)
    assert msg == f"unknown schedule 'gpip' (did you mean 'gpipe'?); choose one of {available()}"


def test_interleaved_defaults_to_two_virtual_stages() -> None:
    assert get("interleaved", 2, 4).virtual_stages == 2


def test_register_refuses_bad_input() -> None:
    assert _raises(ValueError, register, "  ") == "a schedule needs a non-empty name"
    msg = _raises(TypeError, register("never-registered"), 5)
    assert msg == "register('never-registered') decorates a function, got 5"
    assert "never-registered" not in available()


# ---------------------------------------------------------------------------- ScheduleSpec


def test_spec_of_a_built_schedule() -> None:
    built = get("interleaved", 2, 4, virtual_stages=3)
    spec = ScheduleSpec(built)
    assert spec.fixed is built
    assert (spec.name, spec.virtual_stages, spec.num_devices) == ("interleaved", 3, 2)
    assert spec.get(2, 4) is built


SPEC_CASES = [
    ("gpipe", None, 1),
    ("gpipe", 1, 1),
    ("1F1B", None, 1),
    ("interleaved", None, 2),
    ("interleaved", 1, 1),
    ("interleaved", 3, 3),
]


@pytest.mark.parametrize(("schedule", "v", "want_v"), SPEC_CASES)
def test_spec_of_a_name(schedule: str, v: int | None, want_v: int) -> None:
    spec = ScheduleSpec(schedule, v)
    assert spec.fixed is None
    assert spec.num_devices is None
    assert spec.name == schedule.lower()
    assert spec.virtual_stages == want_v
    got = spec.get(2, 4)
    assert got == get(schedule, 2, 4, virtual_stages=want_v if schedule == "interleaved" else None)
    assert got.virtual_stages == want_v
    assert spec.get(2, 4) is got  # cached
    assert spec.get(3, 4).num_devices == 3


def test_spec_errors() -> None:
    msg = _raises(ValueError, ScheduleSpec, "nope")
    assert msg.startswith("unknown schedule 'nope'")
    assert _raises(ValueError, ScheduleSpec, "interleaved", 0) == (
        "virtual_stages must be >= 1, got 0"
    )
    assert _raises(ValueError, ScheduleSpec, "gpipe", 2) == (
        "virtual_stages=2 needs schedule='interleaved' or 'interleaved-zb', not 'gpipe'"
    )
    assert re.search("must be an int", _raises(TypeError, ScheduleSpec, "interleaved", 2.5))


# ------------------------------------------------------------------ placement and overlaps


def test_placements_are_exact() -> None:
    from gpipe.schedules import round_robin, v_shape

    assert round_robin(3, 2) == (0, 1, 2, 0, 1, 2)
    assert v_shape(3) == (0, 1, 2, 2, 1, 0)
    assert v_shape(2, 4) == (0, 1, 1, 0, 0, 1, 1, 0)
    assert v_shape(1, 3) == (0, 0, 0)


def test_placement_errors_are_exact() -> None:
    acts = [["F0@s0", "B0@s0"], ["F0@s1", "B0@s1"]]
    from gpipe.schedules import custom as make

    msg = _raises(ScheduleError, make, acts, 1, placement="01")
    assert msg.startswith("placement must be a sequence of device indices, one per stage")
    msg = _raises(ScheduleError, make, acts, 1, placement=[0, 2])
    assert msg == "placement[1] is 2; it must be a device index in [0, 2)"
    msg = _raises(ScheduleError, make, acts, 1, placement=[0, True])
    assert msg == "placement[1] is True; it must be a device index in [0, 2)"
    msg = _raises(ScheduleError, make, acts, 1, placement=[1, 1])
    assert msg == "placement leaves device 0 without a stage: (1, 1)"
    assert make(acts, 1, placement=(0, 1)).placement == (0, 1)


def test_registered_placement_reaches_the_schedule_and_the_spec() -> None:
    from gpipe.schedules import placement_of, unregister

    def backwards(k: int, v: int) -> tuple[int, ...]:
        return tuple(reversed(range(k)))

    @register("test-reversed", placement=backwards)
    def _build(k: int, m: int, v: int) -> list[list[Action]]:
        return [[Action("F", k - 1 - d, 0), Action("B", k - 1 - d, 0)] for d in range(k)]

    try:
        s = get("test-reversed", 3, 1)
        assert s.placement == (2, 1, 0) and s.stages_of(2) == [0]
        assert placement_of("test-reversed", 3) == ScheduleSpec("test-reversed").placement(3)
        assert _raises(TypeError, register, "x", placement=3).startswith(
            "placement must be a function (K, V) -> tuple"
        )
    finally:
        unregister("test-reversed")


def test_fixed_virtual_and_spec_placement_errors() -> None:
    msg = _raises(ValueError, get, "dualpipe-v", 2, 4, virtual_stages=1)
    assert msg == (
        "schedule 'dualpipe-v' always has 2 stages per device; drop virtual_stages=1 (or pass 2)"
    )
    spec = ScheduleSpec(get("zb-v", 2, 4))
    assert spec.placement(2) == (0, 1, 1, 0)
    msg = _raises(ValueError, spec.placement, 3)
    assert msg == (
        "the given schedule is built for 2 devices but the pipeline has 3; build it for 3 devices"
    )
    assert ScheduleSpec("zb-v").virtual_stages == 2
    assert ScheduleSpec("zb-v", 2).virtual_stages == 2


def test_overlap_text_equality_and_parts() -> None:
    from gpipe.schedules import Overlap

    f, b = Action("F", 1, 2), Action("B", 0, 0)
    o = Overlap(f, b)
    assert str(o) == "F2@s1+B0@s0" and o.kind == "FB" and o.parts == (f, b)
    assert _raises(ValueError, Overlap, b, f) == (
        "Overlap.forward must be an F action, got Action(kind='B', stage=0, microbatch=0)"
    )
    assert _raises(ValueError, Overlap, f, f).startswith("Overlap.backward must be a B action")
    s = get("dualpipe-v", 2, 4)
    assert s == get("dualpipe-v", 2, 4) and hash(s) == hash(get("dualpipe-v", 2, 4))
    assert s != get("zb-v", 2, 4) and s.has_overlaps and not get("zb-v", 2, 4).has_overlaps
    assert "F3@s0+B1@s3" in str(s)
