"""Cut a captured graph into a sequence of layers at the calls of its units.

A new layer starts at the first node of every unit call (glue code between units stays with
the layer before it). Each layer is a :class:`~gpipe.capture.segment.Segment` whose input is
the *boundary* before it — every value computed earlier (or given by the user) that this or a
later layer still reads: hidden states, masks, position embeddings, skip connections — and
whose output is the boundary after it; the last layer returns the model's output.

The invariant: running the layers one after the other, each on the previous one's output,
executes every node of the graph once, in the graph's order, on the same values — so the
sequence computes what the graph computes, and no layer depends on how layers are grouped
into stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from gpipe.capture.graph import Traced
from gpipe.capture.units import node_units

__all__ = ["Piece", "cut", "layer_starts"]


def layer_starts(nodes: Sequence[fx.Node], units: Sequence[str]) -> tuple[list[int], list[str]]:
    """Indices into ``nodes`` where a layer begins, and each layer's unit path."""
    assigned = node_units(nodes, units)
    starts: list[int] = [0]
    names: list[str] = []
    prev = None
    for i, u in enumerate(assigned):
        if u is None or u[1] == prev:
            continue
        if prev is None:
            names.append(u[0])  # glue before the first unit joins the first layer
        else:
            starts.append(i)
            names.append(u[0])
        prev = u[1]
    if not names:
        names.append("model")
    return starts, names


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        n = n.replace(".", "/")
        k = seen.get(n, 0)
        seen[n] = k + 1
        out.append(n if k == 0 else f"{n}@{k}")
    return out


def device_of(*values: Any) -> torch.device:
    """The device of the first tensor among ``values`` (a segment's inputs)."""
    for v in values:
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def _retarget_devices(g: fx.Graph) -> None:
    """Replace every device the tracer baked into the graph (``arange(..., device=meta)``, the
    sample's device) by the device of the segment's inputs at run time, so a layer captured
    on ``meta`` or the CPU runs wherever its stage puts it."""
    fixed = [n for n in g.nodes if any(isinstance(v, torch.device) for v in n.kwargs.values())]
    if not fixed:
        return
    inputs = [n for n in g.nodes if n.op == "placeholder"]
    with g.inserting_after(inputs[-1] if inputs else None):
        dev = g.call_function(device_of, tuple(inputs))
    for n in fixed:
        n.kwargs = {k: dev if isinstance(v, torch.device) else v for k, v in n.kwargs.items()}


def alias_groups(model: nn.Module) -> dict[str, list[str]]:
    """Every name of a tensor the model holds under several names (tied weights), mapped to
    all of its names in model order."""
    by_id: dict[int, list[str]] = {}
    named = [
        *model.named_parameters(remove_duplicate=False),
        *model.named_buffers(remove_duplicate=False),
    ]
    for name, t in named:
        by_id.setdefault(id(t), []).append(name)
    return {n: names for names in by_id.values() if len(names) > 1 for n in names}


def _own_name(target: str, aliases: dict[str, list[str]], unit: str) -> str:
    """Of a tied tensor's names, the one inside the layer's own unit (the input embedding
    reads ``wte.weight``, the head ``lm_head.weight``), else the name the tracer used."""
    for name in aliases.get(target, ()):
        if name.startswith(unit + "."):
            return name
    return target


@dataclass
class Piece:
    """One layer of a cut graph: its graph, the names of the boundary values it receives, and
    the model's output structure where it is the last layer."""

    name: str
    graph: fx.Graph
    boundary: tuple[str, ...]
    out_spec: pytree.TreeSpec | None


def cut(traced: Traced, model: nn.Module, units: Sequence[str]) -> list[Piece]:
    """The layers of ``traced``, named by their units (``transformer/h/0``)."""
    graph = traced.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    nodes = [n for n in graph.nodes if n.op not in ("placeholder", "get_attr", "output")]
    starts, names = layer_starts(nodes, units)
    n_layers = len(starts)
    bounds = [*starts, len(nodes)]
    layer_of: dict[fx.Node, int] = {p: -1 for p in placeholders}
    for s in range(n_layers):
        for n in nodes[bounds[s] : bounds[s + 1]]:
            layer_of[n] = s
    last_use: dict[fx.Node, int] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a in layer_of:
                last_use[a] = max(last_use.get(a, -1), layer_of[n])
    for a in output.all_input_nodes:
        if a in layer_of:
            last_use[a] = n_layers
    aliases = alias_groups(model)
    order = placeholders + nodes
    boundary = [
        [v for v in order if layer_of[v] < s <= last_use.get(v, -2)] for s in range(n_layers + 1)
    ]
    out = []
    for s, name in zip(range(n_layers), _unique(names)):
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        inputs = placeholders if s == 0 else boundary[s]
        for v in inputs:
            env[v] = g.placeholder(v.name)
            env[v].meta.update(v.meta)

        def arg(n: fx.Node, g: fx.Graph = g, env: dict = env, unit: str = names[s]) -> fx.Node:
            if n not in env:  # a parameter, buffer or constant: read it where it is used
                assert n.op == "get_attr", n
                env[n] = g.get_attr(_own_name(str(n.target), aliases, unit))
                env[n].meta.update(n.meta)
            return env[n]

        for n in nodes[bounds[s] : bounds[s + 1]]:
            env[n] = g.node_copy(n, arg)
        last = s == n_layers - 1
        if last:
            g.output(fx.map_arg(output.args[0], arg))
        else:
            g.output(tuple(env[v] for v in boundary[s + 1]))
        _retarget_devices(g)
        g.lint()
        out.append(Piece(name, g, tuple(v.name for v in inputs), traced.out_spec if last else None))
    return out
