"""Any ``nn.Module`` in: capture the model as a graph and cut it into a sequence of layers.

``capture(model, sample)`` traces ``model(*args, **kwargs)`` (``torch.export``, else
``torch.fx``; :mod:`~gpipe.capture.graph`), finds its units (:mod:`~gpipe.capture.units`),
cuts the graph at every unit call (:mod:`~gpipe.capture.cut`) and returns a
:class:`CapturedLayers` — an ``nn.Sequential`` of layers that each take the previous one's
output, so every part of the pipeline (cost model, balancer, keyed random streams by layer
index, re-materialization, schedules, ``gpipe plan``) runs on it unchanged.

The invariant: ``CapturedLayers`` computes what the model computes, with the model's own
parameter objects under the model's own names.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from gpipe.capture.cut import alias_groups, cut
from gpipe.capture.graph import CaptureError, Traced, trace
from gpipe.capture.segment import CapturedLayers, Segment
from gpipe.capture.units import resolve_split_points, unit_paths

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
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        return tuple(sample), {}
    raise TypeError(
        f"sample must be a tensor, a tuple of positional arguments, a dict of keyword "
        f"arguments or gpipe.capture.Sample(*args, **kwargs), got {type(sample).__name__}"
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


def capture(
    model: nn.Module,
    sample: Any,
    *,
    split_points: str | Sequence[str] | None = None,
    batch_dim: int = 0,
    method: str = "auto",
) -> CapturedLayers:
    """Capture ``model`` on ``sample`` and cut it into layers (see the module docstring).

    ``split_points``: module paths where stages must be cut (``"transformer.h.2"`` cuts
    before it, ``"transformer.h.2:after"`` after it; one string is one point); the pipe then
    gets one stage per piece.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture needs an nn.Module, got {type(model).__name__}")
    args, kwargs = sample_args(sample)
    units = unit_paths(model)
    points = resolve_split_points(split_points, model, units)
    traced = trace(model, args, kwargs, batch_dim=batch_dim, method=method)
    layers = cut(traced, model, units, batch_dim)
    names = [n for n, _ in layers]
    units_of_layer = [n.split("@")[0].replace("/", ".") for n in names]
    balance = _split_balance(names, units_of_layer, points) if points else None
    return CapturedLayers(
        layers,
        traced.bind,
        method=traced.method,
        model_name=type(model).__name__,
        split_balance=balance,
        key_order=list(model.state_dict(keep_vars=True)),
        aliases=alias_groups(model),
    )
