"""split/merge: round-trip for any pytree and dimension, the seed's clamping and errors.

Value checks that kill the mutants of ``gpipe.base.microbatch`` the main tests let live.

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
from hypothesis import given, settings
from hypothesis import strategies as st

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


def _equal(x: object, y: object) -> bool:
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(_equal(x[k], y[k]) for k in x)
    if isinstance(x, (list, tuple)):
        return type(x) is type(y) and len(x) == len(y) and all(map(_equal, x, y))
    if dataclasses.is_dataclass(x):
        return type(x) is type(y) and all(
            _equal(getattr(x, f.name), getattr(y, f.name)) for f in dataclasses.fields(x)
        )
    return x == y


@st.composite
def pytrees(draw: st.DrawFn, batch: int, dim: int, depth: int = 0) -> object:
    def tensor() -> torch.Tensor:
        ndim = draw(st.integers(dim + 1, dim + 3))
        shape = [draw(st.integers(1, 3)) for _ in range(ndim)]
        shape[dim] = batch
        return torch.randn(*shape)

    if depth >= 2:
        choice = draw(st.sampled_from(["leaf", "none", "int"]))
        return tensor() if choice == "leaf" else (None if choice == "none" else 7)
    kind = draw(st.sampled_from(["tensor", "dict", "list", "tuple", "named", "dataclass", "none"]))
    if kind == "tensor":
        return tensor()
    if kind == "none":
        return None
    if kind == "dict":
        return {
            f"k{i}": draw(pytrees(batch, dim, depth + 1)) for i in range(draw(st.integers(1, 3)))
        }
    if kind == "list":
        return [draw(pytrees(batch, dim, depth + 1)) for _ in range(draw(st.integers(1, 3)))]
    if kind == "tuple":
        return tuple(draw(pytrees(batch, dim, depth + 1)) for _ in range(draw(st.integers(1, 3))))
    if kind == "named":
        return Pair(tensor(), draw(pytrees(batch, dim, depth + 1)))
    return Box(tensor(), draw(st.sampled_from(["a", "b"])))


@settings(max_examples=150, deadline=None)
@given(data=st.data(), chunks=st.sampled_from([1, 2, 3, 4, 6]), dim=st.integers(0, 2))
def test_split_merge_round_trip(data: st.DataObject, chunks: int, dim: int) -> None:
    per = data.draw(st.integers(1, 3))
    batch = per * chunks
    tree = {"main": torch.randn(*([2] * dim), batch), "rest": data.draw(pytrees(batch, dim))}
    tree["main"] = tree["main"].movedim(-1, dim)
    parts = split(tree, chunks, batch_dim=dim)
    assert len(parts) == chunks
    for t, p in enumerate(parts):
        assert p["main"].shape[dim] == per
        assert torch.equal(p["main"], tree["main"].narrow(dim, t * per, per))
    assert _equal(merge(parts, batch_dim=dim), tree)


def test_none_and_non_tensors_pass_through() -> None:
    x = {"x": torch.arange(8), "mask": None, "name": "batch", "n": 3}
    for p in split(x, 4):
        assert p["mask"] is None and p["name"] == "batch" and p["n"] == 3
        assert p["x"].shape == (2,)


def test_micro_batch_size_and_chunks() -> None:
    x = torch.arange(16)
    assert [p.tolist() for p in split(x, micro_batch_size=4)][1] == [4, 5, 6, 7]
    assert len(split(x, 4, micro_batch_size=4)) == 4
    with pytest.raises(ValueError, match=r"1 \* 8 != batch size: .*16|1 \* 8 != 16"):
        split(x, 8, micro_batch_size=1)


def test_clamps_chunks_to_batch_with_warning() -> None:
    with pytest.warns(UserWarning, match="exceeds the batch size 3"):
        parts = split(torch.arange(3), 8)
    assert len(parts) == 3


def test_indivisible_batch_is_an_error_naming_numbers() -> None:
    with pytest.raises(ValueError, match="batch size 10 is not divisible by chunks=4"):
        split(torch.zeros(10), 4)
    with pytest.raises(ValueError, match="chunks must be >= 1"):
        split(torch.zeros(10), 0)


def test_mismatched_batch_sizes_name_paths() -> None:
    with pytest.raises(ValueError, match=r"size 4: input\['a'\].*size 5: input\['b'\]\[1\]"):
        batch_size({"a": torch.zeros(4), "b": (torch.zeros(4), torch.zeros(5))})
    with pytest.raises(ValueError, match="no tensor"):
        split({"a": None}, 2)


def test_dataclass_and_namedtuple_survive() -> None:
    x = Pair(torch.arange(4.0), Box(torch.ones(4, 2)))
    parts = split(x, 2)
    assert isinstance(parts[0], Pair) and isinstance(parts[0].b, Box)
    assert parts[0].b.x.shape == (2, 2)
    assert _equal(merge(parts), x)


def test_split_keeps_autograd() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    (split(x, 2)[1].sum() * 2).backward()
    assert x.grad is not None and x.grad[:2].abs().sum() == 0 and (x.grad[2:] == 2).all()


def test_merge_names_the_micro_batch_whose_shape_differs() -> None:
    with pytest.raises(
        ValueError, match=r"micro-batch 1\['y'\] has shape \(2, 5\) but micro-batch 0 gave \(2, 4\)"
    ):
        merge([{"y": torch.zeros(2, 4)}, {"y": torch.zeros(2, 5)}])


def test_defaultdict_inputs_split_and_merge_keeping_their_factory() -> None:
    from collections import defaultdict

    batch = defaultdict(list, {"x": torch.arange(8.0), "n": 3})
    parts = split(batch, 4)
    assert len(parts) == 4 and all(type(p) is defaultdict for p in parts)
    assert parts[1]["x"].tolist() == [2.0, 3.0] and parts[1]["n"] == 3
    assert parts[0].default_factory is list
    back = merge(parts)
    assert type(back) is defaultdict and torch.equal(back["x"], batch["x"])


# ----------------------------------------------------------------------------- values
# Value checks that pin what a mutation of the module changes (tools/mutants.py).


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
