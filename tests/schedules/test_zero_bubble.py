"""The zero-bubble schedules split only the backwards where the pipeline fills and drains.

Against the every-backward-split lists of the papers (``every=True``), by simulation: with a
free split the step is the same (the published bubbles hold), with a split cost it is shorter,
no device holds more activations, and in the steady state the backwards are whole.
"""

from __future__ import annotations

import pytest

from gpipe.planner.simulate import simulate
from gpipe.schedules import get
from gpipe.schedules.zero_bubble import every_split

COSTS = [(1.0, 2.0, 1.0), (1.0, 2.3, 0.7), (1.0, 2.0, 1.2)]  # F, whole backward, its W
CASES = [("zb-h1", 1), ("zb-h2", 1), ("interleaved-zb", 2), ("interleaved-zb", 3), ("zb-v", 2)]


@pytest.mark.parametrize(("name", "v"), CASES)
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_same_step_when_free_shorter_when_not(name: str, k: int, v: int) -> None:
    for m in range(1, 4 * k + 1):
        ours = get(name, k, m, virtual_stages=v if name == "interleaved-zb" else None)
        full = every_split(name, k, m, v)
        assert full.num_split == full.num_stages * m
        assert ours.num_split <= full.num_split
        for f, b, w in COSTS:
            free = simulate(ours, f, b, weight_costs=w).makespan
            assert free == pytest.approx(simulate(full, f, b, weight_costs=w).makespan, abs=1e-9)
            cost = simulate(ours, f, b, weight_costs=w, split_overhead=0.1).makespan
            worst = simulate(full, f, b, weight_costs=w, split_overhead=0.1).makespan
            assert cost <= worst + 1e-9
            if m == 4 * k:  # a long steady state, whose backwards are whole
                assert ours.num_split < full.num_split and cost < worst
        assert all(a <= b for a, b in zip(ours.peak_activations, full.peak_activations))


@pytest.mark.parametrize("k", [2, 3, 4])
def test_zb_h1_splits_the_first_d_and_last_k_minus_d_on_device_d(k: int) -> None:
    m = 4 * k
    s = get("zb-h1", k, m)
    for d in range(k):
        got = [i for i in range(m) if s.splits(d, i)]
        want = [] if d == 0 else [*range(d), *range(m - (k - d), m)]
        assert got == want
    # so the steady state is 1F1B's own: F then a whole B, no W
    assert s.num_split == sum(k for d in range(1, k))


def test_every_backward_is_split_when_the_pipeline_never_settles() -> None:
    """At M = K every backward is in the fill or the drain: ZB-H1 splits all but stage 0's."""
    s = get("zb-h1", 4, 4)
    assert s.num_split == 3 * 4
    assert all(s.splits(d, i) for d in range(1, 4) for i in range(4))


def test_split_overhead_must_be_a_non_negative_number() -> None:
    s = get("zb-h1", 2, 4)
    with pytest.raises(ValueError, match="split_overhead must be finite and non-negative"):
        simulate(s, split_overhead=-0.1)
    with pytest.raises(TypeError, match="split_overhead must be a number"):
        simulate(s, split_overhead="0.1")  # type: ignore[arg-type]
