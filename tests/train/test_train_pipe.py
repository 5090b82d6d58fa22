"""The distributed trainer names the rank that really runs each stage (the schedule's
placement: a V for zb-v and dualpipe-v, not ``s % K``)."""

from __future__ import annotations

import pytest

from gpipe.schedules import ScheduleSpec
from gpipe.train.pipe import stage_lines


@pytest.mark.parametrize("schedule", ["zb-v", "dualpipe-v"])
def test_a_v_placement_puts_the_last_stage_on_rank_0(schedule: str) -> None:
    placement = ScheduleSpec(schedule, None).placement(2)  # 4 stages on 2 devices
    lines = stage_lines(["a", "b", "c", "d"], [1, 1, 1, 1], placement, 2, 2)
    assert lines == [
        "stage 0 on rank 0: [a]",
        "stage 1 on rank 1: [b]",
        "stage 2 on rank 1: [c]",
        "stage 3 on rank 0: [d]",
    ]


def test_replicas_list_every_rank_of_a_stage() -> None:
    placement = ScheduleSpec("interleaved", 2).placement(2)  # round robin
    lines = stage_lines(["a", "b", "c", "d"], [1, 1, 1, 1], placement, 2, 4)
    assert lines[1] == "stage 1 on ranks 1, 3: [b]"
    assert lines[2] == "stage 2 on ranks 0, 2: [c]"
