"""How the micro-batch losses add up to the mini-batch's loss: the factor of each.

``step(..., reduction=)`` says what ``loss_fn`` computes on a micro-batch:

* ``"mean"``: a mean over its rows. Every micro-batch has as many rows, so the mini-batch's
  loss is the average of the M losses (each is scaled by ``1/M``).
* ``"sum"``: a sum. The losses are added (each scaled by 1).
* a callable ``count(targets) -> int``: a mean over the *items* of the micro-batch that
  ``count`` counts in its targets (for a cross-entropy with ``ignore_index``, the tokens not
  ignored: :func:`count_items`). Micro-batches may hold different numbers of items, so the
  average of their means is not the mini-batch's mean; each loss is scaled by its share of
  the mini-batch's items, ``n_i / N``, which is. A micro-batch with no items adds nothing
  (its loss function, a mean over nothing, is not called); a mini-batch with none at all is
  refused, naming the count. The count may be any weight: a
  class-weighted cross-entropy (``weight=w``) averages over ``w[targets].sum()``.

With ``"mean"``, integer targets that hold ``-100`` (PyTorch's ``ignore_index``) in unequal
numbers per micro-batch are warned about (:func:`warn_uneven`): that is the silent
difference the callable removes.

The invariant: ``sum_i scale_i * loss_fn(out_i, t_i)`` equals ``loss_fn`` over the whole
mini-batch, and the gradients follow it; over data-parallel replicas the same holds with the
replicas weighted by :func:`replica_weights`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gpipe.base.microbatch import tree_flatten

__all__ = [
    "Reduction",
    "check",
    "count_items",
    "microbatch_scales",
    "replica_weights",
    "warn_uneven",
]

Reduction = str | Callable[[Any], Any]

IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default
# built-ins that are callable on targets but compute a value of them, never a count of items
_VALUE_BUILTINS = (sum, max, min, abs)


def check(reduction: Any) -> None:
    """A known reduction: ``"mean"``, ``"sum"`` or an item-counting callable."""
    if reduction is count_items:
        raise TypeError(
            "reduction=gpipe.count_items is the function that makes the count; call it: "
            "reduction=gpipe.count_items() (or gpipe.count_items(ignore_index=...))"
        )
    if any(reduction is b for b in _VALUE_BUILTINS):
        name = reduction.__name__
        raise TypeError(
            f"reduction={name} (Python's built-in) would weight each micro-batch by the "
            f"{name} of its target values, not by a count of items; for a loss that sums pass "
            "reduction='sum' (the string), for a mean over items a count such as "
            "gpipe.count_items()"
        )
    if reduction in ("mean", "sum") or (callable(reduction) and not isinstance(reduction, str)):
        return
    raise ValueError(
        f"reduction must be 'mean', 'sum' or a callable count(targets) -> number of items "
        f"(e.g. gpipe.count_items()), got {reduction!r}"
    )


def count_items(ignore_index: float = IGNORE_INDEX) -> Callable[[Any], torch.Tensor]:
    """A ``reduction`` for a loss that averages over the targets not equal to
    ``ignore_index`` (``F.cross_entropy(..., ignore_index=-100)`` with padded sequences): the
    pipelined loss and gradients then equal the whole mini-batch's mean over its tokens.

    A loss that shifts its labels (a causal LM that predicts ``labels[:, 1:]``) counts the
    shifted ones: pass ``lambda t: (t[:, 1:] != -100).sum()`` instead."""

    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, float)):
        raise TypeError(
            f"count_items(ignore_index) takes the target value to leave out (a number, e.g. "
            f"-100), got {type(ignore_index).__name__}; pass reduction=gpipe.count_items() "
            "and the step counts each micro-batch's targets itself"
        )

    def count(targets: Any) -> torch.Tensor:
        leaves = [v for _, v in tree_flatten(targets)[0] if isinstance(v, torch.Tensor)]
        if len(leaves) != 1:
            raise ValueError(
                f"count_items counts one target tensor, got {len(leaves)} tensors in the "
                "targets; pass reduction=your own count(targets) function"
            )
        return (leaves[0] != ignore_index).sum()

    count.__qualname__ = f"count_items(ignore_index={ignore_index})"
    return count


def microbatch_scales(
    reduction: Reduction, targets: Sequence[Any], *, whole: bool = True
) -> tuple[list[float], float]:
    """Each micro-batch's loss factor, and the number of items of the mini-batch (``M`` rows'
    worth for ``"mean"`` and ``"sum"``, counted for a callable); ``targets`` are the
    micro-batches' targets (``None`` each where this rank has none: only their count
    matters then). When they are the ``whole`` mini-batch's, a count of no items at all is
    refused: the mean over nothing is NaN for the plain model, and would pass here as a loss
    of 0 with zero gradients. (One data-parallel replica's share may hold none.)"""
    m = len(targets)
    if reduction == "mean":
        return [1.0 / m] * m, float(m)
    if reduction == "sum":
        return [1.0] * m, float(m)
    raw = [_raw_count(reduction, t, i) for i, t in enumerate(targets)]
    counts = [_checked(reduction, n, i) for i, n in enumerate(_host_values(raw))]
    total = math.fsum(counts)
    if whole and total == 0:
        raise ValueError(
            f"reduction={_name(reduction)} counted 0 items in every one of the {m} "
            "micro-batches, so the mini-batch's mean is over nothing (NaN for the plain "
            "model) and the step would train on a loss of 0; check the count function "
            "(e.g. its ignore_index against the targets), or skip batches without items"
        )
    return [c / total if total > 0 else 0.0 for c in counts], total


def _raw_count(reduction: Callable[[Any], Any], target: Any, microbatch: int) -> Any:
    if target is None:
        raise ValueError(
            f"reduction={_name(reduction)} counts the items of each micro-batch's targets, "
            f"but micro-batch {microbatch} has none; pass the targets to step() (with "
            "DistributedPipe, on the rank that runs the last stage)"
        )
    try:
        return reduction(target)
    except Exception as e:
        raise ValueError(
            f"reduction={_name(reduction)} failed on micro-batch {microbatch}'s targets "
            f"({type(e).__name__}: {e}); it must return the number of items in the targets "
            "it is given (one micro-batch's)"
        ) from e


def _host_values(raw: list[Any]) -> list[Any]:
    """The counts as numbers: one-element tensors of one device read in one transfer (one
    wait for a GPU, not one per micro-batch); anything else as it is, for the check."""
    one = [isinstance(n, torch.Tensor) and n.numel() == 1 for n in raw]
    if all(one) and len({n.device for n in raw}) == 1:
        return torch.stack([n.reshape(()).double() for n in raw]).tolist()
    return [n.item() if ok else n for n, ok in zip(raw, one, strict=True)]


def _checked(reduction: Callable[[Any], Any], n: Any, microbatch: int) -> float:
    if isinstance(n, bool) or not isinstance(n, (int, float)) or not n >= 0 or math.isinf(n):
        raise ValueError(
            f"reduction={_name(reduction)} must return the number of items (a count >= 0) "
            f"of micro-batch {microbatch}'s targets, got {n!r}"
        )
    return float(n)


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def replica_weights(
    reduction: Reduction, items: Sequence[float], rows: Sequence[int | None] | None = None
) -> list[float]:
    """The weight of each data-parallel replica's loss and gradients in the global ones,
    from each replica's item count (``M`` each for ``"mean"`` and ``"sum"``). ``rows``: each
    replica's rows where replicas were given shards of their own, which may differ in size;
    a ``"mean"`` then weighs each replica by its share of the rows (``1/D`` when they are
    equal)."""
    d = len(items)
    if reduction == "mean":
        counts = [] if rows is None else [n for n in rows if n is not None]
        if len(counts) != d or sum(counts) <= 0:
            return [1.0 / d] * d
        return [n / sum(counts) for n in counts]
    if reduction == "sum":
        return [1.0] * d
    total = math.fsum(items)
    return [n / total if total > 0 else 0.0 for n in items]


def warn_uneven(targets: Sequence[Any]) -> None:
    """Warn when ``"mean"`` meets integer targets holding ``-100`` (PyTorch's
    ``ignore_index``) in unequal numbers per micro-batch: a loss that ignores them averages
    each micro-batch over a different count, and the average of those means differs from the
    whole mini-batch's mean. Checks host tensors only (on a GPU the check would wait for it)."""
    counts = []
    for t in targets:
        leaves = [v for _, v in tree_flatten(t)[0] if isinstance(v, torch.Tensor)]
        if len(leaves) != 1 or leaves[0].device.type != "cpu" or leaves[0].is_floating_point():
            return
        counts.append(int((leaves[0] == IGNORE_INDEX).sum()))
    if len(set(counts)) > 1:
        warnings.warn(
            "the targets hold -100 (cross_entropy's ignore_index) in unequal numbers per "
            "micro-batch, and reduction='mean' averages the micro-batches' losses: if loss_fn "
            "ignores them, that average differs from the whole mini-batch's mean over its "
            "tokens. Pass reduction=gpipe.count_items() to weight each micro-batch by its "
            "items (or reduction='sum' with a summing loss_fn)",
            stacklevel=4,
        )
