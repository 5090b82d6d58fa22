"""Split a mini-batch into micro-batches and merge them back, for any pytree of tensors.

The invariant: ``merge(split(x, m)) == x`` for every pytree ``x`` (dicts, lists, tuples,
NamedTuples, dataclasses, nested) whose tensors share their size along ``batch_dim``.
Micro-batch ``t`` holds rows ``[t·mbs, (t+1)·mbs)``. ``None`` and non-tensor leaves are handed
unchanged to every micro-batch, and taken from the first micro-batch when merging.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import numbers
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

__all__ = [
    "batch_size",
    "merge",
    "num_microbatches",
    "split",
    "tree_detach",
    "tree_flatten",
    "tree_unflatten",
    "tree_wants_grad",
]


# ----------------------------------------------------------------------------- tiny pytree
# torch.utils._pytree handles dict/list/tuple/NamedTuple but not plain dataclasses; users pass
# those, so we keep our own small flattener: leaves in a fixed order plus a rebuild function.


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def _rebuild_dict(obj: dict, keys: list, vals: list) -> dict:
    """A dict of ``obj``'s own type with ``keys`` → ``vals`` (a ``defaultdict`` keeps its
    factory; a subclass whose constructor takes other arguments is copied, then refilled)."""
    if type(obj) is dict:
        return dict(zip(keys, vals))
    if isinstance(obj, collections.defaultdict):
        return type(obj)(obj.default_factory, zip(keys, vals))
    try:
        return type(obj)(zip(keys, vals))
    except TypeError:
        new = copy.copy(obj)
        new.clear()
        new.update(zip(keys, vals))
        return new


def tree_flatten(
    obj: Any, path: str = "input"
) -> tuple[list[tuple[str, Any]], Callable[[list], Any]]:
    """Flatten ``obj`` into ``[(path, leaf), ...]`` and a function rebuilding it from new leaves."""
    if isinstance(obj, dict):
        keys = list(obj.keys())
        parts = [tree_flatten(obj[k], f"{path}[{k!r}]") for k in keys]
        return _combine(parts, lambda vals: _rebuild_dict(obj, keys, vals))
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


def tree_detach(obj: Any) -> Any:
    """``obj`` with every tensor leaf detached from its graph (the other leaves as they are)."""
    leaves, rebuild = tree_flatten(obj)
    return rebuild([v.detach() if isinstance(v, torch.Tensor) else v for _, v in leaves])


def tree_wants_grad(obj: Any) -> bool:
    """Whether any tensor leaf of ``obj`` requires grad."""
    return any(isinstance(v, torch.Tensor) and v.requires_grad for _, v in tree_flatten(obj)[0])


# ----------------------------------------------------------------------------- arguments


def _count(value: Any, name: str) -> int:
    """``value`` as a positive int; a bool, float or str is refused (``True`` is not 1 chunk)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {type(value).__name__} {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _dim_arg(batch_dim: Any) -> int:
    if isinstance(batch_dim, bool) or not isinstance(batch_dim, numbers.Integral):
        raise TypeError(
            f"batch_dim must be an int (a dimension index), got {type(batch_dim).__name__} "
            f"{batch_dim!r}"
        )
    return int(batch_dim)


def _dim_of(leaf: torch.Tensor, path: str, batch_dim: int) -> int:
    """The non-negative batch dimension of ``leaf``, or ``ValueError`` naming ``path``."""
    if leaf.dim() == 0:
        raise ValueError(
            f"{path} is a 0-dim tensor; it has no batch dimension (give it one, e.g. x[None])"
        )
    d = batch_dim if batch_dim >= 0 else leaf.dim() + batch_dim
    if not 0 <= d < leaf.dim():
        raise ValueError(
            f"{path} has shape {tuple(leaf.shape)}; batch_dim={batch_dim} is out of range "
            f"(use a dimension in [{-leaf.dim()}, {leaf.dim() - 1}])"
        )
    return d


# ----------------------------------------------------------------------------- split / merge


def batch_size(obj: Any, batch_dim: int = 0) -> int:
    """The common size of all tensors of ``obj`` along ``batch_dim``.

    Raises ``ValueError`` naming the paths of tensors whose sizes differ, and when ``obj``
    holds no tensor at all.
    """
    batch_dim = _dim_arg(batch_dim)
    leaves, _ = tree_flatten(obj)
    sizes: dict[int, list[str]] = {}
    for path, leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            sizes.setdefault(leaf.shape[_dim_of(leaf, path, batch_dim)], []).append(path)
    if not sizes:
        raise ValueError("the input holds no tensor, so there is no batch to split")
    if len(sizes) > 1:
        detail = "; ".join(f"size {n}: {', '.join(p)}" for n, p in sorted(sizes.items()))
        raise ValueError(
            f"tensors differ in size along batch_dim={batch_dim} ({detail}); every tensor of "
            "one input must hold the same batch"
        )
    return next(iter(sizes))


def num_microbatches(
    rows: int,
    chunks: int | None,
    micro_batch_size: int | None,
    *,
    batch_dim: int = 0,
    share: str = "",
    clamp: bool = True,
) -> int:
    """M for a batch of ``rows`` rows: the one rule :func:`split` and both pipes use.

    With only ``chunks`` and ``chunks > rows``, M is clamped to ``rows`` with a warning (the
    seed's rule). Otherwise the batch must divide evenly (``micro_batch_size · M == rows``), else
    ``ValueError`` naming the numbers; ``share`` says whose rows they are (a data-parallel
    replica's share, say) in the message. ``clamp=False`` refuses ``chunks > rows`` instead:
    a distributed pipe's ranks without the batch could not follow the clamp.
    """
    if chunks is None and micro_batch_size is None:
        chunks = 1
    if chunks is not None:
        chunks = _count(chunks, "chunks")
    if micro_batch_size is not None:
        micro_batch_size = _count(micro_batch_size, "micro_batch_size")
    n = rows
    if n == 0:
        raise ValueError(
            f"the batch is empty (0 rows along batch_dim={batch_dim}){share}; a step needs at "
            "least one row per micro-batch, so skip empty batches"
        )
    if micro_batch_size is None:
        assert chunks is not None
        if chunks > n and not clamp:
            raise ValueError(
                f"chunks={chunks} exceeds the batch size {n}{share}; a distributed pipe cannot "
                "lower it (ranks without the batch would still run chunks micro-batches), so "
                f"choose chunks <= {n}"
            )
        if chunks > n:
            warnings.warn(
                f"chunks={chunks} exceeds the batch size {n}{share}; using {n} micro-batches of 1",
                stacklevel=3,
            )
            chunks = n
        if n % chunks:
            raise ValueError(
                f"batch size {n}{share} is not divisible by chunks={chunks}; choose chunks that "
                f"divide {n} or give micro_batch_size"
            )
        return chunks
    if chunks is None:
        if n % micro_batch_size:
            raise ValueError(
                f"batch size {n}{share} is not divisible by micro_batch_size={micro_batch_size}; "
                f"choose a micro_batch_size that divides {n}"
            )
        return n // micro_batch_size
    if micro_batch_size * chunks != n:
        raise ValueError(
            f"micro_batch_size * chunks != batch size: {micro_batch_size} * {chunks} != {n}"
            f"{share}; give only one of them, or values whose product is the batch size"
        )
    return chunks


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
    chunks = num_microbatches(n, chunks, micro_batch_size, batch_dim=batch_dim)
    micro_batch_size = n // chunks

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


def merge(chunks: Iterable[Any], *, batch_dim: int = 0) -> Any:
    """Concatenate micro-batch pytrees back into one, along ``batch_dim``.

    ``chunks`` is a list of micro-batches (one pytree each). Every micro-batch must have the
    same structure (container types, dict keys — matched by key, in any order —, lengths, and a
    tensor wherever micro-batch 0 has one) and the same dtype and device per tensor; a
    difference raises ``ValueError`` naming the first one. Non-tensor leaves are taken from the
    first micro-batch.
    """
    if isinstance(chunks, (torch.Tensor, str, bytes, Mapping)):
        raise TypeError(
            f"merge takes a list of micro-batches (one pytree each), got a "
            f"{type(chunks).__name__}; wrap a single micro-batch as [x], and use split() to cut "
            "a batch"
        )
    chunks = list(chunks)
    batch_dim = _dim_arg(batch_dim)
    if len(chunks) == 0:
        raise ValueError("merge needs at least one micro-batch")
    for i, c in enumerate(chunks[1:], start=1):
        diff = _difference(chunks[0], c, f"micro-batch {i}")
        if diff is not None:
            raise ValueError(f"{diff}; every micro-batch must have the same structure")
    chunks = [chunks[0]] + [_align(c, chunks[0]) for c in chunks[1:]]
    flat = [tree_flatten(c, f"micro-batch {i}") for i, c in enumerate(chunks)]
    first_leaves, rebuild = flat[0]
    merged = []
    for j, (_path, leaf) in enumerate(first_leaves):
        if isinstance(leaf, torch.Tensor):
            parts = [leaves[j][1] for leaves, _ in flat]
            d = _dim_of(leaf, first_leaves[j][0], batch_dim)
            want = tuple(s for i, s in enumerate(leaf.shape) if i != d)
            for i, t in enumerate(parts):
                got = tuple(s for k, s in enumerate(t.shape) if k != d)
                if t.dim() != leaf.dim() or got != want:
                    raise ValueError(
                        f"{flat[i][0][j][0]} has shape {tuple(t.shape)} but micro-batch 0 gave "
                        f"{tuple(leaf.shape)}; outputs of one step must agree in every "
                        f"dimension except batch_dim={batch_dim}"
                    )
                if t.dtype != leaf.dtype or t.device != leaf.device:
                    raise ValueError(
                        f"{flat[i][0][j][0]} is {t.dtype} on {t.device} but micro-batch 0 gave "
                        f"{leaf.dtype} on {leaf.device}; outputs of one step must agree in "
                        "dtype and device (cast them in the model)"
                    )
            merged.append(torch.cat(parts, dim=d) if len(parts) > 1 else parts[0])
        else:
            merged.append(leaf)
    return rebuild(merged)


def _container(obj: Any) -> str | None:
    if isinstance(obj, dict):
        return "dict"
    if isinstance(obj, (list, tuple)):
        return "sequence"
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return "dataclass"
    return None


def _what(obj: Any) -> str:
    return "a tensor" if isinstance(obj, torch.Tensor) else f"a {type(obj).__name__}"


def _difference(ref: Any, obj: Any, path: str) -> str | None:
    """The first place where ``obj``'s structure differs from ``ref``'s, or ``None``."""
    kind = _container(ref)
    if kind is None:
        if _container(obj) is not None or (
            isinstance(ref, torch.Tensor) != isinstance(obj, torch.Tensor)
        ):
            return f"{path} is {_what(obj)} where micro-batch 0 has {_what(ref)}"
        return None
    if type(obj) is not type(ref):
        return f"{path} is {_what(obj)} where micro-batch 0 has {_what(ref)}"
    if kind == "dict":
        if set(ref) != set(obj):
            have, want = ", ".join(sorted(map(repr, obj))), ", ".join(sorted(map(repr, ref)))
            return f"{path} has keys [{have}] where micro-batch 0 has [{want}]"
        pairs = [(ref[k], obj[k], f"{path}[{k!r}]") for k in ref]
    elif kind == "sequence":
        if len(ref) != len(obj):
            return f"{path} has {len(obj)} entries where micro-batch 0 has {len(ref)}"
        names = ref._fields if hasattr(type(ref), "_fields") else None
        pairs = [
            (a, b, f"{path}.{names[i]}" if names else f"{path}[{i}]")
            for i, (a, b) in enumerate(zip(ref, obj))
        ]
    else:
        fields = [f.name for f in dataclasses.fields(ref) if f.init]
        pairs = [(getattr(ref, f), getattr(obj, f), f"{path}.{f}") for f in fields]
    for a, b, p in pairs:
        diff = _difference(a, b, p)
        if diff is not None:
            return diff
    return None


def _align(obj: Any, ref: Any) -> Any:
    """``obj`` with every dict's keys in ``ref``'s order (same structure checked before)."""
    kind = _container(ref)
    if kind == "dict":
        keys = list(ref)
        return _rebuild_dict(obj, keys, [_align(obj[k], ref[k]) for k in keys])
    if kind == "sequence" and any(_container(r) for r in ref):
        vals = [_align(o, r) for o, r in zip(obj, ref)]
        return type(obj)(*vals) if hasattr(type(obj), "_fields") else type(obj)(vals)
    if kind == "dataclass":
        fields = [f.name for f in dataclasses.fields(ref) if f.init]
        return dataclasses.replace(
            obj, **{f: _align(getattr(obj, f), getattr(ref, f)) for f in fields}
        )
    return obj
