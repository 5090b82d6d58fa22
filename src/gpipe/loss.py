"""The last stage's loss of one micro-batch, checked before anything trains on it.

The invariant: a loss that reaches the backward is a differentiable floating-point scalar (and
finite, with ``check_finite``); anything else is refused naming the micro-batch and the fix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

__all__ = ["checked_loss"]


def checked_loss(
    loss_fn: Callable[[Any, Any], Any],
    out: Any,
    target: Any,
    microbatch: int,
    check_finite: bool = False,
) -> torch.Tensor:
    """``loss_fn(out, target)`` for ``microbatch``, refused unless a trainable scalar."""
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
