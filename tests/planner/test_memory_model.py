"""Value checks of the memory model (gpipe.planner.memory_model) that ``make mutants`` showed
were missing: nothing held means every figure is zero, the defaults, the exact refusals, the
boundaries of the byte parser, and each stage's own boundary input and ``W`` share."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gpipe.planner import memory_model as mm
from gpipe.planner.cost import profile
from gpipe.planner.simulate import simulate
from gpipe.schedules import Action, Event, Overlap, get

SCHEDULES = ["gpipe", "1f1b", "zb-h1", "zb-v", "dualpipe-v"]


def _stages(n: int, **sizes: int) -> list[mm.StageMemory]:
    fields = dict(params=0, buffers=0, kept=0, input=0, output=0, workspace=0, deferred=0)
    return [mm.StageMemory(**{**fields, **sizes}) for _ in range(n)]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("remat", ["always", "except_last", "never"])
def test_stages_that_hold_nothing_predict_nothing(name: str, remat: str) -> None:
    sched = get(name, 2, 4)
    empty = _stages(sched.num_stages)
    for dev in mm.device_memory(sched, empty, remat):
        assert dev == mm.DeviceMemory(0, 0, 0, 0, 0, 0, 0)
    assert mm.process_peak(simulate(sched).events, sched, empty, remat) == 0


def test_the_default_optimizer_is_adam() -> None:
    sched = get("zb-h1", 2, 4)
    stages = _stages(2, params=8, buffers=3, kept=5, input=2, output=2, workspace=1, deferred=4)
    assert mm.device_memory(sched, stages, "never") == mm.device_memory(
        sched, stages, "never", "adam"
    )
    events = simulate(sched).events
    assert mm.process_peak(events, sched, stages, "never") == mm.process_peak(
        events, sched, stages, "never", "adam"
    )


def test_the_joint_static_state_counts_buffers_once_and_parameters_twice() -> None:
    sched = get("1f1b", 2, 2)
    stages = [_stages(1, params=10, buffers=3)[0], _stages(1, params=7, buffers=5)[0]]
    devices = mm.device_memory(sched, stages, "never", "momentum")
    assert all(d.gradients == d.parameters and d.optimizer == d.parameters for d in devices)
    static = sum(d.parameters + d.buffers + d.gradients + d.optimizer for d in devices)
    assert mm.process_peak([], sched, stages, "never", "momentum") == static == 3 * 17 + 8


def test_each_stage_takes_its_own_predecessors_output_and_keeps_its_own_w_share() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Linear(3, 5))
    rows = 2
    costs = profile(model, torch.zeros(rows, 4))
    stages = mm.stage_memory(costs, [1, 1, 1, 1], input_bytes=rows * 4 * 4)
    assert [s.input for s in stages] == [rows * 4 * 4] + [c.activation_bytes for c in costs[:3]]
    assert [s.output for s in stages] == [c.activation_bytes for c in costs]
    # W's share: the first stage keeps its whole graph (it captures nothing), the others
    # their standard calls' inputs and output gradients (Tanh has no weight: nothing)
    assert stages[0].deferred == stages[0].kept
    assert [s.deferred for s in stages[1:]] == [c.deferred_bytes for c in costs[1:]]
    assert stages[1].deferred == 0 < stages[1].kept


def test_optimizer_slot_counts_and_refusals() -> None:
    assert mm.optimizer_slots(0) == 0 and mm.optimizer_slots(1) == 1
    with pytest.raises(TypeError) as err:
        mm.optimizer_slots(True)
    assert str(err.value) == "optimizer must be a name or a slot count, got True"
    with pytest.raises(ValueError) as err:
        mm.optimizer_slots(-1)
    assert str(err.value) == "optimizer slot count must be >= 0, got -1"
    with pytest.raises(ValueError) as err:
        mm.optimizer_slots("lion")
    assert str(err.value) == (
        "unknown optimizer 'lion'; choose one of ['adam', 'adamw', 'momentum', 'none', 'sgd'] "
        "or give the number of parameter-sized state tensors it keeps (Adam: 2)"
    )


def test_a_schedule_of_another_stage_count_is_refused() -> None:
    with pytest.raises(ValueError) as err:
        mm.device_memory(get("1f1b", 2, 2), _stages(3), "never")
    assert str(err.value) == "3 stage memories for a schedule of 2 stages"


def test_byte_sizes_at_their_bounds() -> None:
    assert mm.parse_bytes(1) == 1 and mm.parse_bytes("1") == 1
    assert mm.parse_bytes("2 KiB") == 2048
    for bad in (0, "0", -5, 0.0):
        with pytest.raises(ValueError) as err:
            mm.parse_bytes(bad)
        assert str(err.value) == f"a memory size must be positive, got {bad!r}"
    with pytest.raises(ValueError) as err:
        mm.parse_bytes("8 parsecs")
    assert str(err.value) == (
        "cannot read the memory size '8 parsecs'; write a number of bytes or one with a unit "
        "such as '8GiB', '512MiB', '16GB'"
    )
    with pytest.raises(ValueError) as err:
        mm.parse_bytes(math.nan)
    assert str(err.value) == (
        "a memory size must be a finite number of bytes, got nan; for no limit pass "
        "memory_limit=None (or leave --memory-limit out)"
    )
    with pytest.raises(TypeError) as err:
        mm.parse_bytes(False)
    assert str(err.value) == "a memory size must be bytes or a string like '8GiB', got False"


def test_a_limit_is_none_only_for_none_or_infinity() -> None:
    assert mm.parse_limit(None) is None and mm.parse_limit(math.inf) is None
    assert mm.parse_limit(2.0) == 2 and mm.parse_limit("1KiB") == 1024
    with pytest.raises(ValueError, match="finite number of bytes"):
        mm.parse_limit(-math.inf)


def test_an_overlapped_pair_on_a_timeline_counts_both_its_parts() -> None:
    sched = get("1f1b", 1, 2)
    stages = _stages(1, params=4, kept=5, input=2, output=3, workspace=1)
    f, b = Action("F", 0, 1), Action("B", 0, 0)
    pair = [Event(Overlap(f, b), 0, 0.0, 1.0)]
    apart = [Event(f, 0, 0.0, 1.0), Event(b, 0, 0.0, 1.0)]
    joint = mm.process_peak(pair, sched, stages, "never")
    assert joint == mm.process_peak(apart, sched, stages, "never")
    assert joint == mm.process_peak([], sched, stages, "never") + 5 + (2 + 3 + 1)
