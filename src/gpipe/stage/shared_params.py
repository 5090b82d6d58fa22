"""Parameters used by stages on two workers: one gradient leaf per stage, added in stage order.

In one process a pipe's devices run on worker threads at once. A parameter that layers of
stages on two workers use (tied embeddings, a module that appears twice) would otherwise take
both workers' gradient contributions in whatever order the threads reach it — other bits on
every run — and a split schedule, whose ``W`` adds weight gradients by hand and whose forward
swaps a standard module's parameters for detached aliases (:mod:`gpipe.stage.wgrad`), would have two
threads write one ``.grad`` and one module's parameter table at once: lost contributions.

So the first stage that uses such a parameter *owns* it; every later stage on another worker
*borrows* it (:func:`lend` gives each stage its :class:`Loan`). For each training step
(:meth:`Loan.aliases`, when the stage's step begins) a borrowing stage gets an alias: a new
leaf ``Parameter`` on the same storage. While that stage runs its layers (:meth:`Loan.view`),
every module holding the parameter resolves it, on that thread only, to the alias — its
graph, its captured calls and its ``W`` all write the alias's ``.grad``. When the step's backward is done, :func:`flush` adds each alias's gradient to the
real ``.grad``, stages in order.

The invariant: after a step, a shared parameter's ``.grad`` is what it held, plus its owner's
contributions (in that worker's action order), plus each borrowing stage's sum, in stage
order: the same bits on every run, whatever the threads' timing; and no two workers ever
write the same tensor or the same module's parameter table.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["Loan", "Overlaid", "flush", "lend", "targets"]

_tls = threading.local()


class Overlaid(dict):
    """A module's ``_parameters`` whose entries a thread may replace for itself.

    Outside a :meth:`Loan.view` it is the plain table. Inside one, on that thread, the names the
    view covers read (and, for :mod:`gpipe.stage.wgrad`'s swaps, write) the thread's own entries;
    iteration (``parameters()``, ``state_dict()``) always sees the real parameters.
    """

    def _mine(self) -> dict[str, Any] | None:
        views = getattr(_tls, "views", None)
        return views.get(id(self)) if views else None

    def __getitem__(self, key: str) -> Any:
        mine = self._mine()
        if mine is not None and key in mine:
            return mine[key]
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        mine = self._mine()
        if mine is not None and key in mine:
            return mine[key]
        return dict.get(self, key, default)

    def __setitem__(self, key: str, value: Any) -> None:
        mine = self._mine()
        if mine is not None and key in mine:
            mine[key] = value
        else:
            dict.__setitem__(self, key, value)

    def update(self, other: Any = (), **kw: Any) -> None:  # type: ignore[override]
        for k, v in dict(other, **kw).items():
            self[k] = v


@dataclass
class Loan:
    """What one stage borrows: ``borrowed`` (by id, the parameters an earlier stage on another
    worker owns) and ``holders`` (each module, parameter name and id holding one of them)."""

    borrowed: dict[int, nn.Parameter] = field(default_factory=dict)
    holders: list[tuple[nn.Module, str, int]] = field(default_factory=list)

    def aliases(self) -> dict[int, nn.Parameter]:
        """One step's aliases of the borrowed parameters that want a gradient: leaves on the
        same storage (and version counter), each gathering this stage's gradient."""
        return {
            i: nn.Parameter(p.detach(), requires_grad=True)
            for i, p in self.borrowed.items()
            if p.requires_grad
        }

    @contextlib.contextmanager
    def view(self, alias: Mapping[int, torch.Tensor]) -> Iterator[None]:
        """On this thread, inside the body, each holder's entry reads the step's alias."""
        if not alias:
            yield
            return
        prev = getattr(_tls, "views", None)
        views: dict[int, dict[str, Any]] = {k: dict(v) for k, v in (prev or {}).items()}
        for module, name, pid in self.holders:
            if pid in alias:
                views.setdefault(id(module.__dict__["_parameters"]), {})[name] = alias[pid]
        _tls.views = views
        try:
            yield
        finally:
            _tls.views = prev

    def close(self) -> None:
        """Give the holders back their plain parameter tables (a closing pipe)."""
        for module, _, _ in self.holders:
            table = module.__dict__["_parameters"]
            if isinstance(table, Overlaid):
                _replace_table(module, table, dict(table))


def lend(stages: Sequence[Any], worker_of: Sequence[int]) -> None:
    """Give each stage its :class:`Loan` (``stage.loan``): a parameter is borrowed by a stage
    when an earlier stage on another worker (``worker_of[stage.index]``) uses it. Installs
    :class:`Overlaid` tables where needed."""
    first: dict[int, int] = {}  # id(parameter) → worker of the first stage using it
    for st in stages:
        loan = Loan()
        w = worker_of[st.index]
        for module in _modules(st):
            for name, p in list(module._parameters.items()):
                if p is not None and first.setdefault(id(p), w) != w:
                    loan.borrowed[id(p)] = p
                    loan.holders.append((module, name, id(p)))
                    _overlay_table(module)
        st.loan = loan


def targets(params: list[nn.Parameter], alias: Mapping[int, Any] | None) -> list[Any]:
    """``params`` as a step's gradients reach them: a borrowed one as its alias."""
    return [alias.get(id(p), p) for p in params] if alias else params


def _modules(stage: Any) -> list[nn.Module]:
    seen: dict[int, nn.Module] = {}
    for _, layer in stage.layers:
        for m in layer.modules():
            seen.setdefault(id(m), m)
    return list(seen.values())


def _overlay_table(module: nn.Module) -> None:
    table = module.__dict__["_parameters"]
    if not isinstance(table, Overlaid):
        _replace_table(module, table, Overlaid(table))


def _replace_table(module: nn.Module, old: dict, new: dict) -> None:
    """Make ``new`` the parameter table of ``module`` and of any module object held in its
    ``__dict__`` that shares ``old`` (a captured segment's ``GraphModule`` reads the segment's
    own table: it must read the overlaid one too)."""
    module.__dict__["_parameters"] = new
    for v in module.__dict__.values():
        if isinstance(v, nn.Module) and v.__dict__.get("_parameters") is old:
            v.__dict__["_parameters"] = new


def flush(stages: Sequence[Any], states: Sequence[Any]) -> None:
    """Add each stage's alias gradients to the real ``.grad``, stages in order, and drop the
    aliases (the end of a step's backward)."""
    for st, state in sorted(zip(stages, states, strict=True), key=lambda t: t[0].index):
        for pid, a in state.aliases.items():
            g = a.grad
            if g is None:
                continue
            p = st.loan.borrowed[pid]
            if p.grad is None:
                p.grad = g
            else:
                p.grad.add_(g)
        state.aliases = {}
