"""split/merge: round-trip for any pytree and dimension, the seed's clamping and errors."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gpipe.base.microbatch import batch_size, merge, split


class Pair(NamedTuple):
    a: torch.Tensor
    b: object


@dataclasses.dataclass
class Box:
    x: torch.Tensor
    tag: str = "box"


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
