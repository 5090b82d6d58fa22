"""Where to cut a captured model into stages: balanced first, then where little crosses.

A captured model's layers are fine-grained, and what crosses a cut differs a lot from one
place to the next (a hidden state, or a hidden state plus a mask plus position embeddings).
:func:`balance_small_boundaries` keeps the stage cost within ``slack`` of the optimal min-max
balance and, among those cuts, takes the one whose boundaries carry the fewest bytes.

The invariant: the most expensive stage costs at most ``(1 + slack)`` times that of the
optimal balance (:func:`gpipe.planner.balance.balance`), every stage is non-empty, and the first
``pinned`` layers are on stage 0. Pure Python over lists; nothing here knows torch.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpipe.planner.balance import balance, stage_costs

__all__ = ["balance_small_boundaries"]


def balance_small_boundaries(
    weights: Sequence[float],
    boundary_bytes: Sequence[int],
    num_stages: int,
    *,
    slack: float = 0.05,
    pinned: int = 0,
) -> list[int]:
    """Layer counts per stage. ``boundary_bytes[i]`` is what crosses a cut after layer ``i``."""
    best = balance(weights, num_stages, pinned=pinned)  # validates the arguments
    n, k = len(weights), num_stages
    if k == 1:
        return best
    limit = max(stage_costs(weights, best)) * (1 + slack)
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    # cost[s][i]: least bytes over the cuts of the first i layers into s stages
    cost = [[inf] * (n + 1) for _ in range(k + 1)]
    back = [[0] * (n + 1) for _ in range(k + 1)]
    cost[0][0] = 0.0
    for s in range(1, k + 1):
        for i in range(s, n - (k - s) + 1):
            for j in range(s - 1, i):
                if cost[s - 1][j] == inf or prefix[i] - prefix[j] > limit:
                    continue
                if s == 1 and i < max(pinned, 1):
                    continue
                c = cost[s - 1][j] + (boundary_bytes[i - 1] if s < k else 0)
                if c < cost[s][i]:
                    cost[s][i], back[s][i] = c, j
    if cost[k][n] == inf:  # pragma: no cover - the optimal balance itself is feasible
        return best
    counts, i = [], n
    for s in range(k, 0, -1):
        j = back[s][i]
        counts.append(i - j)
        i = j
    return counts[::-1]
