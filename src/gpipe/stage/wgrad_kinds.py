"""Which parameters a split backward defers to ``W``, and each deferred kind's formula.

Deferred (*kinds*): the weights of ``nn.Linear``, ``nn.Conv1d/2d/3d`` and ``nn.Embedding``
calls, whose gradient is a matrix product (or a convolution, or a scatter-add) of the call's
input and output gradient — ``gᵀx``, ATen's ``convolution_backward``,
``embedding_dense_backward`` — and their biases (``Σ g``). Everything else whose gradient is a
reduction over the activations — the parameters of normalization layers (:data:`NORMS`) and
any parameter of at most one dimension (:func:`reduced_in_b`) — is computed by ``B`` itself,
where the backward kernel that forms the input gradient forms it almost for free.

The invariant: :attr:`Kind.grads` of a module that :func:`splittable` accepts returns, for
each parameter asked for, exactly the gradient autograd would add to it for that call (up to
the rounding of a different summation order).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.utils import parametrize

__all__ = ["NORMS", "Kind", "add_grad", "kind_of", "reduced_in_b", "splittable"]

# Each takes (module, input, output gradient, names wanted) and returns, per name, the
# gradient: a tensor, or a pair (a, b) that stands for the product a @ b.

Grads = dict[str, Any]


def _linear(m: nn.Linear, x: torch.Tensor, g: torch.Tensor, names: Any) -> Grads:
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


def _conv(m: nn.modules.conv._ConvNd, x: torch.Tensor, g: torch.Tensor, names: Any) -> Grads:
    n = len(m.kernel_size)
    xi, padding = _conv_input(m, x.to(g.dtype))
    gi = g
    if xi.dim() == n + 1:  # an unbatched call
        xi, gi = xi.unsqueeze(0), g.unsqueeze(0)
    w = m.weight.detach().to(g.dtype)
    mask = [False, "weight" in names, "bias" in names]
    _, gw, gb = torch.ops.aten.convolution_backward(
        gi,
        xi,
        w,
        [w.shape[0]],
        list(m.stride),
        padding,
        list(m.dilation),
        False,
        [0] * n,
        m.groups,
        mask,
    )
    return {"weight": gw, "bias": gb}


def _embedding(m: nn.Embedding, x: torch.Tensor, g: torch.Tensor, names: Any) -> Grads:
    pad = -1 if m.padding_idx is None else m.padding_idx
    w = torch.ops.aten.embedding_dense_backward(g, x, m.num_embeddings, pad, m.scale_grad_by_freq)
    return {"weight": w}


@dataclass(frozen=True)
class Kind:
    """How one standard module type's parameters get their gradients from a call."""

    base: type[nn.Module]
    names: tuple[str, ...]
    grads: Callable[..., Grads]
    same: tuple[str, ...] = ("forward",)  # methods a subclass must not override


_KINDS = [
    Kind(nn.Linear, ("weight", "bias"), _linear),
    *(
        Kind(c, ("weight", "bias"), _conv, same=("forward", "_conv_forward"))
        for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    ),
    Kind(nn.Embedding, ("weight",), _embedding),
]
#: Normalization layers: their parameters' gradients are reductions over the activations
#: (``Σ g·x̂``, ``Σ g``) that the backward's own kernel forms almost for free, so ``B``
#: computes them with the input gradient instead of deferring them to ``W``.
NORMS: tuple[type[nn.Module], ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    _NormBase,  # BatchNorm*, InstanceNorm*, gpipe.nn.DeferredBatchNorm
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)


def reduced_in_b(param: nn.Parameter, owner: nn.Module | None) -> bool:
    """Whether ``B`` computes ``param``'s gradient (held directly by ``owner``, ``None`` when
    unknown) rather than
    deferring it: a normalization layer's parameter, or any parameter of at most one
    dimension (a scale, a gate, a bias outside a standard call) — its gradient is a reduction
    over activations, never a matrix product, so deferring it would save ``B`` almost nothing
    and cost ``W`` a second read of the gradient."""
    return isinstance(owner, NORMS) or param.dim() <= 1


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
