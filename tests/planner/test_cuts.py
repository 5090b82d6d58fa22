"""The stage cut of a captured model: within the slack of the best balance, fewest bytes."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from gpipe.planner.balance import balance, stage_costs
from gpipe.planner.cuts import balance_small_boundaries


def test_it_moves_a_cut_to_a_small_boundary_when_the_balance_allows() -> None:
    weights = [10, 1, 10, 1, 10, 1, 10, 1]
    crossing = [5, 100, 5, 100, 100, 5, 100, 0]  # small after layers 1, 3 and 6
    plain = balance(weights, 2)
    assert plain == [4, 4]  # 22 | 22, but 100 bytes cross
    got = balance_small_boundaries(weights, crossing, 2, slack=0.2)
    assert got == [3, 5]  # 21 | 23 is within 20%, and only 5 bytes cross


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(1, 50), min_size=2, max_size=9),
    st.data(),
)
def test_it_is_the_fewest_bytes_among_balanced_cuts(weights, data) -> None:
    n = len(weights)
    k = data.draw(st.integers(1, n))
    crossing = data.draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    got = balance_small_boundaries(weights, crossing, k, slack=0.1)
    assert len(got) == k and sum(got) == n and min(got) >= 1
    limit = max(stage_costs(weights, balance(weights, k))) * 1.1
    assert max(stage_costs(weights, got)) <= limit + 1e-9

    def bytes_of(counts):
        return sum(crossing[c - 1] for c in itertools.accumulate(counts[:-1]))

    for cuts in itertools.combinations(range(1, n), k - 1):
        counts = [b - a for a, b in itertools.pairwise([0, *cuts, n])]
        if max(stage_costs(weights, counts)) <= limit:
            assert bytes_of(got) <= bytes_of(counts)
