"""Any ``nn.Module`` in: capture the model as a graph and cut it into a sequence of layers.

``capture(model, sample)`` traces ``model(*args, **kwargs)`` (``torch.export``, else
``torch.fx``; :mod:`~gpipe.capture.graph`), finds its units (:mod:`~gpipe.capture.units`),
cuts the graph at every unit call (:mod:`~gpipe.capture.cut`) and returns a
:class:`CapturedLayers` — an ``nn.Sequential`` of layers that each take the previous one's
output, so every part of the pipeline (cost model, balancer, keyed random streams by layer
index, re-materialization, schedules, ``gpipe plan``) runs on it unchanged.

The invariant: ``CapturedLayers`` computes what the model computes in the modes it is in,
with the model's own parameter objects under the model's own names — checked on the sample
when it is captured, and refused by name at a call when the model no longer holds those
objects or is in modes no graph was captured for.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gpipe.base.microbatch import batch_size
from gpipe.base.snapshot import Snapshot
from gpipe.capture.cut import Piece, alias_groups, cut
from gpipe.capture.graph import CaptureError, Traced, trace
from gpipe.capture.segment import CapturedLayers, Segment, attached_path, modes_of
from gpipe.capture.units import resolve_split_points, unit_paths
from gpipe.capture.verify import verify

__all__ = [
    "CaptureError",
    "CapturedLayers",
    "Sample",
    "Segment",
    "Traced",
    "capture",
    "sample_args",
]


class Sample:
    """An example call: ``Sample(input_ids, attention_mask=mask)``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs

    def __repr__(self) -> str:
        return f"Sample({len(self.args)} args, kwargs={list(self.kwargs)})"


def sample_args(sample: Any) -> tuple[tuple, dict]:
    """``sample=`` as ``(args, kwargs)``: a tensor, a tuple/list of positional arguments, a
    dict of keyword arguments, or a :class:`Sample`."""
    if isinstance(sample, Sample):
        return tuple(sample.args), dict(sample.kwargs)
    if isinstance(sample, torch.Tensor):
        return (sample,), {}
    if isinstance(sample, Mapping):
        bad = [k for k in sample if not isinstance(k, str)]
        if bad:
            raise TypeError(
                f"sample= is a dict, so its keys are the forward's keyword names, but it holds "
                f"the key {bad[0]!r}; for positional arguments give a tuple, or "
                "gpipe.capture.Sample(*args, **kwargs)"
            )
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    raise TypeError(
        f"sample must be a tensor, a tuple of positional arguments, a dict of keyword "
        f"arguments or gpipe.capture.Sample(*args, **kwargs), got {type(sample).__name__}"
    )


def _check_sample(model: nn.Module, args: tuple, kwargs: dict, batch_dim: int) -> None:
    """The sample is one call of the forward, holding one batch of at least one row (a
    tracer would fail on it with a message about something else, or fix the batch at 0)."""
    forward = inspect.signature(model.forward)
    try:
        forward.bind(*args, **kwargs)
    except TypeError as e:
        bare = forward.replace(
            parameters=[p.replace(annotation=p.empty) for p in forward.parameters.values()],
            return_annotation=forward.empty,
        )
        raise TypeError(
            f"sample= does not fit {type(model).__name__}.forward{bare}: {e}; give sample= "
            "as one call of the model: a tensor, a tuple of positional arguments, a dict of "
            "keyword arguments or gpipe.capture.Sample(*args, **kwargs)"
        ) from None
    try:
        rows = batch_size((args, kwargs), batch_dim)
    except ValueError as e:
        raise ValueError(f"sample= is not one batch: {e}") from None
    if rows == 0:
        raise ValueError(
            f"sample= has 0 rows along batch_dim={batch_dim}; capture on a sample of at least "
            "one row (e.g. one micro-batch), so the graph is traced for a real batch"
        )


def _split_balance(
    names: list[str], units_of_layer: list[str], points: list[tuple[str, str]]
) -> list[int]:
    cuts = set()
    for unit, where in points:
        idx = [i for i, u in enumerate(units_of_layer) if u == unit]
        if not idx:
            raise ValueError(f"split point {unit!r} is never called in the captured forward")
        cut_at = idx[0] if where == "before" else idx[-1] + 1
        if 0 < cut_at < len(names):
            cuts.add(cut_at)
        else:
            side = "before the first" if cut_at == 0 else "after the last"
            raise ValueError(
                f"split point {unit!r}:{where} is {side} layer, so it would leave a stage "
                "empty; drop it"
            )
    edges = [0, *sorted(cuts), len(names)]
    return [b - a for a, b in itertools.pairwise(edges)]


def _set_modes(model: nn.Module, modes: tuple[bool, ...]) -> None:
    for m, mode in zip(model.modules(), modes, strict=True):
        m.training = mode


def _wanted_modes(model: nn.Module) -> list[tuple[bool, ...]]:
    """The modes a capture holds graphs for: the model's own now, all train, all eval."""
    now = modes_of(model)
    out = [now]
    for mode in (True, False):
        every = (mode,) * len(now)
        if every not in out:
            out.append(every)
    return out


def capture(
    model: nn.Module,
    sample: Any,
    *,
    split_points: str | Sequence[str] | None = None,
    batch_dim: int = 0,
    method: str = "auto",
    check: bool = True,
) -> CapturedLayers:
    """Capture ``model`` on ``sample`` and cut it into layers (see the module docstring).

    ``split_points``: module paths where stages must be cut (``"transformer.h.2"`` cuts
    before it, ``"transformer.h.2:after"`` after it; one string is one point); the pipe then
    gets one stage per piece.

    The model is traced in the modes it is in, and again in train and in eval mode (a
    graph fixes BatchNorm's statistics, dropout and every ``if self.training:`` branch), so
    ``pipe.train()`` / ``pipe.eval()`` run what the model runs in that mode; the model's
    modes are restored afterwards. With ``check`` (and a model not on ``meta``), the layers
    are run against the model on the sample in each mode (:mod:`gpipe.capture.verify`).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture needs an nn.Module, got {type(model).__name__}")
    args, kwargs = sample_args(sample)
    _check_sample(model, args, kwargs, batch_dim)
    units = unit_paths(model)
    points = resolve_split_points(split_points, model, units)
    start = modes_of(model)
    variants: dict[tuple[bool, ...], int] = {}
    traced_by_key: list[tuple[Traced, list[Piece]]] = []
    try:
        for modes in _wanted_modes(model):
            key = len(traced_by_key)
            _set_modes(model, modes)
            try:
                traced = trace(
                    model,
                    args,
                    kwargs,
                    batch_dim=batch_dim,
                    method=method if not key else traced_by_key[0][0].method,
                    tag=f"_v{key}" if key else "",
                )
            except CaptureError:
                if not key:
                    raise
                continue  # the model in this mode is refused by name when it is called
            pieces = cut(traced, model, units)
            if key and [p.name for p in pieces] != [p.name for p in traced_by_key[0][1]]:
                continue  # another mode calls other modules: refused by name when called
            variants[modes] = key
            traced_by_key.append((traced, pieces))
    finally:
        _set_modes(model, start)
    segments = _segments(model, traced_by_key, batch_dim)
    names = [p.name for p in traced_by_key[0][1]]
    units_of_layer = [n.split("@")[0].replace("/", ".") for n in names]
    balance = _split_balance(names, units_of_layer, points) if points else None
    snapshot = Snapshot("model")
    for seg_graphs in traced_by_key:
        for piece in seg_graphs[1]:
            for node in piece.graph.nodes:
                if node.op in ("get_attr", "call_module") and not str(node.target).startswith(
                    "_gpipe"
                ):
                    snapshot.add_path(model, attached_path(model, str(node.target)))
    layers = CapturedLayers(
        segments,
        {key: traced.bind for key, (traced, _) in enumerate(traced_by_key)},
        method=traced_by_key[0][0].method,
        model_name=type(model).__name__,
        model=model,
        variants=variants,
        snapshot=snapshot,
        split_balance=balance,
        key_order=list(model.state_dict(keep_vars=True)),
        aliases=alias_groups(model),
    )
    if check:
        no_grad = any(traced.no_grad_regions for traced, _ in traced_by_key)
        verify(model, layers, args, kwargs, grad=no_grad)
    return layers


def _segments(
    model: nn.Module, traced_by_key: list[tuple[Traced, list[Piece]]], batch_dim: int
) -> list[tuple[str, Segment]]:
    """One segment per layer, holding that layer's graph of every captured variant."""
    out: list[tuple[str, Segment]] = []
    for key, (traced, pieces) in enumerate(traced_by_key):
        for i, piece in enumerate(pieces):
            static = traced.static_batch
            if key == 0:
                seg = Segment(
                    piece.graph,
                    model,
                    traced.constants,
                    first=i == 0,
                    out_spec=piece.out_spec,
                    boundary=piece.boundary,
                    static_batch=static,
                    batch_dim=batch_dim,
                )
                out.append((piece.name, seg))
            else:
                out[i][1].add_graph(
                    key,
                    piece.graph,
                    model,
                    traced.constants,
                    out_spec=piece.out_spec,
                    boundary=piece.boundary,
                    static_batch=static,
                )
    return out
