"""Deferred weight gradients for standard modules: W from each call's input and output gradient.

A split schedule's backward is two actions: ``B`` (the gradient of a stage's inputs, which the
previous stage waits for) and ``W`` (its parameters' gradients, which nothing waits for). Here
``W`` never walks the autograd graph again. While a stage runs forward for a split schedule
(and while it re-materializes for one), every call of a *standard* module — ``nn.Linear``,
``nn.Conv1d/2d/3d``, ``nn.Embedding`` (:mod:`gpipe.stage.wgrad_kinds`) — runs with its parameters
swapped for detached aliases, so the graph holds no edge to the real parameters, and
:class:`Calls` keeps the call's input and the gradient edge of its output. ``B`` asks autograd
for the stage inputs' gradients, those output edges, and the gradients of the parameters whose
gradient is a mere reduction (normalization layers, anything of at most one dimension:
:func:`gpipe.stage.wgrad_kinds.reduced_in_b`) — autograd prunes every weight-gradient matrix product
on the way; ``W`` turns each (input, output gradient) pair into the weight gradients directly
and adds them, and ``B``'s reductions, to ``.grad``.

The invariant: ``W`` adds to each parameter exactly the contribution autograd would have
added for the micro-batch. Anything not captured and not reduced in ``B`` stays in the graph
and is still differentiated there: a matrix parameter of any other module (the *fallback*,
counted by :meth:`WeightGrads.fallback`: the stage then keeps its graph from ``B`` to ``W`` and
``W`` runs ``autograd.backward`` for those parameters, as without this module), and any use of
a standard module's parameter outside that module's own call (a tied weight read directly),
whose gradient ``B`` computes along with the inputs' when nothing falls back. A parameter
that carries a gradient hook always falls back (its module's calls are not captured), so
autograd forms its gradient and runs the hook once per micro-batch, as without the split; a
module with forward hooks of its own (which may change its input or output) is not captured
either, its parameters' gradients coming from the graph.

Which calls are captured depends on the stage and the module only — never on the step or on
the threads' timing: a capture takes the calls of its own stage's standard modules only, and a
module carries one pair of these hooks however many stages (on however many workers) hold it,
so no stage ever mistakes another stage's pair for a user's hook.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules import module as _module_hooks

from gpipe.stage import shared_params
from gpipe.stage.wgrad_kinds import Kind, add_grad, kind_of, reduced_in_b, splittable

__all__ = ["Calls", "WeightGrads", "splittable"]

_active = threading.local()


# ------------------------------------------------------------------ one micro-batch's calls


class _Call:
    """One captured module call: its input (and that input's version, to notice an in-place
    change), the parameters that want a gradient (the real ones, by name), then the gradient
    edge of its output (until ``B``) and that gradient."""

    __slots__ = ("edge", "grad", "kind", "module", "params", "version", "x")

    def __init__(self, module: nn.Module, kind: Kind, params: dict, x: torch.Tensor) -> None:
        self.module, self.kind, self.params, self.x = module, kind, params, x
        self.version = x._version
        self.edge: GradientEdge | None = None
        self.grad: torch.Tensor | None = None


@dataclass
class Calls:
    """What one micro-batch's split forward kept for its weight gradients.

    ``owned``: the ids of the standard modules whose calls this capture takes (the capturing
    stage's). ``calls``: each captured module call, in order. After ``B``, each call holds its
    output gradient (``None`` when no gradient reached it) and no reference to the graph;
    ``direct`` holds the parameter gradients ``B`` computed itself (the reductions, and
    standard parameters used outside their module).
    """

    owned: frozenset[int] = frozenset()
    calls: list[_Call] = field(default_factory=list)
    direct: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    _open: dict[int, _Call] = field(default_factory=dict)  # running, parameters swapped

    def edges(self) -> list[GradientEdge]:
        """The output gradient edges ``B`` asks autograd for, one per call."""
        return [c.edge for c in self.calls if c.edge is not None]

    def check_inputs(self, stage: int, microbatch: int) -> None:
        """Raise if a call's input was changed in place after the call (``W`` needs it as the
        call saw it)."""
        for c in self.calls:
            if c.x._version != c.version:
                raise RuntimeError(
                    f"stage {stage}, micro-batch {microbatch}: the input of a "
                    f"{type(c.module).__name__} was modified in place after the module ran; "
                    "its weight gradient needs the input as the module saw it — replace the "
                    "in-place op after it (e.g. x += h) by an out-of-place one (x = x + h)"
                )

    def take_grads(self, grads: Iterable[torch.Tensor | None]) -> None:
        """Store ``B``'s gradients of :meth:`edges` (in that order) and drop the edges."""
        it = iter(grads)
        for c in self.calls:
            if c.edge is not None:
                c.grad = next(it)
                c.edge = None
        self.calls = [c for c in self.calls if c.grad is not None]

    def _restore(self) -> None:
        for c in self._open.values():
            c.module._parameters.update(c.params)
        self._open.clear()


class WeightGrads:
    """The standard modules among a stage's layers, and ``W`` for them.

    Hooks go on those modules at the first :meth:`capture` (a stage that never runs a split
    schedule pays nothing) and come off at :meth:`close`; outside a capture they do nothing. A
    module several stages hold (a module that appears twice, on one worker or two) gets one
    pair, shared, and keeps it until the last of them closes (:func:`_hold`, :func:`_release`).
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        seen: dict[int, nn.Module] = {}
        self._owner: dict[int, nn.Module] = {}  # each parameter's holder
        for m in modules:
            if splittable(m):
                seen.setdefault(id(m), m)
            for p in m.parameters(recurse=False):
                self._owner.setdefault(id(p), m)
        self.modules = list(seen.values())
        self._module_ids = frozenset(seen)
        self._split_ids = {id(p) for m in self.modules for p in m.parameters(recurse=False)}
        self._hooked = False

    def _reduced(self, p: nn.Parameter) -> bool:
        """Whether ``B`` computes ``p``'s gradient (:func:`gpipe.stage.wgrad_kinds.reduced_in_b`)."""
        if _hooked(p):
            return False
        return id(p) not in self._split_ids and reduced_in_b(p, self._owner.get(id(p)))

    def fallback(self, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """Of ``params``, those wanting a gradient that no standard module holds and that are
        not reduced in ``B``: their gradient comes from the autograd graph, kept from ``B``
        until ``W``."""
        return [
            p
            for p in params
            if p.requires_grad
            and (id(p) not in self._split_ids or _hooked(p))
            and not self._reduced(p)
        ]

    def graph_params(self, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """Of ``params``, those whose deferred gradient a ``W`` on the kept graph computes:
        all that want one except the reductions ``B`` already formed."""
        return [p for p in params if p.requires_grad and not self._reduced(p)]

    def close(self) -> None:
        """Give up this stage's hold on the hooks (removed with the last hold on a module)."""
        with _hooks_lock:
            if self._hooked:
                for m in self.modules:
                    _release(m)
                self._hooked = False

    @contextlib.contextmanager
    def capture(self) -> Iterator[Calls]:
        """Capture, on this thread, the calls of these standard modules made inside the
        body."""
        with _hooks_lock:
            if not self._hooked:
                for m in self.modules:
                    _hold(m)
                self._hooked = True
        calls = Calls(owned=self._module_ids)
        prev = getattr(_active, "calls", None)
        _active.calls = calls
        try:
            yield calls
        finally:
            _active.calls = prev
            calls._restore()

    def input_grads(
        self,
        calls: Calls,
        outs: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        needs: list[torch.Tensor],
        params: list[nn.Parameter],
        alias: Mapping[int, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor | None], bool]:
        """``B`` for a captured micro-batch: the gradients of ``needs`` (the stage inputs that
        require grad) given those of ``outs``, and, into ``calls``, the captured calls' output
        gradients, and, into ``calls.direct``, the gradients of the parameters reduced in
        ``B``. Returns the input gradients and whether the graph was kept for ``W`` (when some
        of ``params`` fall back to it: ``W`` then walks it for :meth:`graph_params`);
        otherwise the graph is freed, and the gradients of standard parameters used outside
        their module come along into ``calls.direct`` too. ``alias`` maps a parameter the
        stage borrows (:mod:`gpipe.stage.shared_params`) to the leaf its gradient goes to."""
        keep = bool(self.fallback(params))
        edges = calls.edges()
        if keep:
            chosen = [p for p in params if p.requires_grad and self._reduced(p)]
        else:
            chosen = [p for p in params if p.requires_grad]
        direct = shared_params.targets(chosen, alias)
        wanted: list[Any] = [*needs, *edges, *direct]
        res: tuple[torch.Tensor | None, ...] = (None,) * len(wanted)
        if outs and wanted:
            res = torch.autograd.grad(outs, wanted, grads, retain_graph=keep, allow_unused=True)
        n, e = len(needs), len(edges)
        calls.take_grads(res[n : n + e])
        calls.direct = [(p, g) for p, g in zip(direct, res[n + e :]) if g is not None]
        return list(res[:n]), keep

    @staticmethod
    def accumulate(calls: Calls) -> None:
        """``W``: add each captured call's weight gradients (and ``B``'s direct ones) to
        ``.grad``."""
        if not calls.calls and not calls.direct:
            return
        with torch.no_grad():
            for c in calls.calls:
                assert c.grad is not None
                parts = c.kind.grads(c.module, c.x, c.grad, c.params)
                for name, p in c.params.items():
                    add_grad(p, parts[name])
            for p, g in calls.direct:
                add_grad(p, g)
        calls.calls, calls.direct = [], []


# ------------------------------------------------------------------ the hooks


@dataclass
class _Pair:
    """The pair of hooks (:func:`_pre`, :func:`_post`) on one module, and how many
    :class:`WeightGrads` hold it."""

    handles: tuple[Any, Any]
    holds: int = 0


# Each module's one pair. Keyed weakly: a module dropped without a close takes its entry along.
# Stages on two workers install and remove pairs at once: every change happens under the lock.
_pairs: weakref.WeakKeyDictionary[nn.Module, _Pair] = weakref.WeakKeyDictionary()
_hooks_lock = threading.Lock()


def _hold(module: nn.Module) -> None:
    """Take a hold on ``module``'s pair, installing it if it has none (under ``_hooks_lock``)."""
    pair = _pairs.get(module)
    if pair is None:
        pre = module.register_forward_pre_hook(functools.partial(_pre, kind_of(module)))
        pair = _pairs[module] = _Pair((pre, module.register_forward_hook(_post)))
    pair.holds += 1


def _release(module: nn.Module) -> None:
    """Give up a hold on ``module``'s pair, removing it with the last (under ``_hooks_lock``)."""
    pair = _pairs.get(module)
    if pair is None:
        return
    pair.holds -= 1
    if pair.holds == 0:
        for h in pair.handles:
            h.remove()
        del _pairs[module]


def _foreign_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward hooks besides this module's own pair (one per module,
    however many stages hold it: :func:`_hold`) or a global one:
    a hook may change the input the call sees or the output it returns, so the pair kept for
    ``W`` would not be the one autograd differentiates; such a module is left to the graph."""
    return (
        len(module._forward_pre_hooks) > 1
        or len(module._forward_hooks) > 1
        or bool(_module_hooks._global_forward_pre_hooks)
        or bool(_module_hooks._global_forward_hooks)
    )


def _hooked(p: torch.Tensor) -> bool:
    """Whether ``p`` carries a gradient hook (``register_hook``,
    ``register_post_accumulate_grad_hook``): autograd runs it when it forms ``p``'s gradient,
    so that gradient must come from the graph — never from ``W``'s formula, which would skip
    the hook (a clipping or noise hook then silently changes nothing)."""
    return bool(p._backward_hooks) or bool(getattr(p, "_post_accumulate_grad_hooks", None))


def _pre(kind: Kind, module: nn.Module, args: tuple) -> None:
    calls: Calls | None = getattr(_active, "calls", None)
    if calls is None or not torch.is_grad_enabled() or id(module) in calls._open:
        return
    if id(module) not in calls.owned:
        return  # another stage's module (reached by a hidden reference): left to the graph
    if not args or not isinstance(args[0], torch.Tensor):
        return  # left to the graph: the parameters are not swapped, so autograd sees them
    own = module._parameters
    if any(isinstance(p, nn.Parameter) and _hooked(p) for p in map(own.get, kind.names)):
        return  # a gradient hook runs only where autograd forms the gradient: the graph
    if _foreign_hooks(module):
        return  # the call's input or output may not be what its hooks saw: the graph
    params = {}
    for n in kind.names:
        p = own.get(n)
        if isinstance(p, nn.Parameter) and p.requires_grad:
            params[n] = p
            # a detached alias that still requires grad, so the output joins the graph even
            # when the input does not (an embedding's indices); autograd never differentiates it
            own[n] = p.detach().requires_grad_(True)  # type: ignore[assignment]
    if params:
        calls._open[id(module)] = _Call(module, kind, params, args[0])


def _post(module: nn.Module, args: tuple, output: Any) -> None:
    calls: Calls | None = getattr(_active, "calls", None)
    call = calls._open.pop(id(module), None) if calls is not None else None
    if call is None:
        return
    module._parameters.update(call.params)
    if isinstance(output, torch.Tensor) and output.requires_grad:
        call.edge = get_gradient_edge(output)
        calls.calls.append(call)  # type: ignore[union-attr]
