"""Cut a sequence of layer costs into K contiguous, non-empty stages of near-equal cost.

Two methods:

* ``"cumulative"`` — the GPipe paper's rule, exactly as the seed implements it: layer ``i``
  goes to stage ``min(int(cum_cost_i / total · K), K-1)`` where ``cum_cost_i`` is the summed
  cost of layers ``0..i`` (16 equal layers, K=2 → [7, 9]). The raw rule can leave a stage empty; ours
  then moves the fewest layers needed so that every stage has at least one.
* ``"optimal"`` — minimizes the largest stage cost over all contiguous cuts (binary search over
  the answer with a greedy feasibility check on exact prefix sums; among optimal cuts, the one
  that fills stages from the back is returned).

The invariant: the result is a list of K positive layer counts that sums to the number of
layers. ``pinned=n`` forces the first ``n`` layers onto stage 0 (the seed's ``before_tpl``).

Helpers at the bottom balance an ``nn.Sequential`` by FLOPs, parameter/activation memory
(via :mod:`gpipe.planner.cost`, nothing run) or by measured time (runs the layers).
"""

from __future__ import annotations

import math
import numbers
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn

__all__ = [
    "balance",
    "balance_by_flops",
    "balance_by_memory",
    "balance_by_time",
    "flops_weights",
    "stage_costs",
]


# ----------------------------------------------------------------------------- arguments


def _costs(costs: Any) -> list[float]:
    """``costs`` as a list of finite, non-negative floats, or an error naming the bad entry."""
    if isinstance(costs, (str, bytes, Mapping)) or not hasattr(costs, "__iter__"):
        raise TypeError(
            f"costs must be a sequence of numbers (one per layer), got {type(costs).__name__} "
            f"{costs!r:.60}"
        )
    out = []
    for i, c in enumerate(costs):
        if isinstance(c, bool) or not isinstance(c, numbers.Real):
            try:  # 0-dim tensors and numpy scalars are numbers too
                if isinstance(c, bool) or getattr(c, "ndim", None) != 0:
                    raise TypeError
                c = float(c)
            except (TypeError, ValueError):
                raise TypeError(
                    f"costs[{i}] is {type(c).__name__} {c!r:.40}; every layer cost must be a number"
                ) from None
        c = float(c)
        if not math.isfinite(c) or c < 0:
            raise ValueError(
                f"costs[{i}] is {c}; layer costs must be finite and non-negative (measure or "
                "estimate that layer again)"
            )
        out.append(c)
    if not math.isfinite(sum(out)):
        raise ValueError(
            f"the layer costs sum to inf (the largest is {max(out):.3g}); scale them down, e.g. "
            "divide every cost by the largest"
        )
    return out


def _int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def stage_costs(costs: Sequence[float], counts: Sequence[int]) -> list[float]:
    """The summed cost of each stage for a partition given as layer counts.

    ``counts`` must be non-negative ints summing to ``len(costs)`` (else the answer would
    silently drop or invent layers).
    """
    values = _costs(costs)
    if isinstance(counts, (str, bytes, Mapping)) or not hasattr(counts, "__iter__"):
        raise TypeError(f"counts must be a list of layer counts, got {counts!r:.60}")
    counts = [_int(c, f"counts[{j}]", 0) for j, c in enumerate(counts)]
    if sum(counts) != len(values):
        raise ValueError(
            f"counts={counts} sum to {sum(counts)} but there are {len(values)} layer costs; "
            "give one count per stage, summing to the number of layers"
        )
    out, i = [], 0
    for c in counts:
        out.append(float(sum(values[i : i + c])))
        i += c
    return out


def balance(
    costs: Sequence[float],
    num_stages: int,
    *,
    method: str = "optimal",
    pinned: int = 0,
) -> list[int]:
    """Layer counts per stage for ``costs`` cut into ``num_stages`` contiguous stages.

    ``method`` is ``"optimal"`` (min-max stage cost) or ``"cumulative"`` (the paper's rule).
    ``pinned`` layers at the front must sit on stage 0. Raises ``ValueError`` when a stage
    would be empty (more stages than layers, or more than ``len(costs) - pinned + 1``).
    """
    costs = _costs(costs)
    n, k = len(costs), _int(num_stages, "num_stages", 1)
    if method not in ("optimal", "cumulative"):
        raise ValueError(f"unknown balance method {method!r}; choose 'optimal' or 'cumulative'")
    if isinstance(pinned, bool) or not isinstance(pinned, numbers.Integral):
        raise TypeError(f"pinned must be an int (layers on stage 0), got {pinned!r}")
    if n == 0:
        raise ValueError("costs is empty: there are no layers to balance; give one cost per layer")
    if pinned < 0 or pinned > n:
        raise ValueError(f"pinned must be between 0 and the number of layers ({n}), got {pinned}")
    free = n - max(pinned, 1) + 1  # stage 0 holds the pinned block (at least one layer)
    if k > n or (pinned and k > free):
        raise ValueError(
            f"cannot cut {n} layers ({pinned} pinned to stage 0) into {k} non-empty stages; "
            f"use at most {free if pinned else n} stages"
        )
    if pinned > 1:
        # Treat the pinned block as one indivisible layer, then expand it back.
        merged = [sum(costs[:pinned]), *costs[pinned:]]
        counts = balance(merged, k, method=method)
        counts[0] += pinned - 1
        return counts
    if method == "cumulative":
        return _cumulative(costs, k)
    return _optimal(costs, k)


def _cumulative(costs: list[float], k: int) -> list[int]:
    total = sum(costs)
    n = len(costs)
    counts = [0] * k
    if total <= 0:
        assign = [min((i + 1) * k // n, k - 1) for i in range(n)]
    else:
        cum, assign = 0.0, []
        for c in costs:
            cum += c
            assign.append(min(int(cum / total * k), k - 1))
    for j in assign:
        counts[j] += 1
    return _fill_empty(counts)


def _fill_empty(counts: list[int]) -> list[int]:
    """Move single layers from the nearest populated neighbour into empty stages."""
    counts = list(counts)
    k = len(counts)
    for j in range(k):
        if counts[j]:
            continue
        # take from the left neighbour chain if it can spare, else from the right
        left = next((i for i in range(j - 1, -1, -1) if counts[i] > 1), None)
        right = next((i for i in range(j + 1, k) if counts[i] > 1), None)
        src = left if left is not None and (right is None or j - left <= right - j) else right
        assert src is not None, "more stages than layers was rejected earlier"
        # shifting one layer from src to j passes one layer through every stage in between
        counts[src] -= 1
        counts[j] += 1
    return counts


def _feasible(prefix: list[float], k: int, limit: float) -> bool:
    n = len(prefix) - 1
    start, stages = 0, 0
    while start < n:
        stages += 1
        if stages > k:
            return False
        # largest end with prefix[end] - prefix[start] <= limit, at least one layer
        end = start + 1
        if prefix[end] - prefix[start] > limit:
            return False
        lo, hi = end, n
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if prefix[mid] - prefix[start] <= limit:
                lo = mid
            else:
                hi = mid - 1
        start = lo
    return True


def _optimal(costs: list[float], k: int) -> list[int]:
    n = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # The optimum is one of the O(n^2) contiguous sums; binary-search over the sorted candidates
    # when n is small, else over the real line to float resolution.
    if n <= 400:
        cands = sorted({prefix[j] - prefix[i] for i in range(n) for j in range(i + 1, n + 1)})
        lo, hi = 0, len(cands) - 1
        while lo < hi:
            mid = (lo + hi) // 2
            if _feasible(prefix, k, cands[mid]):
                hi = mid
            else:
                lo = mid + 1
        best = cands[lo]
    else:
        lo_v, hi_v = max(costs), prefix[-1]
        for _ in range(200):
            mid = (lo_v + hi_v) / 2
            if _feasible(prefix, k, mid):
                hi_v = mid
            else:
                lo_v = mid
            if hi_v - lo_v <= 1e-12 * max(1.0, hi_v):
                break
        best = hi_v
    return _cut(prefix, k, best)


def _cut(prefix: list[float], k: int, limit: float) -> list[int]:
    """Cut into exactly k stages, each <= limit, filling from the back so that every stage
    gets a layer and the early stages (which hold more activations) get the slack."""
    n = len(prefix) - 1
    counts = []
    end = n
    for stages_left in range(k, 0, -1):
        # stage covers [start, end); it must leave at least stages_left-1 layers before it
        start = end - 1
        while start - 1 >= stages_left - 1 and prefix[end] - prefix[start - 1] <= limit:
            start -= 1
        if stages_left == 1:
            start = 0
        counts.append(end - start)
        end = start
    counts.reverse()
    return counts


# ----------------------------------------------------------------------------- nn helpers


def _check_layers(layers: Any, sample_inputs: tuple, fn: str) -> None:
    """Refuse what is not a list of layers, and a call without the sample inputs."""
    from torch import nn

    iterable = hasattr(layers, "__iter__") and not isinstance(layers, (str, bytes, Mapping))
    if isinstance(layers, nn.Module) and not hasattr(layers, "__iter__"):
        raise TypeError(
            f"{fn} takes an nn.Sequential or a list of layers, got one {type(layers).__name__}; "
            "wrap it: nn.Sequential(module)"
        )
    if not iterable:
        raise TypeError(
            f"{fn} takes an nn.Sequential or a list of layers, got {type(layers).__name__}"
        )
    if not sample_inputs:
        raise ValueError(
            f"{fn} needs sample inputs for the first layer: {fn}(layers, num_stages, x)"
        )


def flops_weights(costs: Sequence[Any]) -> list[int]:
    """What a layer weighs when the cut is balanced by FLOPs: forward + backward FLOPs, and at
    least 1 so that free layers (activations, reshapes) still count."""
    return [max(1, c.flops + c.backward_flops) for c in costs]


def balance_by_flops(
    layers: nn.Sequential | Sequence[nn.Module],
    num_stages: int,
    *sample_inputs: Any,
    method: str = "optimal",
    pinned: int = 0,
) -> list[int]:
    """Balance by forward+backward FLOPs from :func:`gpipe.planner.cost.profile` (nothing is run).

    Layers with no FLOPs (activations, reshapes) count as one FLOP so that they still weigh
    something when every layer is free.
    """
    from gpipe.planner.cost import profile

    _check_layers(layers, sample_inputs, "balance_by_flops")
    costs = profile(layers, *sample_inputs)
    return balance(
        flops_weights(costs),
        num_stages,
        method=method,
        pinned=pinned,
    )


def balance_by_memory(
    layers: nn.Sequential | Sequence[nn.Module],
    num_stages: int,
    *sample_inputs: Any,
    method: str = "optimal",
    pinned: int = 0,
) -> list[int]:
    """Balance by parameter + output-activation bytes (from :mod:`gpipe.planner.cost`, nothing run)."""
    from gpipe.planner.cost import profile

    _check_layers(layers, sample_inputs, "balance_by_memory")
    costs = profile(layers, *sample_inputs)
    return balance(
        [c.param_bytes + c.buffer_bytes + c.activation_bytes for c in costs],
        num_stages,
        method=method,
        pinned=pinned,
    )


def balance_by_time(
    layers: nn.Sequential | Sequence[nn.Module],
    num_stages: int,
    *sample_inputs: Any,
    repeats: int = 3,
    method: str = "optimal",
    pinned: int = 0,
) -> list[int]:
    """Balance by measured forward+backward wall time per layer (runs the layers for real).

    Each layer is timed ``repeats`` times on the output of the previous one; the median counts.
    """
    import torch

    from gpipe.base.microbatch import tree_detach

    _check_layers(layers, sample_inputs, "balance_by_time")
    repeats = _int(repeats, "repeats", 1)
    times = []
    x: Any = sample_inputs
    first = True
    for layer in layers:
        samples = []
        for _ in range(repeats):
            inp = _detached_requiring_grad(x)
            t0 = time.perf_counter()
            out = layer(*inp) if first else layer(inp)
            ts = [t for t in _tensors(out) if t.requires_grad]
            if ts:
                torch.autograd.backward(ts, [torch.ones_like(t) for t in ts])
            samples.append(time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
        times.append(sorted(samples)[len(samples) // 2])
        x = tree_detach(out)
        first = False
    return balance(times, num_stages, method=method, pinned=pinned)


def _tensors(obj: Any) -> list:
    import torch

    from gpipe.base.microbatch import tree_flatten

    return [leaf for _, leaf in tree_flatten(obj)[0] if isinstance(leaf, torch.Tensor)]


def _detached_requiring_grad(obj: Any) -> Any:
    import torch

    from gpipe.base.microbatch import tree_flatten

    leaves, rebuild = tree_flatten(obj)
    return rebuild(
        [
            v.detach().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v
            for _, v in leaves
        ]
    )


def check_stage_count(num_layers: int, num_devices: int, virtual_stages: int, pinned: int) -> None:
    """Enough layers for every (virtual) stage, after the pinned ones."""
    n_stages = num_devices * virtual_stages
    if n_stages > num_layers:
        extra = (
            f" ({num_devices} devices x {virtual_stages} virtual stages)"
            if virtual_stages > 1
            else ""
        )
        raise ValueError(
            f"cannot cut {num_layers} layers into {n_stages} stages{extra}; use at most "
            f"{num_layers} stages"
        )
    if pinned > num_layers:
        raise ValueError(
            f"pinned={pinned} but the model has {num_layers} layers; pin at most {num_layers}"
        )
    if pinned > num_layers - n_stages + 1:
        raise ValueError(
            f"pinned={pinned} leaves {num_layers - pinned} layers for the other "
            f"{n_stages - 1} stages; pin at most {num_layers - n_stages + 1}"
        )
