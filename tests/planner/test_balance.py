"""Balancer: the seed's cumulative rule exactly, optimal equals brute force, nothing empty."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from gpipe.planner.balance import balance, balance_by_time, stage_costs


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
