"""Build a sequential model that lives on the ``meta`` device, layer by layer, on a real one.

A model too large for any one device is built on ``meta`` (no memory), planned, and then each
process materializes only its own layers. Layer ``i`` is ``to_empty``-ed and initialized
(``init_fn(layer)``, else ``reset_parameters()`` of its outermost submodules that have one)
under the random stream keyed ``(seed, -1, -1, i)``. Parameters used by several layers (the
same ``Parameter``, or names tied by the user) form *tie groups*.

The invariant: a layer's values depend only on (seed, layer index, init), never on which
process or device builds it, so :func:`materialize` in one process gives exactly the model
that :class:`gpipe.DistributedPipe` holds spread over its ranks. Nothing here needs
``torch.distributed``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from gpipe.capture import sequence
from gpipe.stage import rng

__all__ = ["free_layer", "materialize", "materialize_layers", "param_slots", "tie_groups"]

# Initialization draws from the stream keyed (seed, _INIT_KEY, _INIT_KEY, layer index).
_INIT_KEY = -1


def param_slots(
    named: Sequence[tuple[str, nn.Module]],
) -> dict[str, tuple[int, nn.Module, str, nn.Parameter]]:
    """Every parameter name of the full model (shared ones under each name) → (layer index,
    owning module, attribute, Parameter)."""
    slots = {}
    for i, (lname, layer) in enumerate(named):
        for mname, mod in layer.named_modules(prefix=lname, remove_duplicate=False):
            for attr, p in mod._parameters.items():
                if p is not None:
                    slots.setdefault(f"{mname}.{attr}", (i, mod, attr, p))
    return slots


def tie_groups(
    slots: dict[str, tuple[int, nn.Module, str, nn.Parameter]],
    tied: Sequence[Sequence[str]],
) -> list[list[str]]:
    """Groups of parameter names that must hold one value: names of the same ``Parameter``
    object, joined with the user's ``tied`` tuples. Each group starts with its *first name*
    (the first name of the first ``tied`` tuple touching it, else the first in model order)."""
    parent = {n: n for n in slots}

    def find(n: str) -> str:
        while parent[n] != n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    def union(a: str, b: str) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[rb] = ra

    by_id: dict[int, str] = {}
    for name, (_, _, _, p) in slots.items():
        if id(p) in by_id:
            union(by_id[id(p)], name)
        else:
            by_id[id(p)] = name
    first: dict[str, str] = {}
    for tup in tied:
        names = list(tup)
        if len(names) < 2:
            raise ValueError(f"tied={tup!r}: a tie needs at least two parameter names")
        for n in names:
            if n not in slots:
                close = [s for s in slots if s.split(".")[-1] == n.split(".")[-1]][:6]
                raise ValueError(
                    f"tied names {n!r}, which is not a parameter of the model; names are as in "
                    f"model.named_parameters(remove_duplicate=False), e.g. {close}"
                )
            shape_a, shape_b = slots[names[0]][3].shape, slots[n][3].shape
            if shape_a != shape_b:
                raise ValueError(
                    f"tied parameters {names[0]!r} {tuple(shape_a)} and {n!r} {tuple(shape_b)} "
                    "differ in shape"
                )
        for n in names[1:]:
            union(names[0], n)
    for tup in tied:
        first.setdefault(find(tup[0]), tup[0])
    groups: dict[str, list[str]] = {}
    for name in slots:
        groups.setdefault(find(name), []).append(name)
    out = []
    for root, names in groups.items():
        if len(names) < 2:
            continue
        head = first.get(root, names[0])
        out.append([head] + [n for n in names if n != head])
    return out


def _has_meta(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def _reset(module: nn.Module, path: str, uncovered: list[str]) -> None:
    """Call ``reset_parameters()`` on the outermost submodules that have one; collect the
    parameters and buffers no such call covers."""
    fn = getattr(module, "reset_parameters", None)
    if callable(fn):
        fn()
        return
    for attr, t in [*module._parameters.items(), *module._buffers.items()]:
        if t is not None:
            uncovered.append(f"{path}.{attr}")
    for name, child in module.named_children():
        _reset(child, f"{path}.{name}", uncovered)


def materialize_layers(
    named: Sequence[tuple[str, nn.Module]],
    local: Sequence[int],
    device: torch.device,
    seed: int,
    init_fn: Callable[[nn.Module], None] | None,
    groups: list[list[str]],
    slots: dict[str, tuple[int, nn.Module, str, nn.Parameter]],
) -> None:
    """Move layers ``local`` to ``device``; materialize and initialize those on ``meta``; make
    the members of each tie group that sit in ``local`` one ``Parameter`` again."""
    local_set = set(local)
    fresh = []
    for i in sorted(local_set):
        layer = named[i][1]
        if _has_meta(layer):
            layer.to_empty(device=device)
            fresh.append(i)
        else:
            layer.to(device)
    for g in groups:
        here = [n for n in g if slots[n][0] in local_set]
        if len(here) > 1:
            _, mod, attr, _ = slots[here[0]]
            keep = mod._parameters[attr]
            for n in here[1:]:
                _, m2, a2, _ = slots[n]
                m2._parameters[a2] = keep
    snapshots: dict[int, torch.Tensor] = {}
    firsts = {slots[g[0]][0]: [] for g in groups}
    for g in groups:
        firsts[slots[g[0]][0]].append(g[0])
    for i in fresh:
        lname, layer = named[i]
        with rng.keyed(seed, _INIT_KEY, _INIT_KEY, i), torch.no_grad():
            if init_fn is not None:
                init_fn(layer)
            else:
                uncovered: list[str] = []
                _reset(layer, lname, uncovered)
                if uncovered:
                    raise ValueError(
                        f"layer {i} ({lname!r}) was built on the meta device, but no "
                        f"reset_parameters() covers {uncovered[:5]}; give the module a "
                        "reset_parameters() or pass init_fn=... to initialize it"
                    )
        for n in firsts.get(i, []):
            _, mod, attr, _ = slots[n]
            snapshots[id(mod._parameters[attr])] = mod._parameters[attr].detach().clone()
    # A tied value is what the layer of the group's first name drew (a later layer holding
    # the same Parameter must not overwrite it).
    for g in groups:
        here = [n for n in g if slots[n][0] in local_set]
        if here:
            _, mod, attr, _ = slots[here[0]]
            p = mod._parameters[attr]
            if id(p) in snapshots:
                with torch.no_grad():
                    p.copy_(snapshots[id(p)])


def free_layer(layer: nn.Module) -> None:
    """Replace every parameter and buffer of ``layer`` by a ``meta`` one (frees its memory
    without touching a Parameter object it shares with a kept layer)."""
    for mod in layer.modules():
        for attr, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                mod._parameters[attr] = nn.Parameter(
                    torch.empty_like(p, device="meta"), requires_grad=p.requires_grad
                )
        for attr, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta:
                mod._buffers[attr] = torch.empty_like(b, device="meta")


def materialize(
    module: nn.Module | Sequence[nn.Module],
    device: torch.device | str = "cpu",
    *,
    seed: int = 0,
    init_fn: Callable[[nn.Module], None] | None = None,
    tied: Sequence[Sequence[str]] = (),
) -> nn.Module | Sequence[nn.Module]:
    """Materialize a sequential model built on ``meta`` exactly as :class:`DistributedPipe`
    does, in one process (the un-pipelined reference of a meta-built pipeline).

    Layer ``i`` is ``to_empty``-ed and initialized (``init_fn(layer)``, else
    ``reset_parameters()`` of its outermost submodules that have one) under the random stream
    keyed ``(seed, -1, -1, i)``, so its values do not depend on which rank builds it. Shared
    parameters stay shared; a tied value is the one the layer of the tie's first name drew.
    Returns ``module``.
    """
    named = sequence.layers_of(module, "materialize")
    slots = param_slots(named)
    groups = tie_groups(slots, tied)
    materialize_layers(named, range(len(named)), torch.device(device), seed, init_fn, groups, slots)
    return module
