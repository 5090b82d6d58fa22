"""Ranks that agree: one small collective before the first step proves that every rank of a
pipeline built the same pipeline.

``DistributedPipe`` is constructed separately on every rank. Ranks that disagree on anything
that defines the model or the schedule (the balance, the micro-batch count, the schedule, a
layer's shape, ...) would otherwise run a different model than the user wrote — a layer twice,
or none — and return a plausible loss. So each rank describes its pipeline as plain data
(:func:`layer_signature` per layer plus the options), the ranks exchange the descriptions with
:func:`gather` (an all-gather bounded by the pipe's timeout), and :func:`check` raises on
*every* rank, naming each option that differs and each rank's value, or the error another rank
hit while constructing its pipe.

The invariant: after :func:`check` returns on one rank it returns on every rank, and all of
them hold equal descriptions.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "FIX",
    "check",
    "describe_error",
    "gather",
    "gather_ints",
    "layer_signature",
    "raise_remote",
]

FIX = "construct DistributedPipe identically on every rank (same model, options and order)"
_LONG = 160  # a layer's description longer than this is cut and ends with a hash of the whole


def layer_signature(layer: nn.Module) -> str:
    """What a layer is, for comparison across ranks: its class, its submodules' classes, and
    the name, shape and dtype of every parameter and buffer (values are not compared: they may
    legitimately differ until initialization from the seed or the broadcast)."""
    classes = ",".join(type(m).__qualname__ for _, m in layer.named_modules())
    tensors = [
        f"{n} {'x'.join(map(str, t.shape)) or 'scalar'} {str(t.dtype).removeprefix('torch.')}"
        for n, t in [
            *layer.named_parameters(remove_duplicate=False),
            *layer.named_buffers(remove_duplicate=False),
        ]
        if t is not None
    ]
    text = f"{type(layer).__qualname__}({', '.join(tensors)})"
    if len(text) > _LONG or "," in classes:
        digest = hashlib.sha256(f"{classes}|{text}".encode()).hexdigest()[:10]
        text = (text if len(text) <= _LONG else text[:_LONG] + "...") + f" #{digest}"
    return text


def _wait(work: Any, timeout: float, rank: int, what: str) -> None:
    try:
        ok = work.wait(timedelta(seconds=timeout))
    except Exception as e:
        raise TimeoutError(
            f"rank {rank} waited {timeout:g}s for the other ranks {what} and gave up "
            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e) else ''}); "
            "every rank must construct the same DistributedPipe and call step() together "
            "(raise timeout= if a rank is just slow)"
        ) from e
    if ok is False:
        raise TimeoutError(f"rank {rank} waited {timeout:g}s for the other ranks {what}")


def gather(
    obj: Any, group: Any, timeout: float, device: torch.device, rank: int, what: str
) -> list[Any]:
    """All-gather the JSON-able ``obj`` over ``group``: every rank's value, by group rank.

    Two all-gathers (lengths, then padded bytes), each bounded by ``timeout``; a rank that does
    not arrive raises :class:`TimeoutError` on the others, naming ``what`` they waited for.
    """
    data = json.dumps(obj).encode()
    n = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.zeros_like(size) for _ in range(n)]
    _wait(dist.all_gather(sizes, size, group=group, async_op=True), timeout, rank, what)
    lengths = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    buf = buf.to(device)
    bufs = [torch.empty_like(buf) for _ in range(n)]
    _wait(dist.all_gather(bufs, buf, group=group, async_op=True), timeout, rank, what)
    return [json.loads(b[:k].cpu().numpy().tobytes()) for b, k in zip(bufs, lengths)]


def gather_ints(
    values: Sequence[int], group: Any, timeout: float, rank: int, what: str
) -> list[list[int]]:
    """All-gather a fixed number of int64 ``values`` over the CPU (gloo) ``group``: every
    rank's values, by group rank. One collective, bounded by ``timeout`` (a rank that does not
    arrive raises :class:`TimeoutError` on the others, naming ``what`` they waited for)."""
    mine = torch.tensor(list(values), dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    _wait(dist.all_gather(every, mine, group=group, async_op=True), timeout, rank, what)
    return [t.tolist() for t in every]


def describe_error(e: BaseException) -> dict[str, str]:
    """An exception as data another rank can re-raise (its type name and message)."""
    return {"type": type(e).__name__, "message": str(e)}


_TYPES: dict[str, type[Exception]] = {
    "ValueError": ValueError,
    "TypeError": TypeError,
    "TimeoutError": TimeoutError,
}


def raise_remote(rank: int, error: dict[str, str], context: str) -> None:
    """Raise, on this rank, the error ``rank`` hit: the same type for plain argument errors
    (``ValueError``/``TypeError``), else ``RuntimeError``; the message names the rank."""
    cls = _TYPES.get(error["type"], RuntimeError)
    text = error["message"]
    if cls is RuntimeError:
        text = f"{error['type']}: {text}"
    raise cls(f"rank {rank} {context}: {text}")


def _by_value(values: Sequence[Any]) -> str:
    """``rank 0 has [3, 3], rank 1 has [2, 4]`` (ranks with the same value grouped)."""
    groups: list[tuple[Any, list[int]]] = []
    for r, v in enumerate(values):
        for value, ranks in groups:
            if value == v:
                ranks.append(r)
                break
        else:
            groups.append((v, [r]))
    parts = []
    for value, ranks in groups:
        who = f"rank {ranks[0]} has" if len(ranks) == 1 else f"ranks {ranks} have"
        parts.append(f"{who} {'none' if value is None else value}")
    return ", ".join(parts)


def check(
    fingerprint: dict[str, Any] | None,
    error: BaseException | None,
    *,
    group: Any,
    timeout: float,
    device: torch.device,
    rank: int,
) -> None:
    """Exchange this rank's ``fingerprint`` (or the ``error`` that kept it from having one)
    with every rank of ``group`` and raise, on every rank, if any rank failed or any two
    fingerprints differ.

    A fingerprint maps option names to JSON-able values; the key ``"layers"`` holds one string
    per layer (its name and :func:`layer_signature`). This rank's own error is re-raised as is; another
    rank's error is raised as :func:`raise_remote` does; differences raise ``ValueError``
    naming each differing option and every rank's value, then :data:`FIX`.
    """
    mine = {"error": None if error is None else describe_error(error), "fp": fingerprint}
    every = gather(mine, group, timeout, device, rank, "to construct DistributedPipe")
    if error is not None:
        raise error
    for r, theirs in enumerate(every):
        if theirs["error"] is not None:
            raise_remote(r, theirs["error"], "could not construct its DistributedPipe")
    fps = [theirs["fp"] for theirs in every]
    problems = []
    for key in fps[0]:
        values = [fp.get(key) for fp in fps]
        if all(v == values[0] for v in values):
            continue
        if key == "layers":
            counts = [len(v) for v in values]
            if len(set(counts)) > 1:
                problems.append(f"ranks disagree on the number of layers: {_by_value(counts)}")
                continue
            i = next(i for i in range(counts[0]) if len({v[i] for v in values}) > 1)
            problems.append(f"ranks disagree on layer {i}: {_by_value([v[i] for v in values])}")
            continue
        problems.append(f"ranks disagree on {key}: {_by_value(values)}")
    if problems:
        raise ValueError("; ".join(problems) + f"; {FIX}")
