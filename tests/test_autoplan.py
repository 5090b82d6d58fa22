"""The planner: ranking, memory limits, the memory model's terms, and ``schedule="auto"``."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from gpipe import memory_model as mm
from gpipe.autoplan import NoFitError, autoplan, mm_fmt, table
from gpipe.cost import profile
from gpipe.models import TransformerConfig, TransformerLM
from gpipe.schedules import get


def _tiny_lm() -> tuple[nn.Module, torch.Tensor]:
    cfg = TransformerConfig.preset("tiny").replace(dropout=0.0)
    with torch.device("meta"):
        model = TransformerLM(cfg)
    return model, torch.zeros(16, 32, dtype=torch.long, device="meta")


@pytest.fixture(scope="module")
def unlimited():
    model, x = _tiny_lm()
    return autoplan(model, x, devices=2, max_chunks=8)


def test_unlimited_ranking_is_by_predicted_step_time(unlimited):
    times = [c.step_time for c in unlimited]
    assert times == sorted(times)
    assert [c.rank for c in unlimited] == list(range(1, len(unlimited) + 1))
    assert all(c.fits for c in unlimited)
    assert {c.remat for c in unlimited} == {"always", "except_last", "never"}
    assert {c.chunks for c in unlimited} == {1, 2, 4, 8}
    assert "interleaved" in {c.schedule for c in unlimited}
    assert unlimited[0].reason.startswith("fastest that fits")
    assert unlimited[0].cost_source == "flops"


def test_a_looser_limit_never_gives_a_slower_top_plan(unlimited):
    model, x = _tiny_lm()
    peaks = sorted({c.peak_memory for c in unlimited})
    limits = [peaks[0], peaks[len(peaks) // 3], peaks[len(peaks) // 2], peaks[-1]]
    tops = [autoplan(model, x, devices=2, max_chunks=8, memory_limit=lim)[0] for lim in limits]
    for tighter, looser in itertools.pairwise(tops):
        assert looser.step_time <= tighter.step_time
    assert tops[-1].step_time == unlimited[0].step_time
    assert tops[0].step_time >= tops[-1].step_time


def test_top_plan_fits_on_every_device(unlimited):
    model, x = _tiny_lm()
    peaks = sorted(c.peak_memory for c in unlimited)
    limit = peaks[len(peaks) // 4]
    ranked = autoplan(model, x, devices=2, max_chunks=8, memory_limit=limit)
    top = ranked[0]
    assert top.fits and all(d.total <= limit for d in top.memory)
    assert any(not c.fits for c in ranked)  # the limit rules some out
    assert all(c.fits for c in ranked[: sum(c.fits for c in ranked)])  # fitting ones first
    assert "does not fit" in ranked[-1].reason
    # the unlimited winner needs more than the limit, so the choice changed
    assert unlimited[0].peak_memory > limit or unlimited[0].describe() == top.describe()


def test_no_fit_error_names_the_smallest_peak_and_its_device(unlimited):
    model, x = _tiny_lm()
    smallest = min(unlimited, key=lambda c: c.peak_memory)
    with pytest.raises(NoFitError) as info:
        autoplan(model, x, devices=2, max_chunks=8, memory_limit="1KiB")
    text = str(info.value)
    assert "memory_limit=1.00 KiB" in text
    assert f"smallest peak any reaches is {mm_fmt(smallest.peak_memory)}" in text
    assert f"on device {smallest.peak_device}" in text


def test_shared_memory_limit_applies_to_the_joint_peak():
    model, x = _tiny_lm()
    ranked = autoplan(model, x, devices=["cpu", "cpu"], max_chunks=4)
    assert all(c.shared_peak is not None for c in ranked)
    for c in ranked:  # the joint peak is at most every device's peak added up
        assert max(d.total for d in c.memory) <= c.shared_peak <= sum(d.total for d in c.memory)
    with pytest.raises(NoFitError, match="all stages together"):
        autoplan(model, x, devices=["cpu", "cpu"], max_chunks=4, memory_limit=1000)


def test_table_lists_the_top_configurations(unlimited):
    text = table(unlimited, top=3)
    lines = text.splitlines()
    assert len(lines) == 5 and lines[0].startswith("#")
    assert unlimited[0].schedule in lines[2] and "fastest that fits" in lines[2]


# ------------------------------------------------------------------ memory model by hand


def _mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_memory_terms_of_a_tiny_model_match_hand_computed_values():
    rows = 3  # one micro-batch: batch 6, M = 2
    costs = profile(_mlp(), torch.zeros(rows, 4))
    stages = mm.stage_memory(costs, [2, 1], input_bytes=rows * 4 * 4)
    f32 = 4
    p0, p1 = (4 * 8 + 8) * f32, (8 * 2 + 2) * f32
    kept0 = rows * 4 * f32 + rows * 8 * f32  # Linear saves its input, ReLU its output
    kept1 = rows * 8 * f32 + rows * 2 * f32  # Linear's input + the loss's copy of the logits
    assert [s.params for s in stages] == [p0, p1]
    assert [s.kept for s in stages] == [kept0, kept1]
    assert [s.input for s in stages] == [rows * 4 * f32, rows * 8 * f32]

    sched = get("gpipe", 2, 2)
    dev0, dev1 = mm.device_memory(sched, stages, "never", "adam")
    assert (dev0.parameters, dev0.gradients, dev0.optimizer) == (p0, p0, 2 * p0)
    assert (dev1.parameters, dev1.gradients, dev1.optimizer) == (p1, p1, 2 * p1)
    # GPipe keeps both micro-batches' graphs; the first backward adds its boundary gradients
    assert dev0.activations == 2 * kept0 and dev0.remat_inputs == 0
    assert dev0.transient == rows * 4 * f32 + rows * 8 * f32
    assert dev0.total == 4 * p0 + 2 * kept0 + dev0.transient

    remat0, _ = mm.device_memory(sched, stages, "always", "sgd")
    assert remat0.optimizer == 0
    assert remat0.activations == 0 and remat0.remat_inputs == 2 * rows * 4 * f32
    # while a backward runs, its recomputed graph and its boundary gradients are live
    assert remat0.transient == kept0 + rows * 4 * f32 + rows * 8 * f32

    one_f_one_b = mm.device_memory(get("1f1b", 2, 2), stages, "never", "adam")
    assert one_f_one_b[1].activations == kept1  # 1F1B's last device holds one micro-batch


def test_optimizer_slots_and_sizes():
    assert mm.optimizer_slots("Adam") == 2 and mm.optimizer_slots("sgd") == 0
    assert mm.optimizer_slots(3) == 3
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        mm.optimizer_slots("lion")
    assert mm.parse_bytes("8GiB") == 8 * 2**30
    assert mm.parse_bytes("1.5 MB") == 1_500_000
    with pytest.raises(ValueError, match="cannot read the memory size"):
        mm.parse_bytes("eight gigs")
