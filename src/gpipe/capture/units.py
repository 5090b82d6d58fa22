"""Which modules of a model are its *units* — the pieces a captured graph is cut between.

A module is split into its children when it holds a stack of blocks at any depth (a
``ModuleList``/``ModuleDict`` of two or more modules, or an ``nn.Sequential`` of two or more
non-leaf blocks of one type); otherwise it is one unit. The model itself is always split. So a GPT-2 gives ``transformer.wte``, ``transformer.wpe``, ``transformer.drop``, every
``transformer.h.<i>``, ``transformer.ln_f`` and ``lm_head``. Every graph node is assigned the
unit (and the call of that unit) it ran in, or ``None`` for glue code between units.

The invariant: the units partition the model's leaf modules; a node's unit is the outermost
unit on its module stack, so a cut between two units never splits one unit's call.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import torch.fx as fx
from torch import nn

__all__ = ["node_units", "resolve_split_points", "unit_paths"]


def _is_stack(m: nn.Module) -> bool:
    """A ``ModuleList``/``ModuleDict`` of two or more modules, or an ``nn.Sequential`` with two
    or more non-leaf children of one type (a stack of blocks, not ``Linear → ReLU``)."""
    if isinstance(m, (nn.ModuleList, nn.ModuleDict)):
        return len(m) >= 2
    if isinstance(m, nn.Sequential):
        kinds = [type(c) for c in m.children() if c._modules]
        return any(kinds.count(k) >= 2 for k in kinds)
    return False


def _repeats(module: nn.Module) -> bool:
    return any(_is_stack(m) for m in module.modules())


def unit_paths(model: nn.Module) -> list[str]:
    """The units of ``model`` as module paths, in registration order."""
    out: list[str] = []

    def visit(m: nn.Module, path: str) -> None:
        kids = [(n, c) for n, c in m.named_children()]
        if path and (not kids or not _repeats(m)):
            out.append(path)
            return
        for n, c in kids:
            visit(c, f"{path}.{n}" if path else n)

    visit(model, "")
    return out


def _unit_of_path(path: str, units: set[str]) -> str | None:
    parts = path.split(".")
    for i in range(1, len(parts) + 1):
        p = ".".join(parts[:i])
        if p in units:
            return p
    return None


def node_units(nodes: Sequence[fx.Node], units: Sequence[str]) -> list[tuple[str, str] | None]:
    """For each node, ``(unit path, call key)`` of the unit call it belongs to, or ``None``.

    ``torch.export`` records the whole module stack of a node; ``torch.fx`` records only the
    leaf module it calls, whose path is then mapped to its enclosing unit."""
    uset = set(units)
    out: list[tuple[str, str] | None] = []
    for node in nodes:
        found = None
        stack = node.meta.get("nn_module_stack") or {}
        for key, (path, _) in stack.items():
            u = _unit_of_path(path, uset) if path else None
            if u is not None:
                # export's key for a call names the module path of that call (repeat calls get
                # "@<n>"); the unit's own call is the entry whose path is the unit
                found = (u, key if path == u else f"{u}#{key}")
                break
        if found is None and node.op == "call_module":
            u = _unit_of_path(str(node.target), uset)
            found = (u, u) if u is not None else None
        out.append(found)
    return out


def resolve_split_points(
    points: str | Sequence[str] | None, model: nn.Module, units: Sequence[str]
) -> list[tuple[str, str]]:
    """``split_points`` as ``(unit path, "before"|"after")``.

    A point is a module path (cut before it) or ``"<path>:after"``/``"<path>:before"``; one
    string is one point (not a list of one-letter paths). The path may name a unit or a module
    containing units (cut before its first / after its last unit). A name that is no module is
    refused with the nearest names."""
    names = [n for n, _ in model.named_modules() if n]
    if points is not None and not isinstance(points, (str, Sequence)):
        raise TypeError(
            f"split_points must be a module path or a list of them (e.g. ['h.2']), got "
            f"{type(points).__name__} {points!r}"
        )
    out = []
    for point in [points] if isinstance(points, str) else list(points or ()):
        if not isinstance(point, str):
            raise TypeError(f"split_points holds {point!r}; give module paths as strings")
        path, _, where = point.partition(":")
        where = where or "before"
        if where not in ("before", "after"):
            raise ValueError(
                f"split point {point!r}: say '<module>:before' or '<module>:after', not {where!r}"
            )
        inside = [u for u in units if u == path or u.startswith(path + ".")]
        if not inside:
            parent = _unit_of_path(path, set(units))
            if path in names and parent is not None:
                raise ValueError(
                    f"split point {point!r} is inside the unit {parent!r}, which runs as one "
                    f"piece; cut before or after {parent!r}"
                )
            near = difflib.get_close_matches(path, names, n=5, cutoff=0.5)
            raise ValueError(
                f"split point {point!r} names no module of {type(model).__name__}; "
                f"nearest names: {near or names[:5]}"
            )
        out.append((inside[0], "before") if where == "before" else (inside[-1], "after"))
    return out
