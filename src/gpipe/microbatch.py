"""Split a mini-batch into micro-batches and merge them back, for any pytree of tensors.

The invariant: ``merge(split(x, m)) == x`` for every pytree ``x`` (dicts, lists, tuples,
NamedTuples, dataclasses, nested) whose tensors share their size along ``batch_dim``.
Micro-batch ``t`` holds rows ``[t·mbs, (t+1)·mbs)``. ``None`` and non-tensor leaves are handed
unchanged to every micro-batch, and taken from the first micro-batch when merging.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["batch_size", "merge", "split", "tree_flatten", "tree_unflatten"]


# ----------------------------------------------------------------------------- tiny pytree
# torch.utils._pytree handles dict/list/tuple/NamedTuple but not plain dataclasses; users pass
# those, so we keep our own small flattener: leaves in a fixed order plus a rebuild function.


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def tree_flatten(
    obj: Any, path: str = "input"
) -> tuple[list[tuple[str, Any]], Callable[[list], Any]]:
    """Flatten ``obj`` into ``[(path, leaf), ...]`` and a function rebuilding it from new leaves."""
    if isinstance(obj, dict):
        keys = list(obj.keys())
        parts = [tree_flatten(obj[k], f"{path}[{k!r}]") for k in keys]
        return _combine(
            parts,
            lambda vals: (
                type(obj)(zip(keys, vals)) if type(obj) is not dict else dict(zip(keys, vals))
            ),
        )
    if _is_namedtuple(obj):
        parts = [tree_flatten(v, f"{path}.{f}") for f, v in zip(obj._fields, obj)]
        return _combine(parts, lambda vals: type(obj)(*vals))
    if isinstance(obj, (list, tuple)):
        parts = [tree_flatten(v, f"{path}[{i}]") for i, v in enumerate(obj)]
        return _combine(parts, lambda vals: type(obj)(vals))
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = [f.name for f in dataclasses.fields(obj) if f.init]
        parts = [tree_flatten(getattr(obj, f), f"{path}.{f}") for f in fields]
        return _combine(parts, lambda vals: dataclasses.replace(obj, **dict(zip(fields, vals))))
    return [(path, obj)], lambda vals: vals[0]


def _combine(
    parts: list, rebuild_node: Callable[[list], Any]
) -> tuple[list, Callable[[list], Any]]:
    leaves: list = []
    sizes: list[int] = []
    rebuilders = []
    for leaf_list, rebuild in parts:
        leaves.extend(leaf_list)
        sizes.append(len(leaf_list))
        rebuilders.append(rebuild)

    def rebuild_all(vals: list) -> Any:
        out, i = [], 0
        for n, rb in zip(sizes, rebuilders):
            out.append(rb(vals[i : i + n]))
            i += n
        return rebuild_node(out)

    return leaves, rebuild_all


def tree_unflatten(rebuild: Callable[[list], Any], leaves: list) -> Any:
    """Rebuild a pytree from ``leaves`` with the function :func:`tree_flatten` returned."""
    return rebuild(list(leaves))


# ----------------------------------------------------------------------------- split / merge


def batch_size(obj: Any, batch_dim: int = 0) -> int:
    """The common size of all tensors of ``obj`` along ``batch_dim``.

    Raises ``ValueError`` naming the paths of tensors whose sizes differ, and when ``obj``
    holds no tensor at all.
    """
    leaves, _ = tree_flatten(obj)
    sizes: dict[int, list[str]] = {}
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            if leaf.dim() == 0:
                raise ValueError(f"{path} is a 0-dim tensor; it has no batch dimension to split")
            d = batch_dim if batch_dim >= 0 else leaf.dim() + batch_dim
            if not 0 <= d < leaf.dim():
                raise ValueError(
                    f"{path} has shape {tuple(leaf.shape)}; batch_dim={batch_dim} is out of range"
                )
            sizes.setdefault(leaf.shape[d], []).append(path)
    if not sizes:
        raise ValueError("the input holds no tensor, so there is no batch to split")
    if len(sizes) > 1:
        detail = "; ".join(f"size {n}: {', '.join(p)}" for n, p in sorted(sizes.items()))
        raise ValueError(
            f"tensors differ in size along batch_dim={batch_dim} ({detail}); every tensor of "
            "one input must hold the same batch"
        )
    return next(iter(sizes))


def split(
    obj: Any,
    chunks: int | None = None,
    *,
    micro_batch_size: int | None = None,
    batch_dim: int = 0,
) -> list[Any]:
    """Split ``obj`` into micro-batches along ``batch_dim``.

    Give ``chunks`` (the number of micro-batches M), ``micro_batch_size``, or both. With only
    ``chunks`` and ``chunks > batch``, M is clamped to the batch size with a warning (as the
    seed does). The batch must divide evenly: ``micro_batch_size · chunks == batch``, else
    ``ValueError`` naming the three numbers. Returns a list of M pytrees shaped like ``obj``.
    """
    n = batch_size(obj, batch_dim)
    if chunks is None and micro_batch_size is None:
        chunks = 1
    if chunks is not None and chunks < 1:
        raise ValueError(f"chunks must be >= 1, got {chunks}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    if micro_batch_size is None:
        assert chunks is not None
        if chunks > n:
            warnings.warn(
                f"chunks={chunks} exceeds the batch size {n}; using {n} micro-batches of 1",
                stacklevel=2,
            )
            chunks = n
        if n % chunks:
            raise ValueError(
                f"batch size {n} is not divisible by chunks={chunks}; choose chunks that divide "
                f"{n} or give micro_batch_size"
            )
        micro_batch_size = n // chunks
    elif chunks is None:
        if n % micro_batch_size:
            raise ValueError(
                f"batch size {n} is not divisible by micro_batch_size={micro_batch_size}"
            )
        chunks = n // micro_batch_size
    if micro_batch_size * chunks != n:
        raise ValueError(
            f"micro_batch_size * chunks != batch size: {micro_batch_size} * {chunks} != {n}"
        )

    leaves, rebuild = tree_flatten(obj)
    pieces = []
    for _, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            pieces.append(torch.split(leaf, micro_batch_size, dim=batch_dim))
        else:
            pieces.append(None)
    out = []
    for t in range(chunks):
        vals = [p[t] if p is not None else leaf for p, (_, leaf) in zip(pieces, leaves)]
        out.append(rebuild(vals))
    return out


def merge(chunks: Sequence[Any], *, batch_dim: int = 0) -> Any:
    """Concatenate micro-batch pytrees back into one, along ``batch_dim``.

    Every micro-batch must have the same structure; non-tensor leaves are taken from the first.
    """
    if len(chunks) == 0:
        raise ValueError("merge needs at least one micro-batch")
    flat = [tree_flatten(c, f"micro-batch {i}") for i, c in enumerate(chunks)]
    first_leaves, rebuild = flat[0]
    for i, (leaves, _) in enumerate(flat[1:], start=1):
        if len(leaves) != len(first_leaves):
            raise ValueError(
                f"micro-batch {i} has {len(leaves)} leaves but micro-batch 0 has "
                f"{len(first_leaves)}; every micro-batch must have the same structure"
            )
    merged = []
    for j, (_path, leaf) in enumerate(first_leaves):
        if isinstance(leaf, torch.Tensor):
            parts = []
            for leaves, _ in flat:
                t = leaves[j][1]
                if not isinstance(t, torch.Tensor):
                    raise ValueError(f"{leaves[j][0]} is {type(t).__name__}, expected a tensor")
                parts.append(t)
            d = batch_dim if batch_dim >= 0 else leaf.dim() + batch_dim
            want = tuple(s for i, s in enumerate(leaf.shape) if i != d)
            for i, t in enumerate(parts):
                got = tuple(s for k, s in enumerate(t.shape) if k != d)
                if t.dim() != leaf.dim() or got != want:
                    raise ValueError(
                        f"{flat[i][0][j][0]} has shape {tuple(t.shape)} but micro-batch 0 gave "
                        f"{tuple(leaf.shape)}; outputs of one step must agree in every "
                        f"dimension except batch_dim={batch_dim}"
                    )
            merged.append(torch.cat(parts, dim=batch_dim) if len(parts) > 1 else parts[0])
        else:
            merged.append(leaf)
    return rebuild(merged)
