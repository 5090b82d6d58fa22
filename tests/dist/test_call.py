"""The per-step agreement's pieces that need no process group: the checksum of a batch
(:func:`gpipe.dist.call.checksum`), the ``batch=`` option, and the replicas' weights when
their shards differ in size (:func:`gpipe.core.reduction.replica_weights`)."""

from __future__ import annotations

import pytest
import torch

from gpipe.core.reduction import replica_weights
from gpipe.dist.call import check_batch_mode, checksum


def _batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.randn(6, 5, generator=g), "ids": torch.randint(0, 9, (6, 4), generator=g)}


def test_equal_batches_have_one_checksum_and_any_change_another() -> None:
    b = _batch()
    same = {k: v.clone() for k, v in b.items()}
    assert checksum(b, 0) == checksum(same, 0)
    changed = [
        {**b, "x": b["x"].flip(0)},  # rows swapped
        {**b, "ids": b["ids"].flip(1)},  # values within a row reordered
        {**b, "x": b["x"].double()},  # dtype
        {**b, "x": b["x"][:5]},  # rows
        {
            **b,
            "x": b["x"].clone().index_put_((torch.tensor(3), torch.tensor(2)), torch.tensor(1.5)),
        },
        {"y": b["x"], "ids": b["ids"]},  # a name
    ]
    sums = {checksum(c, 0) for c in changed}
    assert checksum(b, 0) not in sums and len(sums) == len(changed)


def test_a_large_tensor_is_read_in_part_and_still_tells_batches_apart() -> None:
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 3, 128, 256, generator=g)  # 393216 words: more than it reads
    assert checksum(images, 0) == checksum(images.clone(), 0)
    assert checksum(images, 0) != checksum(images.flip(0), 0)
    other = torch.randn(4, 3, 128, 256, generator=g)
    assert checksum(images, 0) != checksum(other, 0)
    moved = images.movedim(0, 1)  # the batch along dim 1: its rows are still told apart
    assert checksum(moved, 1) != checksum(moved.flip(1), 1)


def test_the_batch_option_is_checked() -> None:
    assert check_batch_mode("per_replica") == "per_replica"
    with pytest.raises(ValueError, match=r"batch must be 'same' .*'per_replica'.*got 'shard'"):
        check_batch_mode("shard")


def test_a_mean_weighs_replicas_by_their_rows_when_shards_differ() -> None:
    assert replica_weights("mean", [2.0, 2.0]) == [0.5, 0.5]
    assert replica_weights("mean", [2.0, 2.0], [8, 4]) == [8 / 12, 4 / 12]
    assert replica_weights("mean", [2.0, 2.0, 2.0], [5, 5, 5]) == [1 / 3] * 3  # exactly 1/D
    assert replica_weights("sum", [2.0, 2.0], [8, 4]) == [1.0, 1.0]
    assert replica_weights(len, [3.0, 1.0], [8, 4]) == [0.75, 0.25]  # a count: its items
