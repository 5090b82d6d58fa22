"""The standard module kinds whose weight gradients need only a call's input and output gradient.

For each kind (``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.Embedding``, ``nn.LayerNorm``,
``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm*d``, :class:`gpipe.nn.DeferredBatchNorm`), the
formula of its parameters' gradients from one call: ``gᵀx`` for a linear map, ATen's
``convolution_backward`` for a convolution, ``embedding_dense_backward`` for an embedding, the
normalized input times the gradient for a norm. The invariant: :func:`formula` of a module that
:func:`splittable` accepts returns, for each parameter asked for, exactly the gradient autograd
would add to it for that call (up to the rounding of a different summation order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize

from gpipe.nn.batchnorm import DeferredBatchNorm

__all__ = ["Kind", "add_grad", "kind_of", "splittable"]

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
    # ATen's fused backward, parameters' outputs only, on the statistics the forward saved
    # (``extra``, taken from the output's autograd node) or, failing that, computed again
    shape = list(m.normalized_shape)
    xf = x.to(g.dtype)
    if extra is not None:
        mean, rstd = extra
    else:
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


def _ln_stats(m: nn.LayerNorm, out: torch.Tensor) -> Any:
    """The mean and reciprocal deviation the layer norm's autograd node saved, if it did."""
    node = out.grad_fn
    if type(node).__name__ != "NativeLayerNormBackward0":
        return None
    return (node._saved_result1, node._saved_result2)  # type: ignore[union-attr]


@dataclass(frozen=True)
class Kind:
    """How one standard module type's parameters get their gradients from a call."""

    base: type[nn.Module]
    names: tuple[str, ...]
    grads: Callable[..., Grads]
    extra: Callable[[Any, torch.Tensor], Any] | None = None  # from the module and its input
    saved: Callable[[Any, torch.Tensor], Any] | None = None  # from the module and its output
    same: tuple[str, ...] = ("forward",)  # methods a subclass must not override


def _kinds() -> list[Kind]:
    wb = ("weight", "bias")
    conv = ("forward", "_conv_forward")
    bns = (DeferredBatchNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    kinds = [
        Kind(nn.Linear, wb, _linear),
        *(Kind(c, wb, _conv, same=conv) for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)),
        Kind(nn.Embedding, ("weight",), _embedding),
        Kind(nn.LayerNorm, wb, _layer_norm, saved=_ln_stats),
        Kind(nn.GroupNorm, wb, _group_norm),
        *(Kind(b, wb, _batch_norm, _bn_extra) for b in bns),
    ]
    if hasattr(nn, "RMSNorm"):
        kinds.append(Kind(nn.RMSNorm, ("weight",), _rms_norm))
    return kinds


_KINDS = _kinds()


def kind_of(module: nn.Module) -> Kind | None:
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
    kind = kind_of(module)
    if kind is None or parametrize.is_parametrized(module):
        return False
    if isinstance(module, nn.Embedding) and module.sparse:
        return False
    held = [n for n, p in module._parameters.items() if p is not None]
    return bool(held) and set(held) <= set(kind.names)


def add_grad(p: nn.Parameter, grad: Any) -> None:
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
