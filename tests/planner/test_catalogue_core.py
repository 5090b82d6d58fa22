"""Bad and unusual input to the pure modules: microbatch, balance, schedules, simulate.

One table of calls that must raise (the exception type and a regex its message must match:
the argument, the value and what to do), and one table of calls that must give the right
result. Each row is a case of docs/reliability.md ("Core functions and ranks that disagree").
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from gpipe import schedules
from gpipe.base.microbatch import batch_size, merge, split
from gpipe.planner.balance import (
    balance,
    balance_by_flops,
    balance_by_memory,
    balance_by_time,
    stage_costs,
)
from gpipe.planner.simulate import SimResult, compare, simulate, table
from gpipe.schedules import Action, ScheduleError, ScheduleSpec, custom, get, validate

T = torch.zeros


def two_linear() -> nn.Sequential:
    return nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))


def sched(name: str = "gpipe", k: int = 2, m: int = 2) -> Any:
    return get(name, k, m)


def rows() -> list[tuple[str, SimResult]]:
    return compare(["gpipe"], 2, 2)


# (id, call, exception type, message regex)
RAISES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    # ------------------------------------------------------------------ microbatch.split
    ("split-chunks-bool", lambda: split(T(4, 2), True), TypeError, r"chunks must be an int.*True"),
    ("split-chunks-float", lambda: split(T(4, 2), 2.5), TypeError, r"chunks must be an int.*2\.5"),
    ("split-chunks-str", lambda: split(T(4, 2), "2"), TypeError, r"chunks must be an int.*'2'"),
    ("split-chunks-zero", lambda: split(T(4, 2), 0), ValueError, r"chunks must be >= 1, got 0"),
    (
        "split-mbs-bool",
        lambda: split(T(4, 2), micro_batch_size=True),
        TypeError,
        r"micro_batch_size must be an int.*True",
    ),
    (
        "split-mbs-float",
        lambda: split(T(4, 2), micro_batch_size=1.5),
        TypeError,
        r"micro_batch_size must be an int.*1\.5",
    ),
    (
        "split-mbs-not-dividing",
        lambda: split(T(4), micro_batch_size=3),
        ValueError,
        r"batch size 4 is not divisible by micro_batch_size=3; choose a micro_batch_size",
    ),
    (
        "split-mbs-times-chunks",
        lambda: split(T(6), 2, micro_batch_size=2),
        ValueError,
        r"2 \* 2 != 6; give only one of them",
    ),
    (
        "split-not-divisible",
        lambda: split(T(12), 8),
        ValueError,
        r"batch size 12 is not divisible by chunks=8; choose chunks that divide 12",
    ),
    ("split-empty-batch", lambda: split(T(0, 2), 2), ValueError, r"the batch is empty \(0 rows"),
    (
        "split-empty-batch-chunks-1",
        lambda: split(T(0, 2), 1),
        ValueError,
        r"the batch is empty \(0 rows along batch_dim=0\)",
    ),
    (
        "split-0-dim",
        lambda: split(torch.tensor(1.0)),
        ValueError,
        r"input is a 0-dim tensor.*x\[None\]",
    ),
    (
        "split-batch-dim-out-of-range",
        lambda: split(T(4, 2), 2, batch_dim=5),
        ValueError,
        r"shape \(4, 2\); batch_dim=5 is out of range \(use a dimension in \[-2, 1\]\)",
    ),
    (
        "split-batch-dim-bool",
        lambda: split(T(4, 2), 2, batch_dim=True),
        TypeError,
        r"batch_dim must be an int.*True",
    ),
    (
        "split-batch-dim-float",
        lambda: split(T(4, 2), 2, batch_dim=1.0),
        TypeError,
        r"batch_dim must be an int.*1\.0",
    ),
    ("split-no-tensor", lambda: split([1, 2], 2), ValueError, r"holds no tensor"),
    (
        "batch-size-mismatch",
        lambda: batch_size({"a": T(4), "b": T(5)}),
        ValueError,
        r"size 4: input\['a'\]; size 5: input\['b'\]",
    ),
    # ------------------------------------------------------------------ microbatch.merge
    ("merge-empty", lambda: merge([]), ValueError, r"at least one micro-batch"),
    (
        "merge-tensor-not-list",
        lambda: merge(T(4, 2)),
        TypeError,
        r"merge takes a list of micro-batches.*got a Tensor; wrap a single micro-batch as \[x\]",
    ),
    (
        "merge-dict-not-list",
        lambda: merge({"a": T(2)}),
        TypeError,
        r"merge takes a list of micro-batches.*got a dict",
    ),
    (
        "merge-batch-dim-out-of-range",
        lambda: merge([T(2, 2), T(2, 2)], batch_dim=5),
        ValueError,
        r"micro-batch 0 has shape \(2, 2\); batch_dim=5 is out of range",
    ),
    (
        "merge-batch-dim-bool",
        lambda: merge([T(2, 2), T(2, 2)], batch_dim=True),
        TypeError,
        r"batch_dim must be an int",
    ),
    (
        "merge-0-dim",
        lambda: merge([torch.tensor(1.0), torch.tensor(2.0)]),
        ValueError,
        r"micro-batch 0 is a 0-dim tensor",
    ),
    (
        "merge-dict-keys-differ",
        lambda: merge([{"a": T(2)}, {"b": T(2)}]),
        ValueError,
        r"micro-batch 1 has keys \['b'\] where micro-batch 0 has \['a'\]",
    ),
    (
        "merge-tensor-vs-none",
        lambda: merge([None, T(2)]),
        ValueError,
        r"micro-batch 1 is a tensor where micro-batch 0 has a NoneType",
    ),
    (
        "merge-none-vs-tensor",
        lambda: merge([(T(2), T(2)), (T(2), None)]),
        ValueError,
        r"micro-batch 1\[1\] is a NoneType where micro-batch 0 has a tensor",
    ),
    (
        "merge-list-vs-tuple",
        lambda: merge([[T(2)], (T(2),)]),
        ValueError,
        r"micro-batch 1 is a tuple where micro-batch 0 has a list",
    ),
    (
        "merge-length-differs",
        lambda: merge([[T(2), T(2)], [T(2)]]),
        ValueError,
        r"micro-batch 1 has 1 entries where micro-batch 0 has 2",
    ),
    (
        "merge-dtype-differs",
        lambda: merge([T(2), T(2, dtype=torch.int64)]),
        ValueError,
        r"micro-batch 1 is torch.int64 on cpu but micro-batch 0 gave torch.float32 on cpu",
    ),
    (
        "merge-device-differs",
        lambda: merge([T(2), T(2, device="meta")]),
        ValueError,
        r"micro-batch 1 is torch.float32 on meta but micro-batch 0 gave torch.float32 on cpu",
    ),
    (
        "merge-shape-differs",
        lambda: merge([{"y": T(2, 4)}, {"y": T(2, 5)}]),
        ValueError,
        r"micro-batch 1\['y'\] has shape \(2, 5\) but micro-batch 0 gave \(2, 4\)",
    ),
    # ------------------------------------------------------------------ balance
    ("balance-empty", lambda: balance([], 1), ValueError, r"costs is empty.*one cost per layer"),
    (
        "balance-k-bool",
        lambda: balance([1, 2], True),
        TypeError,
        r"num_stages must be an int.*True",
    ),
    (
        "balance-k-float",
        lambda: balance([1, 2], 2.0),
        TypeError,
        r"num_stages must be an int.*2\.0",
    ),
    ("balance-k-zero", lambda: balance([1, 2], 0), ValueError, r"num_stages must be >= 1, got 0"),
    ("balance-inf", lambda: balance([1, math.inf, 1], 2), ValueError, r"costs\[1\] is inf.*finite"),
    ("balance-nan", lambda: balance([1, math.nan], 2), ValueError, r"costs\[1\] is nan"),
    ("balance-negative", lambda: balance([1, -1], 2), ValueError, r"costs\[1\] is -1\.0"),
    (
        "balance-overflow",
        lambda: balance([1e308, 1e308, 1e308], 2, method="cumulative"),
        ValueError,
        r"sum to inf.*scale them down",
    ),
    ("balance-str-cost", lambda: balance(["a", 1], 2), TypeError, r"costs\[0\] is str 'a'"),
    ("balance-none-cost", lambda: balance([None, 1], 2), TypeError, r"costs\[0\] is NoneType"),
    (
        "balance-bool-cost",
        lambda: balance([True, False, True], 2),
        TypeError,
        r"costs\[0\] is bool",
    ),
    ("balance-costs-str", lambda: balance("123", 2), TypeError, r"costs must be a sequence.*str"),
    ("balance-costs-dict", lambda: balance({"a": 1, "b": 2}, 2), TypeError, r"costs must be.*dict"),
    ("balance-costs-int", lambda: balance(5, 2), TypeError, r"costs must be a sequence.*int 5"),
    (
        "balance-method-typo",
        lambda: balance([1, 2, 3], 1, method="optimall"),
        ValueError,
        r"unknown balance method 'optimall'; choose 'optimal' or 'cumulative'",
    ),
    ("balance-pinned-bool", lambda: balance([1, 2, 3], 2, pinned=True), TypeError, r"pinned must"),
    ("balance-pinned-float", lambda: balance([1, 2, 3], 2, pinned=1.5), TypeError, r"pinned must"),
    (
        "balance-too-many-stages",
        lambda: balance([1, 1], 3),
        ValueError,
        r"cannot cut 2 layers.*into 3 non-empty stages; use at most 2",
    ),
    (
        "stage-costs-short-counts",
        lambda: stage_costs([1, 2, 3], [1, 1]),
        ValueError,
        r"counts=\[1, 1\] sum to 2 but there are 3 layer costs",
    ),
    (
        "stage-costs-long-counts",
        lambda: stage_costs([1, 2, 3], [2, 2]),
        ValueError,
        r"sum to 4 but there are 3",
    ),
    ("stage-costs-negative", lambda: stage_costs([1, 2, 3], [-1, 4]), ValueError, r"counts\[0\]"),
    ("stage-costs-str", lambda: stage_costs([1, 2, 3], "12"), TypeError, r"counts must be a list"),
    (
        "balance-by-flops-no-sample",
        lambda: balance_by_flops(two_linear(), 2),
        ValueError,
        r"balance_by_flops needs sample inputs.*balance_by_flops\(layers, num_stages, x\)",
    ),
    (
        "balance-by-flops-one-module",
        lambda: balance_by_flops(nn.Linear(2, 2), 1, T(1, 2)),
        TypeError,
        r"got one Linear; wrap it: nn.Sequential\(module\)",
    ),
    (
        "balance-by-memory-not-layers",
        lambda: balance_by_memory(5, 1, T(1, 2)),
        TypeError,
        r"balance_by_memory takes an nn.Sequential or a list of layers, got int",
    ),
    (
        "balance-by-time-repeats-zero",
        lambda: balance_by_time(two_linear(), 2, T(1, 2), repeats=0),
        ValueError,
        r"repeats must be >= 1, got 0",
    ),
    # ------------------------------------------------------------------ schedules
    (
        "get-typo",
        lambda: get("1f1c", 2, 2),
        ValueError,
        r"unknown schedule '1f1c' \(did you mean '1f1b'\?\); choose one of",
    ),
    ("get-name-none", lambda: get(None, 2, 2), TypeError, r"schedule must be a name.*NoneType"),
    ("get-name-int", lambda: get(5, 2, 2), TypeError, r"schedule must be a name.*int 5"),
    ("get-k-zero", lambda: get("gpipe", 0, 2), ValueError, r"num_devices must be >= 1, got 0"),
    ("get-m-zero", lambda: get("gpipe", 2, 0), ValueError, r"num_microbatches must be >= 1, got 0"),
    ("get-k-bool", lambda: get("gpipe", True, 2), TypeError, r"num_devices must be an int.*True"),
    ("get-k-str", lambda: get("gpipe", "2", 2), TypeError, r"num_devices must be an int.*'2'"),
    ("get-m-float", lambda: get("gpipe", 2, 2.0), TypeError, r"num_microbatches must be an int"),
    (
        "get-v-bool",
        lambda: get("interleaved", 2, 2, virtual_stages=True),
        TypeError,
        r"virtual_stages must be an int.*True",
    ),
    (
        "get-v-zero",
        lambda: get("interleaved", 2, 2, virtual_stages=0),
        ValueError,
        r"virtual_stages must be >= 1",
    ),
    (
        "get-v-on-gpipe",
        lambda: get("gpipe", 2, 2, virtual_stages=2),
        ValueError,
        r"virtual_stages=2 needs schedule='interleaved'",
    ),
    (
        "spec-v-bool",
        lambda: ScheduleSpec("interleaved", True),
        TypeError,
        r"virtual_stages must be an int",
    ),
    (
        "spec-v-vs-built-schedule",
        lambda: ScheduleSpec(get("interleaved", 2, 2, virtual_stages=2), 3),
        ValueError,
        r"virtual_stages=3 but the given schedule is built with 2",
    ),
    (
        "spec-built-schedule-other-k",
        lambda: ScheduleSpec(get("gpipe", 2, 2)).get(3, 2),
        ValueError,
        r"the given schedule is built for 2 devices but the pipeline has 3",
    ),
    (
        "spec-built-schedule-other-m",
        lambda: ScheduleSpec(get("gpipe", 2, 2)).get(2, 4),
        ValueError,
        r"built for 2 micro-batches but this batch splits into 4",
    ),
    (
        "custom-flat-list",
        lambda: custom(["F0@s0", "B0@s0"], 1),
        ScheduleError,
        r"actions\[0\] is str 'F0@s0', not a list of actions: give one list per device",
    ),
    (
        "custom-str",
        lambda: custom("F0@s0", 1),
        ScheduleError,
        r"actions must be a list with one list of actions per device",
    ),
    ("custom-int-action", lambda: custom([[1]], 1), ScheduleError, r"device 0: expected an Action"),
    (
        "custom-parse-kind",
        lambda: custom([["X0@s0"]], 1),
        ScheduleError,
        r"cannot parse action 'X0@s0'; write it as <kind><micro-batch>@s<stage>",
    ),
    (
        "custom-parse-no-mb",
        lambda: custom([["F@s0"]], 1),
        ScheduleError,
        r"cannot parse action 'F@s0'",
    ),
    ("custom-empty", lambda: custom([], 1), ScheduleError, r"at least one device"),
    ("custom-m-zero", lambda: custom([["F0@s0", "B0@s0"]], 0), ScheduleError, r"num_microbatches"),
    (
        "custom-m-bool",
        lambda: custom([["F0@s0", "B0@s0"]], True),
        TypeError,
        r"num_microbatches must be an int.*True",
    ),
    (
        "custom-w-without-b",
        lambda: custom([["F0@s0", "W0@s0"]], 1),
        ScheduleError,
        r"action B0@s0 is missing",
    ),
    (
        "validate-tuples",
        lambda: validate([[("F", 0, 0)]], 1),
        ScheduleError,
        r"device 0: expected an Action, got tuple",
    ),
    ("validate-none", lambda: validate(None, 1), ScheduleError, r"actions must be a list"),
    (
        "validate-device-none",
        lambda: validate([None], 1),
        ScheduleError,
        r"actions\[0\] is NoneType",
    ),
    ("action-stage-bool", lambda: Action("F", True, 0), TypeError, r"Action stage must be an int"),
    (
        "action-microbatch-float",
        lambda: Action("F", 0, 1.5),
        TypeError,
        r"Action microbatch must be an int.*1\.5",
    ),
    ("action-stage-str", lambda: Action("F", "0", 0), TypeError, r"Action stage must be an int"),
    # ------------------------------------------------------------------ simulate
    ("simulate-name", lambda: simulate("gpipe"), TypeError, r"simulate takes a Schedule.*get\("),
    (
        "simulate-nan",
        lambda: simulate(sched(), math.nan),
        ValueError,
        r"forward_costs must be finite",
    ),
    ("simulate-inf", lambda: simulate(sched(), [1.0, math.inf]), ValueError, r"forward_costs\[1\]"),
    (
        "simulate-negative-backward",
        lambda: simulate(sched(), 1.0, -1.0),
        ValueError,
        r"backward_costs must be finite and non-negative, got -1.0",
    ),
    (
        "simulate-negative-weight",
        lambda: simulate(sched("zb-h1"), 1.0, 1.0, weight_costs=-0.5),
        ValueError,
        r"weight_costs must be finite and non-negative, got -0.5",
    ),
    (
        "simulate-weight-over-backward",
        lambda: simulate(sched("zb-h1"), 1.0, 1.0, weight_costs=[2.0, 0.5]),
        ValueError,
        r"stage 0 has weight cost 2.0 > backward cost 1.0",
    ),
    ("simulate-comm-nan", lambda: simulate(sched(), comm_cost=math.nan), ValueError, r"comm_cost"),
    (
        "simulate-comm-list",
        lambda: simulate(sched(), comm_cost=[1.0]),
        TypeError,
        r"comm_cost must",
    ),
    (
        "simulate-bool-cost",
        lambda: simulate(sched(), True),
        TypeError,
        r"forward_costs must be a number",
    ),
    (
        "simulate-str-cost",
        lambda: simulate(sched(), "1"),
        TypeError,
        r"forward_costs must be a number",
    ),
    (
        "simulate-str-list",
        lambda: simulate(sched(), ["1", "2"]),
        TypeError,
        r"forward_costs\[0\] must be a number, got str",
    ),
    (
        "simulate-dict-costs",
        lambda: simulate(sched(), {0: 1.0, 1: 2.0}),
        TypeError,
        r"forward_costs must be a number or a sequence of 2 numbers",
    ),
    (
        "simulate-length",
        lambda: simulate(sched(), [1.0]),
        ValueError,
        r"forward_costs has 1 entries but the schedule has 2 stages",
    ),
    (
        "compare-str-names",
        lambda: compare("gpipe", 2, 2),
        TypeError,
        r"names must be a list of schedule names, e.g. \['gpipe'\]",
    ),
    ("compare-typo", lambda: compare(["gpipe", "1f1c"], 2, 2), ValueError, r"did you mean '1f1b'"),
    ("compare-k-zero", lambda: compare(["gpipe"], 0, 2), ValueError, r"num_devices must be >= 1"),
    (
        "compare-k-bool",
        lambda: compare(["gpipe"], True, 2),
        TypeError,
        r"num_devices must be an int",
    ),
    ("compare-nan", lambda: compare(["gpipe"], 2, 2, math.nan), ValueError, r"forward_costs must"),
    (
        "table-one-result",
        lambda: table(rows()[0][1]),
        TypeError,
        r"rows must be a list of \(name, SimResult\) pairs.*table\(\[\(name, result\)\]\)",
    ),
    ("table-bad-row", lambda: table([("x", 1.0)]), TypeError, r"rows\[0\] is \('x', 1.0\)"),
    (
        "table-negative-bytes",
        lambda: table(rows(), activation_bytes=-1),
        ValueError,
        r"activation_bytes must be finite and non-negative, got -1.0",
    ),
    (
        "table-nan-bytes",
        lambda: table(rows(), activation_bytes=math.nan),
        ValueError,
        r"activation_bytes must be finite",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [c[1:] for c in RAISES], ids=[c[0] for c in RAISES]
)
def test_bad_input_is_named(call: Callable[[], Any], exc: type[BaseException], match: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a warning instead of the error does not count
        with pytest.raises(exc, match=match):
            call()


# ----------------------------------------------------------------------------- right results


@dataclasses.dataclass
class Box:
    x: torch.Tensor


def _merge_dict_key_order() -> None:
    a, b = torch.arange(2.0), torch.arange(2.0, 4.0)
    out = merge([{"a": a, "b": -a}, {"b": -b, "a": b}])
    assert torch.equal(out["a"], torch.arange(4.0)) and torch.equal(out["b"], -torch.arange(4.0))


def _merge_ordered_dict_key_order() -> None:
    out = merge([OrderedDict(a=T(1), b=torch.ones(1)), OrderedDict(b=torch.ones(1), a=T(1))])
    assert type(out) is OrderedDict and out["a"].sum() == 0 and out["b"].sum() == 2


def _merge_negative_batch_dim() -> None:
    x = torch.arange(24.0).reshape(2, 3, 4)
    assert torch.equal(merge(split(x, 2, batch_dim=-1), batch_dim=-1), x)


def _merge_generator() -> None:
    x = torch.arange(6.0)
    assert torch.equal(merge(p for p in split(x, 3)), x)


def _merge_dataclass() -> None:
    out = merge([Box(T(1)), Box(torch.ones(1))])
    assert isinstance(out, Box) and out.x.tolist() == [0.0, 1.0]


def _split_clamps_with_warning() -> None:
    with pytest.warns(UserWarning, match="chunks=3 exceeds the batch size 2"):
        parts = split(T(2), 3)
    assert len(parts) == 2


def _split_numpy_int_chunks() -> None:
    assert len(split(T(4), np.int64(2))) == 2


def _balance_tensor_and_numpy_costs() -> None:
    assert balance(torch.tensor([1.0, 1.0, 2.0]), 2) == [2, 1]
    assert balance(np.array([1.0, 1.0, 2.0], dtype=np.float32), 2) == [2, 1]


def _balance_zero_costs() -> None:
    assert balance([0.0] * 4, 2, method="cumulative") == [1, 3]  # the paper's rule
    assert sum(balance([0.0] * 500, 3)) == 500


def _balance_pinned_all_but_one() -> None:
    assert balance([1, 1, 1, 5], 2, pinned=3) == [3, 1]


def _stage_costs_right() -> None:
    assert stage_costs([1, 2, 3], [1, 2]) == [1.0, 5.0]
    assert stage_costs([1, 2, 3], [3, 0]) == [6.0, 0.0]


def _get_name_spellings() -> None:
    assert get(" ZB_H1 ", 2, 2).name == "zb-h1"


def _get_numpy_ints() -> None:
    s = get("1f1b", np.int64(2), np.int64(3))
    assert s.num_devices == 2 and type(s.actions[0][0].stage) is int


def _action_numpy_index() -> None:
    assert Action("F", np.int64(1), np.int32(2)) == Action("F", 1, 2)


def _custom_strips_blanks() -> None:
    assert custom([[" F0@s0", "B0@s0 "]], 1).actions == ((Action("F", 0, 0), Action("B", 0, 0)),)


def _register_mixed_case_name() -> None:
    @schedules.register("My_Fill_Drain")
    def _mine(k: int, m: int, v: int) -> list[list[Action]]:
        return [[Action("F", d, 0), Action("B", d, 0)] for d in range(k)]

    try:
        assert get("My_Fill_Drain", 2, 1).name == "my-fill-drain"
    finally:
        schedules.unregister("My_Fill_Drain")
    assert "my-fill-drain" not in schedules.available()


def _merge_non_tensor_leaves_from_first() -> None:
    out = merge([(T(1), 1, "a"), (torch.ones(1), 2, "b")])
    assert out[0].tolist() == [0.0, 1.0] and out[1:] == (1, "a")


def _simulate_numpy_and_tensor_costs() -> None:
    a = simulate(sched(), np.float32(1.0)).makespan
    b = simulate(sched(), torch.tensor(1.0)).makespan
    c = simulate(sched(), torch.tensor([1.0, 1.0])).makespan
    assert a == b == c == simulate(sched(), 1.0).makespan


def _simulate_zero_costs() -> None:
    r = simulate(sched(), 0.0)
    assert r.makespan == 0.0 and r.bubble == 0.0


def _simulate_weight_costs_ignored_without_split() -> None:
    assert simulate(sched(), 1.0, weight_costs=0.5) == simulate(sched(), 1.0)


def _compare_capitalized_interleaved() -> None:
    ((_, r),) = compare(["Interleaved"], 2, 4, virtual_stages=3)
    assert r.schedule.virtual_stages == 3


def _compare_empty() -> None:
    assert compare([], 2, 2) == []


def _table_with_bytes_is_well_formed() -> None:
    lines = table(rows(), activation_bytes=2**20).splitlines()
    assert len({line.count("|") for line in lines}) == 1, lines
    assert lines[0].endswith("| peak MiB per device |")


def _table_empty() -> None:
    assert len(table([]).splitlines()) == 2


GOOD: list[tuple[str, Callable[[], None]]] = [
    ("merge-dict-key-order", _merge_dict_key_order),
    ("merge-ordered-dict-key-order", _merge_ordered_dict_key_order),
    ("merge-negative-batch-dim", _merge_negative_batch_dim),
    ("merge-generator", _merge_generator),
    ("merge-dataclass", _merge_dataclass),
    ("split-clamps-with-warning", _split_clamps_with_warning),
    ("split-numpy-int-chunks", _split_numpy_int_chunks),
    ("balance-tensor-and-numpy-costs", _balance_tensor_and_numpy_costs),
    ("balance-zero-costs", _balance_zero_costs),
    ("balance-pinned-all-but-one", _balance_pinned_all_but_one),
    ("stage-costs-right", _stage_costs_right),
    ("get-name-spellings", _get_name_spellings),
    ("get-numpy-ints", _get_numpy_ints),
    ("action-numpy-index", _action_numpy_index),
    ("custom-strips-blanks", _custom_strips_blanks),
    ("register-mixed-case-name", _register_mixed_case_name),
    ("merge-non-tensor-leaves-from-first", _merge_non_tensor_leaves_from_first),
    ("simulate-numpy-and-tensor-costs", _simulate_numpy_and_tensor_costs),
    ("simulate-zero-costs", _simulate_zero_costs),
    ("simulate-weight-costs-ignored-without-split", _simulate_weight_costs_ignored_without_split),
    ("compare-capitalized-interleaved", _compare_capitalized_interleaved),
    ("compare-empty", _compare_empty),
    ("table-with-bytes-is-well-formed", _table_with_bytes_is_well_formed),
    ("table-empty", _table_empty),
]


@pytest.mark.parametrize("check", [g[1] for g in GOOD], ids=[g[0] for g in GOOD])
def test_unusual_input_gives_the_right_result(check: Callable[[], None]) -> None:
    check()
