"""Balancer: the seed's cumulative rule exactly, optimal equals brute force, nothing empty.

Value checks that kill the mutants of ``gpipe.planner.balance`` the main tests let live.

They pin: which neighbour ``_fill_empty`` takes a layer from (nearest, the left one on a tie);
the cumulative rule on costs that sum to at most 1 or to 0; that tiny costs cut like large ones;
that ``balance_by_flops`` / ``balance_by_memory`` / ``balance_by_time`` pass ``method`` and
``pinned`` on and weigh what their docstrings say; and the wording of errors. See
docs/mutation.md.
"""

from __future__ import annotations

import itertools
import time

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gpipe.planner.balance import (
    _fill_empty,
    balance,
    balance_by_flops,
    balance_by_memory,
    balance_by_time,
    stage_costs,
)
from gpipe.planner.cost import profile


def _brute_force(costs: list[float], k: int) -> float:
    n = len(costs)
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        best = min(best, max(sum(costs[a:b]) for a, b in itertools.pairwise(bounds)))
    return best


def _seed_rule(costs: list[float], k: int) -> list[int]:
    total, cum, counts = sum(costs), 0.0, [0] * k
    for c in costs:
        cum += c
        counts[min(int(cum / total * k), k - 1)] += 1
    return counts


@pytest.mark.parametrize(
    ("k", "expected"),
    [(2, [7, 9]), (4, [3, 4, 4, 5]), (8, [1, 2, 2, 2, 2, 2, 2, 3])],
)
def test_cumulative_reproduces_the_seed(k: int, expected: list[int]) -> None:
    assert balance([1.0] * 16, k, method="cumulative") == expected


def test_cumulative_never_leaves_a_stage_empty() -> None:
    assert _seed_rule([100, 1], 2) == [0, 2]  # the seed's rule would
    assert balance([100, 1], 2, method="cumulative") == [1, 1]


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.integers(0, 50), min_size=1, max_size=9),
    k=st.integers(1, 5),
)
def test_optimal_equals_brute_force(costs: list[int], k: int) -> None:
    if k > len(costs):
        with pytest.raises(ValueError, match="non-empty stages"):
            balance(costs, k)
        return
    counts = balance(costs, k)
    assert len(counts) == k and all(c > 0 for c in counts) and sum(counts) == len(costs)
    assert max(stage_costs(costs, counts)) == pytest.approx(_brute_force(costs, k))


@settings(max_examples=200, deadline=None)
@given(costs=st.lists(st.integers(1, 50), min_size=1, max_size=30), k=st.integers(1, 6))
def test_cumulative_matches_seed_rule_when_no_stage_is_empty(costs: list[int], k: int) -> None:
    if k > len(costs):
        return
    seed = _seed_rule(costs, k)
    got = balance(costs, k, method="cumulative")
    assert sum(got) == len(costs) and all(c > 0 for c in got)
    if all(seed):
        assert got == seed


def test_pinned_layers_stay_on_stage_zero() -> None:
    costs = [1.0] * 8
    counts = balance(costs, 4, pinned=5)
    assert counts[0] >= 5 and sum(counts) == 8 and all(counts)
    with pytest.raises(ValueError, match="pinned"):
        balance(costs, 4, pinned=6)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown balance method"):
        balance([1, 2], 2, method="greedy")
    with pytest.raises(ValueError, match="num_stages must be >= 1"):
        balance([1, 2], 0)
    with pytest.raises(ValueError, match="non-negative"):
        balance([1, -2], 1)


def test_large_input_is_fast_and_optimal_within_tolerance() -> None:
    costs = [float((i * 7919) % 97 + 1) for i in range(2000)]
    counts = balance(costs, 16)
    worst = max(stage_costs(costs, counts))
    assert worst <= sum(costs) / 16 + max(costs)


def test_balance_by_time_runs_layers() -> None:
    import torch

    layers = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 512), nn.Linear(512, 64))
    counts = balance_by_time(layers, 2, torch.randn(32, 64))
    assert sum(counts) == 4 and len(counts) == 2
    assert all(p.grad is None for p in layers.parameters())


# ----------------------------------------------------------------------------- values
# Value checks that pin what a mutation of the module changes (tools/mutants.py).


def _raises(exc: type[Exception], call, *args, **kwargs) -> str:
    with pytest.raises(exc) as info:
        call(*args, **kwargs)
    return str(info.value)


# ------------------------------------------------------------------------- _fill_empty


@pytest.mark.parametrize(
    ("raw", "filled"),
    [
        ((2, 0), [1, 1]),
        ((0, 2, 2), [1, 1, 2]),  # only a right neighbour: the nearest one
        ((2, 1, 0), [1, 1, 1]),  # the nearest left neighbour that can spare one
        ((2, 2, 0), [2, 1, 1]),
        ((2, 0, 2), [1, 1, 2]),  # a tie goes to the left
        ((2, 1, 0, 2), [2, 1, 1, 1]),  # the right one is nearer
        ((0, 3, 0, 2), [1, 1, 1, 2]),
        ((2, 1, 0, 1, 2), [1, 1, 1, 1, 2]),  # a stage of one layer cannot spare it
        ((1, 0, 1, 3, 2), [1, 1, 1, 2, 2]),
    ],
)
def test_fill_empty_takes_from_the_nearest_neighbour(raw: tuple, filled: list) -> None:
    assert _fill_empty(list(raw)) == filled


# ------------------------------------------------------------------------- balance


def test_cumulative_on_costs_summing_below_one_is_scale_free() -> None:
    assert balance([0.1, 0.1, 0.1, 0.5], 2, method="cumulative") == [3, 1]
    assert balance([1.0, 1.0, 1.0, 5.0], 2, method="cumulative") == [3, 1]


def test_cumulative_on_zero_costs_cuts_like_equal_costs() -> None:
    assert balance([0.0] * 6, 3, method="cumulative") == [1, 2, 3]
    assert balance([1.0] * 6, 3, method="cumulative") == [1, 2, 3]


def test_optimal_on_tiny_costs_cuts_like_large_ones() -> None:
    assert balance([1.0, 1.0, 3.0, 1.0], 2) == [2, 2]
    assert balance([1e-20, 1e-20, 3e-20, 1e-20], 2) == [2, 2]


def test_stage_costs_error_wording() -> None:
    msg = _raises(ValueError, stage_costs, [1.0, 2.0], [1])
    assert msg == (
        "counts=[1] sum to 1 but there are 2 layer costs; "
        "give one count per stage, summing to the number of layers"
    )


# ------------------------------------------------------------------ by FLOPs, by memory


def _model() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(4, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 4)
    )


def test_balance_by_flops_weighs_forward_plus_backward_flops() -> None:
    layers, x = _model(), torch.zeros(2, 4)
    costs = [max(1, c.flops + c.backward_flops) for c in profile(layers, x)]
    assert costs[1] == 1  # the ReLU has no FLOPs and still weighs one
    assert costs[2] == 3 * 2 * 2 * 64 * 64  # 2·b·in·out forward, twice that backward
    for k in (2, 3):
        assert balance_by_flops(layers, k, x) == balance(costs, k)
    assert balance_by_flops(layers, 2, x) == [3, 2]
    assert balance_by_flops(layers, 2, x, method="cumulative") == balance(
        costs, 2, method="cumulative"
    )
    assert balance_by_flops(layers, 2, x, pinned=4) == [4, 1]


def test_balance_by_flops_counts_free_layers_as_one() -> None:
    # three free layers against one 2·2·1·1·3 = 12-FLOP layer: 1+1+1 < 12, so [3, 1]
    layers, x = (
        nn.Sequential(nn.ReLU(), nn.ReLU(), nn.ReLU(), nn.Linear(1, 1, bias=False)),
        (torch.zeros(2, 1)),
    )
    assert [max(1, c.flops + c.backward_flops) for c in profile(layers, x)] == [1, 1, 1, 12]
    assert balance_by_flops(layers, 2, x) == [3, 1]
    assert balance_by_flops(layers, 4, x) == [1, 1, 1, 1]


def test_balance_by_memory_weighs_params_buffers_and_activations() -> None:
    layers = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 256), nn.ReLU())
    x = torch.zeros(2, 4)
    costs = [c.param_bytes + c.buffer_bytes + c.activation_bytes for c in profile(layers, x)]
    assert all(c.buffer_bytes > 0 for c in profile(layers, x)[1:2])
    for k in (2, 3):
        assert balance_by_memory(layers, k, x) == balance(costs, k)
    assert balance_by_memory(layers, 2, x, method="cumulative") == balance(
        costs, 2, method="cumulative"
    )
    assert balance_by_memory(layers, 2, x, pinned=3) == [3, 1]


@pytest.mark.parametrize("fn", [balance_by_flops, balance_by_memory, balance_by_time])
def test_helpers_pass_method_and_pinned_on(fn) -> None:
    layers, x = _model(), torch.zeros(2, 4)
    assert _raises(ValueError, fn, layers, 2, x, method="nope").startswith(
        "unknown balance method 'nope'"
    )
    assert _raises(ValueError, fn, layers, 2, x, pinned=-1).startswith(
        "pinned must be between 0 and the number of layers (5), got -1"
    )
    name = fn.__name__
    msg = _raises(TypeError, fn, nn.Linear(1, 1), 2, x)
    assert msg.startswith(f"{name} takes an nn.Sequential or a list of layers, got one Linear")
    msg = _raises(ValueError, fn, layers, 2)
    assert msg == f"{name} needs sample inputs for the first layer: {name}(layers, num_stages, x)"


# --------------------------------------------------------------------------- by time


class Probe(nn.Module):
    """Sleeps ``delays[call]`` (last one repeated) and records what it saw."""

    def __init__(self, *delays: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.delays = delays or (0.0,)
        self.calls = 0
        self.backwards = 0
        self.input_requires_grad: list[bool] = []

    def _count_backward(self, grad: torch.Tensor) -> torch.Tensor:
        self.backwards += 1
        return grad

    def forward(self, x):
        t = x["h"] if isinstance(x, dict) else x
        self.input_requires_grad.append(t.requires_grad)
        time.sleep(self.delays[min(self.calls, len(self.delays) - 1)])
        self.calls += 1
        out = t * self.w
        out.register_hook(self._count_backward)
        return {"h": out, "tag": 3}  # a non-tensor leaf rides along


def test_balance_by_time_runs_forward_and_backward_repeats_times() -> None:
    layers = nn.Sequential(Probe(), Probe(), Probe())
    assert balance_by_time(layers, 3, torch.ones(2)) == [1, 1, 1]
    for p in layers:
        assert (p.calls, p.backwards) == (3, 3)
        assert p.input_requires_grad == [True, True, True]
        assert p.w.grad is None  # gradients of the timing runs are dropped


def test_balance_by_time_follows_the_slow_layer() -> None:
    layers = nn.Sequential(Probe(0.1), Probe(), Probe(), Probe())
    assert balance_by_time(layers, 2, torch.ones(2), repeats=1) == [1, 3]
    assert balance_by_time(layers, 2, torch.ones(2), repeats=1, pinned=3) == [3, 1]


def test_balance_by_time_takes_the_upper_median() -> None:
    # two samples each: layer 0 is slow once; the upper median keeps it the slowest layer
    layers = nn.Sequential(Probe(0.2, 0.0), Probe(0.05), Probe(), Probe())
    assert balance_by_time(layers, 2, torch.ones(2), repeats=2) == [1, 3]


# ------------------------------------------------------------------ arguments of balance()


def test_costs_refuse_arrays_that_are_not_scalars() -> None:
    assert balance([np.float64(2.0), torch.tensor(1.0)], 1) == [2]
    msg = _raises(TypeError, balance, [np.array([2.0]), 1.0], 1)
    assert msg.startswith("costs[0] is ndarray")
    assert msg.endswith("; every layer cost must be a number")


def test_cost_error_wording() -> None:
    msg = _raises(ValueError, balance, [1.0, float("nan")], 1)
    assert msg == (
        "costs[1] is nan; layer costs must be finite and non-negative (measure or "
        "estimate that layer again)"
    )
    msg = _raises(ValueError, balance, [1e308, 1e308], 1)
    assert msg == (
        "the layer costs sum to inf (the largest is 1e+308); scale them down, e.g. "
        "divide every cost by the largest"
    )
    assert _raises(ValueError, balance, [], 1) == (
        "costs is empty: there are no layers to balance; give one cost per layer"
    )
    assert _raises(TypeError, balance, [1.0], 1.5) == "num_stages must be an int, got float 1.5"


@pytest.mark.parametrize("pinned", [-1, 4])
def test_pinned_out_of_range(pinned: int) -> None:
    assert _raises(ValueError, balance, [1.0, 1.0, 1.0], 1, pinned=pinned) == (
        f"pinned must be between 0 and the number of layers (3), got {pinned}"
    )


def test_pinned_edges() -> None:
    assert balance([1.0, 1.0, 1.0], 1, pinned=3) == [3]
    assert balance([1.0, 1.0, 1.0], 3, pinned=1) == [1, 1, 1]
    assert balance([5.0, 1.0, 1.0, 1.0], 2) == [1, 3]
    assert balance([5.0, 1.0, 1.0, 1.0], 2, pinned=2) == [2, 2]
    # the pinned block is cut with the method asked for
    assert balance([1.0] * 16, 2, method="cumulative", pinned=2) == [7, 9]
    assert balance([1.0] * 16, 2, pinned=2) == [8, 8]


def test_too_many_stages_for_the_pinned_block() -> None:
    msg = _raises(ValueError, balance, [1.0] * 4, 3, pinned=3)
    assert msg == (
        "cannot cut 4 layers (3 pinned to stage 0) into 3 non-empty stages; use at most 2 stages"
    )
    msg = _raises(ValueError, balance, [1.0] * 4, 5)
    assert msg == (
        "cannot cut 4 layers (0 pinned to stage 0) into 5 non-empty stages; use at most 4 stages"
    )


def test_one_element_tensor_is_not_a_cost() -> None:
    msg = _raises(TypeError, balance, [torch.tensor([2.0]), 1.0], 1)
    assert msg.startswith("costs[0] is Tensor")


def test_optimal_when_the_best_cut_costs_the_whole_model() -> None:
    # free layers around one costly one: the min-max is the total, and the back-fill keeps
    # the early stage small
    assert balance([0.0, 0.0, 5.0], 2) == [1, 2]
    assert balance([0.0, 0.0, 1.0, 0.0], 2) == [1, 3]


class Buffers(nn.Module):
    """A layer that holds a large buffer and passes its input through."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("table", torch.zeros(10_000))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_balance_by_memory_adds_buffer_bytes() -> None:
    layers = nn.Sequential(Buffers(), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4))
    x = torch.zeros(2, 4)
    assert profile(layers, x)[0].buffer_bytes == 40_000
    assert balance_by_memory(layers, 2, x) == [1, 3]
