"""Value checks that kill the mutants of ``gpipe.base.microbatch`` the main tests let live.

They pin: key-order alignment of dicts nested in lists, dicts and dataclasses when merging;
structure differences inside dataclasses and NamedTuples named by path; the leaf paths of
``tree_flatten``; no copy for a single micro-batch; where the clamping warning points; and the
wording of each error (it names the path, the value and the fix). See docs/mutation.md.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections import OrderedDict
from typing import Any, NamedTuple

import pytest
import torch

from gpipe.base.microbatch import (
    batch_size,
    merge,
    num_microbatches,
    split,
    tree_detach,
    tree_flatten,
    tree_unflatten,
)


class Pair(NamedTuple):
    a: Any
    b: Any


@dataclasses.dataclass
class Box:
    x: Any
    extra: Any = None


def _raises(exc: type[Exception], call, *args, **kwargs) -> str:
    with pytest.raises(exc) as info:
        call(*args, **kwargs)
    return str(info.value)


def _rows(lo: int, hi: int) -> torch.Tensor:
    return torch.arange(lo, hi, dtype=torch.float32)


# ------------------------------------------------------------------------- alignment


def test_merge_aligns_dicts_inside_a_list() -> None:
    m0 = [{"a": _rows(0, 2), "b": _rows(10, 12)}]
    m1 = [{"b": _rows(12, 14), "a": _rows(2, 4)}]
    out = merge([m0, m1])
    assert out[0]["a"].tolist() == [0, 1, 2, 3]
    assert out[0]["b"].tolist() == [10, 11, 12, 13]


def test_merge_aligns_dicts_inside_a_dict() -> None:
    m0 = {"o": {"a": _rows(0, 1), "b": _rows(10, 11)}}
    m1 = {"o": {"b": _rows(11, 12), "a": _rows(1, 2)}}
    out = merge([m0, m1])
    assert out["o"]["a"].tolist() == [0, 1]
    assert out["o"]["b"].tolist() == [10, 11]


def test_merge_aligns_dicts_inside_a_dataclass() -> None:
    m0 = Box({"a": _rows(0, 1), "b": _rows(10, 11)}, extra=7)
    m1 = Box({"b": _rows(11, 12), "a": _rows(1, 2)}, extra=8)
    out = merge([m0, m1])
    assert isinstance(out, Box)
    assert out.x["a"].tolist() == [0, 1]
    assert out.x["b"].tolist() == [10, 11]
    assert out.extra == 7  # non-tensor leaves come from micro-batch 0


def test_merge_keeps_a_dict_subclass() -> None:
    m0 = OrderedDict([("a", _rows(0, 1)), ("b", _rows(10, 11))])
    m1 = OrderedDict([("b", _rows(11, 12)), ("a", _rows(1, 2))])
    out = merge([m0, m1])
    assert type(out) is OrderedDict
    assert list(out) == ["a", "b"]
    assert out["a"].tolist() == [0, 1]


def test_merge_of_one_microbatch_makes_no_copy() -> None:
    t = _rows(0, 3)
    assert merge([t]) is t
    assert merge([{"a": t}])["a"] is t


# ------------------------------------------------------------------------- differences


def test_merge_names_a_difference_inside_a_dataclass() -> None:
    msg = _raises(ValueError, merge, [Box(_rows(0, 1)), Box([_rows(1, 2)])])
    assert msg == (
        "micro-batch 1.x is a list where micro-batch 0 has a tensor; "
        "every micro-batch must have the same structure"
    )


def test_merge_names_a_namedtuple_field() -> None:
    msg = _raises(ValueError, merge, [Pair(_rows(0, 1), 1), Pair(_rows(1, 2), _rows(0, 1))])
    assert msg == (
        "micro-batch 1.b is a tensor where micro-batch 0 has a int; "
        "every micro-batch must have the same structure"
    )
    # a plain tuple is indexed, not named
    msg = _raises(ValueError, merge, [(_rows(0, 1), 1), (_rows(1, 2), _rows(0, 1))])
    assert msg.startswith("micro-batch 1[1] is a tensor where micro-batch 0 has a int")


def test_merge_names_a_container_where_a_plain_leaf_was() -> None:
    msg = _raises(ValueError, merge, [{"t": _rows(0, 1), "n": 1}, {"t": _rows(1, 2), "n": {}}])
    assert msg.startswith("micro-batch 1['n'] is a dict where micro-batch 0 has a int")


def test_merge_lists_both_key_sets() -> None:
    m0 = {"a": _rows(0, 1), "b": _rows(0, 1)}
    m1 = {"a": _rows(0, 1), "c": _rows(0, 1)}
    msg = _raises(ValueError, merge, [m0, m1])
    assert msg.startswith("micro-batch 1 has keys ['a', 'c'] where micro-batch 0 has ['a', 'b']")


def test_merge_error_wording() -> None:
    assert _raises(ValueError, merge, []) == "merge needs at least one micro-batch"
    assert _raises(TypeError, merge, _rows(0, 2)).endswith("use split() to cut a batch")
    msg = _raises(ValueError, merge, [_rows(0, 2), _rows(0, 2).double()])
    assert msg.endswith("must agree in dtype and device (cast them in the model)")


# ------------------------------------------------------------------------- batch_size


def test_batch_size_error_wording() -> None:
    assert _raises(ValueError, batch_size, {"a": 1}) == (
        "the input holds no tensor, so there is no batch to split"
    )
    x = {"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(3)}
    assert _raises(ValueError, batch_size, x) == (
        "tensors differ in size along batch_dim=0 (size 2: input['a'], input['b']; "
        "size 3: input['c']); every tensor of one input must hold the same batch"
    )
    assert _raises(TypeError, batch_size, torch.zeros(2), 1.0) == (
        "batch_dim must be an int (a dimension index), got float 1.0"
    )


def test_batch_dim_equal_to_ndim_is_out_of_range() -> None:
    msg = _raises(ValueError, batch_size, torch.zeros(2, 3), 2)
    assert msg == (
        "input has shape (2, 3); batch_dim=2 is out of range (use a dimension in [-2, 1])"
    )
    assert batch_size(torch.zeros(2, 3), 1) == 3


# ------------------------------------------------------------------------------ split


def test_split_without_sizes_is_one_microbatch() -> None:
    x = _rows(0, 4)
    parts = split(x)
    assert len(parts) == 1
    assert parts[0].tolist() == [0, 1, 2, 3]


def test_split_into_as_many_chunks_as_rows_does_not_warn() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert [p.tolist() for p in split(_rows(0, 4), 4)] == [[0], [1], [2], [3]]


def test_clamping_warning_points_at_the_caller() -> None:
    with pytest.warns(UserWarning, match="exceeds the batch size 2") as record:
        parts = split(_rows(0, 2), 3)
    assert len(parts) == 2
    assert not record[0].filename.endswith("gpipe/base/microbatch.py")
    if "MUTANT_UNDER_TEST" not in os.environ:  # mutmut's trampolines add frames
        assert record[0].filename == __file__


def test_split_error_wording() -> None:
    assert (
        _raises(TypeError, split, _rows(0, 4), 2.0) == "chunks must be an int >= 1, got float 2.0"
    )
    msg = _raises(ValueError, split, torch.zeros(0, 3), 2)
    assert msg.endswith("one row per micro-batch, so skip empty batches")


# --------------------------------------------------------------------------- pytree


def test_tree_flatten_paths_of_namedtuple_and_dataclass_fields() -> None:
    leaves, _ = tree_flatten(Pair(1, Box(2, extra=3)))
    assert leaves == [("input.a", 1), ("input.b.x", 2), ("input.b.extra", 3)]
    leaves, _ = tree_flatten({"k": Pair(1, 2)}, "out")
    assert [p for p, _ in leaves] == ["out['k'].a", "out['k'].b"]


def test_tree_unflatten_rebuilds_from_any_sequence() -> None:
    leaves, rebuild = tree_flatten({"a": [1, 2], "b": Pair(3, 4)})
    assert [v for _, v in leaves] == [1, 2, 3, 4]
    assert tree_unflatten(rebuild, (5, 6, 7, 8)) == {"a": [5, 6], "b": Pair(7, 8)}
    assert tree_unflatten(rebuild, iter([5, 6, 7, 8])) == {"a": [5, 6], "b": Pair(7, 8)}


# ------------------------------------------------------------------ num_microbatches


def test_empty_batch_names_its_batch_dim() -> None:
    msg = _raises(ValueError, num_microbatches, 0, 2, None)
    assert msg.startswith("the batch is empty (0 rows along batch_dim=0);")
    msg = _raises(ValueError, split, torch.zeros(3, 0), 2, batch_dim=1)
    assert msg.startswith("the batch is empty (0 rows along batch_dim=1);")


def test_no_clamp_refuses_more_chunks_than_rows() -> None:
    assert num_microbatches(4, 4, None, clamp=False) == 4
    msg = _raises(ValueError, num_microbatches, 2, 4, None, clamp=False)
    assert msg == (
        "chunks=4 exceeds the batch size 2; a distributed pipe cannot lower it (ranks without "
        "the batch would still run chunks micro-batches), so choose chunks <= 2"
    )


def test_tree_detach_detaches_tensors_only() -> None:
    w = torch.ones(2, requires_grad=True)
    out = tree_detach({"y": w * 3, "n": 4, "l": [w]})
    assert out["n"] == 4
    assert torch.equal(out["y"], torch.full((2,), 3.0)) and not out["y"].requires_grad
    assert not out["l"][0].requires_grad and out["l"][0].data_ptr() == w.data_ptr()
