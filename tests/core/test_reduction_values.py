"""Value checks of the micro-batch loss factors (gpipe.core.reduction) that ``make mutants``
showed were missing: each reduction's factors and item total, the replicas' weights, every
refusal's exact message, and when the uneven-``-100`` warning fires."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from gpipe.core.reduction import (
    check,
    count_items,
    microbatch_scales,
    replica_weights,
    warn_uneven,
)


def _message(kind: type[Exception], fn, *args, **kwargs) -> str:
    with pytest.raises(kind) as err:
        fn(*args, **kwargs)
    return str(err.value)


def test_each_reduction_gives_its_factors_and_item_total() -> None:
    targets = [torch.tensor([1, -100, 2]), torch.tensor([-100, -100, 3]), torch.tensor([4, 5, 6])]
    assert microbatch_scales("mean", targets) == ([1 / 3] * 3, 3.0)
    assert microbatch_scales("sum", targets) == ([1.0] * 3, 3.0)
    assert microbatch_scales(count_items(), targets) == ([2 / 6, 1 / 6, 3 / 6], 6.0)
    # plain numbers, not tensors, are counts too; a replica's share may hold no items
    assert microbatch_scales(lambda t: 0, [1, 2], whole=False) == (
        [0.0, 0.0],
        0.0,
    )
    assert microbatch_scales(len, [[1, 2, 3], [4]]) == ([0.75, 0.25], 4.0)
    assert microbatch_scales(len, [[1], []]) == ([1.0, 0.0], 1.0)  # one item in all
    # a tensor count next to a plain number: each read as a number
    assert microbatch_scales(lambda t: torch.tensor(2) if t == 0 else 1, [0, 1]) == (
        [2 / 3, 1 / 3],
        3.0,
    )


def test_a_count_of_no_items_in_the_whole_mini_batch_is_refused() -> None:
    zero = count_items(ignore_index=7)
    assert _message(ValueError, microbatch_scales, zero, [torch.tensor([7, 7])] * 2) == (
        "reduction=count_items(ignore_index=7) counted 0 items in every one of the 2 "
        "micro-batches, so the mini-batch's mean is over nothing (NaN for the plain model) and "
        "the step would train on a loss of 0; check the count function (e.g. its ignore_index "
        "against the targets), or skip batches without items"
    )
    assert microbatch_scales(zero, [torch.tensor([7, 1])] * 2) == ([0.5, 0.5], 2.0)


def test_bad_counts_are_refused_naming_the_micro_batch() -> None:
    def one(t):
        return 1

    assert _message(ValueError, microbatch_scales, one, [torch.zeros(1), None]) == (
        f"reduction={one.__qualname__} counts the items of each micro-batch's targets, but "
        "micro-batch 1 has none; pass the targets to step() (with DistributedPipe, on the rank "
        "that runs the last stage)"
    )

    def broken(t):
        raise KeyError("x")

    assert _message(ValueError, microbatch_scales, broken, [0, 1]) == (
        f"reduction={broken.__qualname__} failed on micro-batch 0's targets (KeyError: 'x'); "
        "it must return the number of items in the targets it is given (one micro-batch's)"
    )
    for bad in (-1, math.inf, math.nan, True, "3"):
        assert _message(ValueError, microbatch_scales, lambda t, b=bad: b, [0, 1]) == (
            "reduction=test_bad_counts_are_refused_naming_the_micro_batch.<locals>.<lambda> "
            f"must return the number of items (a count >= 0) of micro-batch 0's targets, "
            f"got {bad!r}"
        )

    class Counter:  # an instance has no __qualname__: its type's name stands in
        def __call__(self, t):
            return -1

    assert _message(ValueError, microbatch_scales, Counter(), [0]).startswith(
        "reduction=Counter must return"
    )


def test_replica_weights() -> None:
    assert replica_weights("mean", [4.0, 4.0]) == [0.5, 0.5]
    assert replica_weights("mean", [4.0, 4.0], rows=[6, 2]) == [0.75, 0.25]
    assert replica_weights("mean", [4.0, 4.0], rows=[6, None]) == [0.5, 0.5]
    assert replica_weights("mean", [4.0, 4.0], rows=[0, 0]) == [0.5, 0.5]
    assert replica_weights("sum", [4.0, 4.0, 4.0]) == [1.0, 1.0, 1.0]
    assert replica_weights(count_items(), [3.0, 1.0]) == [0.75, 0.25]
    assert replica_weights(count_items(), [0.0, 0.0]) == [0.0, 0.0]
    assert replica_weights(count_items(), [1.0, 0.0]) == [1.0, 0.0]
    assert replica_weights("mean", [4.0, 4.0], rows=[1, 0]) == [1.0, 0.0]


def test_every_refused_reduction_says_why() -> None:
    assert _message(TypeError, check, count_items) == (
        "reduction=gpipe.count_items is the function that makes the count; call it: "
        "reduction=gpipe.count_items() (or gpipe.count_items(ignore_index=...))"
    )
    assert _message(TypeError, check, max) == (
        "reduction=max (Python's built-in) would weight each micro-batch by the max of its "
        "target values, not by a count of items; for a loss that sums pass reduction='sum' "
        "(the string), for a mean over items a count such as gpipe.count_items()"
    )
    for bad in ("avg", None, 3):
        assert _message(ValueError, check, bad) == (
            "reduction must be 'mean', 'sum' or a callable count(targets) -> number of items "
            f"(e.g. gpipe.count_items()), got {bad!r}"
        )
    for ok in ("mean", "sum", len, count_items()):
        check(ok)


def test_count_items_counts_one_tensor_and_refuses_other_arguments() -> None:
    count = count_items()
    assert count.__qualname__ == "count_items(ignore_index=-100)"
    assert int(count({"labels": torch.tensor([1, -100, 3])})) == 2
    assert int(count_items(0.5)(torch.tensor([0.5, 1.0]))) == 1
    assert _message(ValueError, count, (torch.zeros(1), torch.zeros(1))) == (
        "count_items counts one target tensor, got 2 tensors in the targets; pass "
        "reduction=your own count(targets) function"
    )
    assert _message(TypeError, count_items, "x") == (
        "count_items(ignore_index) takes the target value to leave out (a number, e.g. -100), "
        "got str; pass reduction=gpipe.count_items() and the step counts each micro-batch's "
        "targets itself"
    )
    assert "got bool" in _message(TypeError, count_items, True)


def _warns(targets) -> bool:
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        warn_uneven(targets)
    if got:
        assert str(got[0].message) == (
            "the targets hold -100 (cross_entropy's ignore_index) in unequal numbers per "
            "micro-batch, and reduction='mean' averages the micro-batches' losses: if loss_fn "
            "ignores them, that average differs from the whole mini-batch's mean over its "
            "tokens. Pass reduction=gpipe.count_items() to weight each micro-batch by its "
            "items (or reduction='sum' with a summing loss_fn)"
        )
    return bool(got)


def test_the_uneven_warning_fires_only_for_unequal_ignored_integer_targets() -> None:
    assert _warns([torch.tensor([1, -100]), torch.tensor([1, 2])])
    assert _warns([torch.tensor([1, -100, -100]), torch.tensor([1])])  # the ignored ones differ
    assert not _warns([torch.tensor([1, -100]), torch.tensor([-100, 2])])
    assert not _warns([torch.tensor([1.0, -100.0]), torch.tensor([1.0, 2.0])])  # floats
    assert not _warns([(torch.tensor([-100]), torch.tensor([1])), (torch.tensor([1]),) * 2])
    assert _warns([{"y": torch.tensor([-100, -100])}, {"y": torch.tensor([-100, 1])}])
