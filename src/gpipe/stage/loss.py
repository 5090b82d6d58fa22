"""The last stage's loss of one micro-batch, checked before anything trains on it.

The invariant: a loss that reaches the backward is a differentiable floating-point scalar (and
finite, with ``check_finite``); anything else is refused naming the micro-batch and the fix.
An output without a batch dimension (a 0-dim tensor: a loss the model computes itself) is
refused before ``loss_fn`` runs, so before any backward.
A micro-batch that holds no items (:mod:`gpipe.core.reduction`) gets :func:`zero_loss` instead of
``loss_fn``'s mean over nothing: zero, and a zero gradient for every output.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gpipe.base.microbatch import tree_flatten

__all__ = ["checked_loss", "refuse_unbatched", "zero_loss"]


def refuse_unbatched(out: Any, microbatch: int) -> None:
    """Refuse a 0-dim tensor in the model's output: a per-micro-batch value (a loss the model
    computes itself) that no merge over micro-batches turns into the whole batch's."""
    for path, v in tree_flatten(out, "output")[0]:
        if isinstance(v, torch.Tensor) and v.dim() == 0:
            raise ValueError(
                f"the model's {path} is a 0-dim tensor for micro-batch {microbatch}: it has "
                "no batch dimension, so the pipe cannot split or merge it (a model that "
                "computes its own loss returns one, e.g. a transformers model called with "
                "labels=); drop labels= from sample= and from the call, and compute the loss "
                "in step's loss_fn from the outputs (e.g. from out.logits)"
            )


def checked_loss(
    loss_fn: Callable[[Any, Any], Any],
    out: Any,
    target: Any,
    microbatch: int,
    check_finite: bool = False,
) -> torch.Tensor:
    """``loss_fn(out, target)`` for ``microbatch``, refused unless a trainable scalar; an
    output without a batch dimension is refused before ``loss_fn`` runs (so before any
    backward: micro-batch 0 reaches the last stage first)."""
    refuse_unbatched(out, microbatch)
    try:
        loss = loss_fn(out, target)
    except Exception as e:
        if target is None:
            raise ValueError(
                f"loss_fn failed on micro-batch {microbatch} with targets=None "
                f"({type(e).__name__}: {e}); pass the targets to step(inputs, targets, "
                "loss_fn) — with DistributedPipe, on the rank of the last stage too"
            ) from e
        raise
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise ValueError(
            f"loss_fn must return a scalar tensor, got {shape} for micro-batch {microbatch}; "
            "reduce it (e.g. .mean()) inside loss_fn"
        )
    if check_finite and not bool(torch.isfinite(loss.detach())):
        raise FloatingPointError(
            f"loss of micro-batch {microbatch} is {loss.item()} (check_finite=True); look "
            "for a diverging learning rate or bad inputs in this micro-batch"
        )
    if not (loss.is_floating_point() or loss.is_complex()):
        raise TypeError(
            f"loss_fn returned a {loss.dtype} tensor for micro-batch {microbatch}; a loss "
            "must be a floating-point scalar (convert the inputs of the loss, not the loss)"
        )
    if torch.is_grad_enabled() and not loss.requires_grad:
        raise ValueError(
            f"loss_fn returned a loss that does not require grad for micro-batch "
            f"{microbatch} (detached, computed under no_grad, or from .item()), so nothing "
            "would train; return the differentiable loss tensor from loss_fn"
        )
    return loss


def zero_loss(out: Any, device: torch.device | None = None) -> torch.Tensor:
    """A loss of 0 whose gradient is zero for every differentiable output (the backward still
    reaches every earlier stage, as the schedule expects), in the outputs' dtype."""
    floats = [
        v
        for _, v in tree_flatten(out)[0]
        if isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())
    ]
    parts = [v.sum().real * 0 for v in floats if v.requires_grad]
    if parts:
        return sum(parts[1:], parts[0])
    dtype = floats[0].real.dtype if floats else torch.get_default_dtype()
    return torch.zeros((), dtype=dtype, device=device)
