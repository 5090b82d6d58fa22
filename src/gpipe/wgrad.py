"""Deferred weight gradients for standard modules: W from each call's input and output gradient.

A split schedule's backward is two actions: ``B`` (the gradient of a stage's inputs, which the
previous stage waits for) and ``W`` (its parameters' gradients, which nothing waits for). Here
``W`` never walks the autograd graph again. While a stage runs forward for a split schedule
(and while it re-materializes for one), every call of a *standard* module — ``nn.Linear``,
``nn.Conv1d/2d/3d``, ``nn.Embedding``, ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``,
``nn.BatchNorm*d`` and :class:`gpipe.nn.DeferredBatchNorm` — runs with its parameters swapped
for detached aliases, so the graph holds no edge to the real parameters, and :class:`Calls`
keeps the call's input and the gradient edge of its output. ``B`` asks autograd for the stage
inputs' gradients *and* those output edges (autograd prunes every weight-gradient product on
the way); ``W`` turns each (input, output gradient) pair into the weight gradients directly
(``gᵀx`` for a linear map, ``convolution_backward`` for a convolution, a scatter-add for an
embedding, the normalized input times the gradient for a norm) and adds them to ``.grad``.

The invariant: for each captured call, ``W`` adds to each of the module's parameters exactly
the contribution autograd would have added for that call. Anything not captured stays in the
graph and is still differentiated there: a parameter of any other module (the *fallback*,
counted by :meth:`WeightGrads.fallback`: the stage then keeps its graph from ``B`` to ``W``
and ``W`` runs ``autograd.backward`` for those parameters, as without this module), and any
use of a standard module's parameter outside that module's own call (a tied weight read
directly), whose gradient ``B`` computes along with the inputs' when nothing falls back.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from gpipe.nn.batchnorm import DeferredBatchNorm

__all__ = ["Calls", "WeightGrads", "splittable"]

_active = threading.local()


# ------------------------------------------------------------------ weight-gradient formulas
# Each takes (module, input, output gradient, extra, names wanted) and returns, per name, the
# gradient: a tensor, or a pair (a, b) that stands for the product a @ b.

Grads = dict[str, Any]


def _lead(x: torch.Tensor, keep: int) -> tuple[int, ...]:
    """The leading dimensions of ``x``, all but its last ``keep``."""
    return tuple(range(x.dim() - keep))


def _channels(x: torch.Tensor) -> tuple[int, ...]:
    """Every dimension but the channel one (``1``)."""
    return tuple(d for d in range(x.dim()) if d != 1)


def _linear(m: nn.Linear, x: torch.Tensor, g: torch.Tensor, extra: Any, names: Any) -> Grads:
    g2 = g.reshape(-1, g.shape[-1])
    out: Grads = {}
    if "weight" in names:
        out["weight"] = (g2.t(), x.reshape(-1, x.shape[-1]).to(g.dtype))
    if "bias" in names:
        out["bias"] = g2.sum(0)
    return out


def _conv_input(m: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """The input and integer padding the convolution itself saw (``padding_mode`` and string
    paddings resolved as ``_conv_forward`` and ATen resolve them)."""
    n = len(m.kernel_size)
    if m.padding_mode != "zeros":
        return F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode), [0] * n
    if m.padding == "valid":
        return x, [0] * n
    if m.padding == "same":
        pads: list[int] = []  # F.pad order: last dimension first, (left, right) each
        for i in reversed(range(n)):
            total = m.dilation[i] * (m.kernel_size[i] - 1)
            pads += [total // 2, total - total // 2]
        if all(pads[j] == pads[j + 1] for j in range(0, len(pads), 2)):
            return x, [pads[2 * (n - 1 - i)] for i in range(n)]
        return F.pad(x, pads), [0] * n
    return x, list(m.padding)  # type: ignore[arg-type]


def _conv(
    m: nn.modules.conv._ConvNd, x: torch.Tensor, g: torch.Tensor, extra: Any, names: Any
) -> Grads:
    n = len(m.kernel_size)
    xi, padding = _conv_input(m, x.to(g.dtype))
    gi = g
    if xi.dim() == n + 1:  # an unbatched call
        xi, gi = xi.unsqueeze(0), g.unsqueeze(0)
    w = m.weight.detach().to(g.dtype)
    mask = [False, "weight" in names, "bias" in names]
    _, gw, gb = torch.ops.aten.convolution_backward(
        gi, xi, w, [w.shape[0]], list(m.stride), padding, list(m.dilation), False, [0] * n,
        m.groups, mask,
    )  # fmt: skip
    return {"weight": gw, "bias": gb}


def _embedding(m: nn.Embedding, x: torch.Tensor, g: torch.Tensor, extra: Any, names: Any) -> Grads:
    pad = -1 if m.padding_idx is None else m.padding_idx
    w = torch.ops.aten.embedding_dense_backward(g, x, m.num_embeddings, pad, m.scale_grad_by_freq)
    return {"weight": w}


def _affine(
    xhat: Callable[[], torch.Tensor], g: torch.Tensor, dims: tuple[int, ...], names: Any
) -> Grads:
    """Gradients of ``y = xhat · w + b``: ``Σ g·xhat`` and ``Σ g`` over ``dims``."""
    out: Grads = {}
    if "weight" in names:
        out["weight"] = (g * xhat()).sum(dims)
    if "bias" in names:
        out["bias"] = g.sum(dims)
    return out


def _layer_norm(m: nn.LayerNorm, x: torch.Tensor, g: torch.Tensor, extra: Any, names: Any) -> Grads:
    # the statistics again, then ATen's fused backward with only the parameters' outputs
    shape = list(m.normalized_shape)
    xf = x.to(g.dtype)
    _, mean, rstd = torch.native_layer_norm(xf, shape, None, None, m.eps)
    w = m.weight.detach().to(g.dtype) if m.weight is not None else None
    b = m.bias.detach().to(g.dtype) if m.bias is not None else None
    mask = [False, "weight" in names, "bias" in names]
    _, gw, gb = torch.ops.aten.native_layer_norm_backward(g, xf, shape, mean, rstd, w, b, mask)
    return {"weight": gw, "bias": gb}


def _rms_norm(m: nn.Module, x: torch.Tensor, g: torch.Tensor, extra: Any, names: Any) -> Grads:
    shape = list(m.normalized_shape)
    xhat = lambda: F.rms_norm(x.to(g.dtype), shape, None, m.eps)  # noqa: E731
    return _affine(xhat, g, _lead(x, len(shape)), names)


def _group_norm(m: nn.GroupNorm, x: torch.Tensor, g: torch.Tensor, extra: Any, names: Any) -> Grads:
    xhat = lambda: F.group_norm(x.to(g.dtype), m.num_groups, None, None, m.eps)  # noqa: E731
    return _affine(xhat, g, _channels(x), names)


def _batch_norm(m: _BatchNorm, x: torch.Tensor, g: torch.Tensor, extra: Any, names: Any) -> Grads:
    # ``extra``: None when the call normalized with the micro-batch's own statistics, else
    # the running statistics it used (copied at the call)
    def xhat() -> torch.Tensor:
        xf = x.to(g.dtype)
        if extra is None:
            return F.batch_norm(xf, None, None, None, None, True, 0.0, m.eps)
        mean, var = (t.to(g.dtype) for t in extra)
        return F.batch_norm(xf, mean, var, None, None, False, 0.0, m.eps)

    return _affine(xhat, g, _channels(x), names)


def _bn_extra(m: _BatchNorm, x: torch.Tensor) -> Any:
    if m.training or (m.running_mean is None and m.running_var is None):
        return None  # the micro-batch's own statistics
    assert m.running_mean is not None and m.running_var is not None
    return (m.running_mean.detach().clone(), m.running_var.detach().clone())


def _no_extra(m: nn.Module, x: torch.Tensor) -> Any:
    return None


@dataclass(frozen=True)
class _Kind:
    """How one standard module type's parameters get their gradients from a call."""

    base: type[nn.Module]
    names: tuple[str, ...]
    grads: Callable[..., Grads]
    extra: Callable[[Any, torch.Tensor], Any] = _no_extra
    same: tuple[str, ...] = ("forward",)  # methods a subclass must not override


def _kinds() -> list[_Kind]:
    wb = ("weight", "bias")
    conv = ("forward", "_conv_forward")
    bns = (DeferredBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    kinds = [
        _Kind(nn.Linear, wb, _linear),
        *(_Kind(c, wb, _conv, same=conv) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
        _Kind(nn.Embedding, ("weight",), _embedding),
        _Kind(nn.LayerNorm, wb, _layer_norm),
        _Kind(nn.GroupNorm, wb, _group_norm),
        *(_Kind(b, wb, _batch_norm, _bn_extra) for b in bns),
    ]
    if hasattr(nn, "RMSNorm"):
        kinds.append(_Kind(nn.RMSNorm, ("weight",), _rms_norm))
    return kinds


_KINDS = _kinds()


def _kind_of(module: nn.Module) -> _Kind | None:
    """The standard kind ``module`` is, or ``None`` (a subclass that overrides ``forward`` is
    not its base's kind)."""
    for kind in _KINDS:
        if isinstance(module, kind.base):
            if all(getattr(type(module), s) is getattr(kind.base, s) for s in kind.same):
                return kind
            return None
    return None


def splittable(module: nn.Module) -> bool:
    """Whether ``module``'s weight gradients can be formed from its calls' inputs and output
    gradients: a standard module (or a subclass that keeps its ``forward``), not parametrized,
    holding only its standard parameters, and not a sparse embedding."""
    kind = _kind_of(module)
    if kind is None or parametrize.is_parametrized(module):
        return False
    if isinstance(module, nn.Embedding) and module.sparse:
        return False
    held = [n for n, p in module._parameters.items() if p is not None]
    return bool(held) and set(held) <= set(kind.names)


# ------------------------------------------------------------------ one micro-batch's calls


@dataclass
class _Call:
    module: nn.Module
    kind: _Kind
    params: dict[str, nn.Parameter]  # the parameters that want a gradient, by name
    x: torch.Tensor
    version: int
    extra: Any
    edge: GradientEdge | None = None
    grad: torch.Tensor | None = None


@dataclass
class Calls:
    """What one micro-batch's split forward kept for its weight gradients.

    ``calls``: each captured module call, in order. After ``B``, each call holds its output
    gradient (``None`` when no gradient reached it) and no reference to the graph; ``direct``
    holds the gradients ``B`` computed for standard parameters used outside their module.
    """

    calls: list[_Call] = field(default_factory=list)
    direct: list[tuple[nn.Parameter, torch.Tensor]] = field(default_factory=list)
    _open: dict[int, _Call] = field(default_factory=dict)
    _swapped: dict[int, tuple[nn.Module, dict[str, nn.Parameter]]] = field(default_factory=dict)

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
        for module, params in self._swapped.values():
            for name, p in params.items():
                module._parameters[name] = p
        self._swapped.clear()
        self._open.clear()


class WeightGrads:
    """The standard modules among a stage's layers, and ``W`` for them.

    Hooks go on those modules at the first :meth:`capture` (a stage that never runs a split
    schedule pays nothing) and come off at :meth:`close`; outside a capture they do nothing.
    """

    def __init__(self, modules: Iterable[nn.Module]) -> None:
        seen: dict[int, nn.Module] = {}
        for m in modules:
            if splittable(m):
                seen.setdefault(id(m), m)
        self.modules = list(seen.values())
        self._split_ids = {id(p) for m in self.modules for p in m.parameters(recurse=False)}
        self._hooks: list[Any] = []

    def fallback(self, params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
        """Of ``params``, those wanting a gradient that no standard module holds: their
        gradient comes from the autograd graph, kept from ``B`` until ``W``."""
        return [p for p in params if p.requires_grad and id(p) not in self._split_ids]

    def close(self) -> None:
        """Remove the hooks."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    @contextlib.contextmanager
    def capture(self) -> Iterator[Calls]:
        """Capture, on this thread, the standard modules' calls made inside the body."""
        if not self._hooks:
            for m in self.modules:
                kind = _kind_of(m)
                self._hooks.append(m.register_forward_pre_hook(functools.partial(_pre, kind)))
                self._hooks.append(m.register_forward_hook(_post))
        calls = Calls()
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
    ) -> tuple[list[torch.Tensor | None], bool]:
        """``B`` for a captured micro-batch: the gradients of ``needs`` (the stage inputs that
        require grad) given those of ``outs``, and, into ``calls``, the captured calls' output
        gradients. Returns the input gradients and whether the graph was kept for ``W``
        (when some of ``params`` fall back to it); otherwise the graph is freed, and the
        gradients of standard parameters used outside their module come along into
        ``calls.direct``."""
        keep = bool(self.fallback(params))
        edges = calls.edges()
        direct = [] if keep else [p for p in params if p.requires_grad]
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
        device = (calls.calls[0].x if calls.calls else calls.direct[0][1]).device
        off = (
            torch.autocast(device.type, enabled=False)
            if torch.amp.is_autocast_available(device.type)
            else contextlib.nullcontext()
        )
        with torch.no_grad(), off:
            for c in calls.calls:
                assert c.grad is not None
                parts = c.kind.grads(c.module, c.x, c.grad, c.extra, c.params)
                for name, p in c.params.items():
                    _add(p, parts[name])
            for p, g in calls.direct:
                _add(p, g)
        calls.calls, calls.direct = [], []


def _add(p: nn.Parameter, grad: Any) -> None:
    """``p.grad += grad`` (``grad`` a tensor, or a pair ``(a, b)`` meaning ``a @ b``)."""
    if isinstance(grad, tuple):
        a, b = grad
        if p.grad is not None and p.grad.dtype == a.dtype and p.grad.is_contiguous():
            p.grad.addmm_(a, b)
            return
        grad = a @ b
    grad = grad.to(p.dtype)
    if p.grad is None:
        p.grad = grad if grad.is_contiguous() else grad.contiguous()
    else:
        p.grad.add_(grad)


# ------------------------------------------------------------------ the hooks


def _pre(kind: _Kind, module: nn.Module, args: tuple) -> None:
    calls: Calls | None = getattr(_active, "calls", None)
    if calls is None or not torch.is_grad_enabled() or id(module) in calls._open:
        return
    if not args or not isinstance(args[0], torch.Tensor):
        return  # left to the graph: the parameters are not swapped, so autograd sees them
    params = {
        n: p
        for n in kind.names
        if isinstance(p := module._parameters.get(n), nn.Parameter) and p.requires_grad
    }
    if not params:
        return
    x = args[0]
    for n, p in params.items():
        # a detached alias that still requires grad, so the output joins the graph even when
        # the input does not (an embedding's indices); autograd never differentiates it
        module._parameters[n] = p.detach().requires_grad_(True)  # type: ignore[assignment]
    calls._swapped[id(module)] = (module, params)
    calls._open[id(module)] = _Call(module, kind, params, x, x._version, kind.extra(module, x))


def _post(module: nn.Module, args: tuple, output: Any) -> None:
    calls: Calls | None = getattr(_active, "calls", None)
    if calls is None:
        return
    swapped = calls._swapped.pop(id(module), None)
    if swapped is not None:
        for name, p in swapped[1].items():
            module._parameters[name] = p
    call = calls._open.pop(id(module), None)
    if call is not None and isinstance(output, torch.Tensor) and output.requires_grad:
        call.edge = get_gradient_edge(output)
        calls.calls.append(call)
