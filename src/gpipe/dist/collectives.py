"""What follows a distributed step: replicas agree on failure and loss, tied copies and
data-parallel replicas add up their gradients, and the global gradient-norm clip.

The invariant: after these, every rank holds the gradients of un-pipelined training on the
whole global batch (tied parameters summed over their copies, replicas weighted as
:mod:`gpipe.core.reduction` says: averaged for a mean loss, by their items for a count), every
rank returns the same loss, and a failure on any replica is known on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpipe.core import clip
from gpipe.core.reduction import Reduction, replica_weights
from gpipe.dist.failures import Failure

__all__ = [
    "clip_grad_norm",
    "reduce_over_replicas",
    "replica_sync",
    "stash_tied",
    "sync_tied",
    "unstash",
]

Tie = tuple[nn.Parameter, Any, int, bool]  # local copy, its tie subgroup, source rank, owner?


def replica_sync(
    loss: torch.Tensor | None,
    failure: Failure | None,
    reduction: Reduction,
    items: float,
    dp_group: Any,
    data_parallel: int,
    num_devices: int,
    comm_device: torch.device,
    rows: Sequence[int | None] | None = None,
) -> tuple[torch.Tensor | None, Failure | None, float]:
    """Across data-parallel replicas: learn whether any replica failed; weigh each replica's
    loss by :func:`gpipe.core.reduction.replica_weights` (from its ``items``, and each replica's
    ``rows`` where replicas were given shards of their own) and add them up.
    Returns the loss, the failure, and this replica's weight for its gradients."""
    if dp_group is None:
        return loss, failure, 1.0
    f = failure
    row = torch.tensor(
        [
            0.0 if f is None else 1.0,
            -1 if f is None else f.rank,
            -1 if f is None or f.stage is None else f.stage,
            -1 if f is None or f.microbatch is None else f.microbatch,
            0.0 if loss is None else float(loss),
            float(items),
        ],
        dtype=torch.float64,
        device=comm_device,
    )
    every = [torch.empty_like(row) for _ in range(data_parallel)]
    try:
        dist.all_gather(every, row, group=dp_group)
    except Exception as e:
        return (
            loss,
            failure or Failure(-1, -1, None, None, f"a data-parallel replica did not answer: {e}"),
            1.0,
        )
    if failure is not None:
        return loss, failure, 1.0
    every = [r.cpu() for r in every]
    for j, r in enumerate(every):
        if r[0] > 0:
            ints = [int(v) for v in r[1:4].tolist()]
            return (
                loss,
                Failure(
                    ints[0],
                    ints[0] % num_devices,
                    None if ints[1] < 0 else ints[1],
                    None if ints[2] < 0 else ints[2],
                    f"failed in data-parallel replica {j} (see that rank's error)",
                ),
                1.0,
            )
    assert loss is not None
    weights = replica_weights(reduction, [float(r[5]) for r in every], rows)
    total = sum(w * float(r[4]) for w, r in zip(weights, every, strict=True))
    me = dist.get_group_rank(dp_group, dist.get_rank())
    return torch.tensor(total, dtype=torch.float64).to(loss.dtype), None, weights[me]


def stash_tied(ties: list[Tie]) -> list[torch.Tensor | None]:
    """Set aside the gradients tied copies held before the step (only the step's own
    contribution is summed across ranks, so gradients may accumulate over steps)."""
    out = []
    for p, *_ in ties:
        out.append(p.grad)
        p.grad = None
    return out


def unstash(ties: list[Tie], stash: list[torch.Tensor | None]) -> None:
    """Put back what :func:`stash_tied` set aside (a failed step adds nothing); an empty
    ``stash`` (a step without gradients) puts back nothing."""
    if not stash:
        return
    for (p, *_), old in zip(ties, stash, strict=True):
        if old is not None:
            p.grad = old if p.grad is None else p.grad + old


def sync_tied(ties: list[Tie], stash: list[torch.Tensor | None]) -> None:
    """Sum each tied parameter's step gradient over its copies, then add back the stash."""
    for (p, sub, _, _), old in zip(ties, stash, strict=True):
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=sub)
        p.grad = g if old is None else g + old


def reduce_over_replicas(params: list[nn.Parameter], group: Any, weight: float) -> None:
    """Sum the replicas' gradients over the data-parallel group, each replica's scaled by its
    ``weight`` (:func:`gpipe.core.reduction.replica_weights`: ``1/D`` for a ``"mean"`` loss), so
    they equal the gradients of the whole global batch."""
    by_key: dict[tuple, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        g = _local(p.grad)  # a tensor-parallel DTensor's own shard: alike on every replica
        by_key.setdefault((g.dtype, g.device), []).append(g)
    for gs in by_key.values():
        flat = torch.cat([g.reshape(-1) for g in gs])
        if weight != 1.0:
            flat *= weight
        dist.all_reduce(flat, group=group)
        off = 0
        for g in gs:
            n = g.numel()
            g.copy_(flat[off : off + n].view_as(g))
            off += n


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local tensor (what this rank holds); any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def clip_grad_norm(
    params: list[nn.Parameter],
    not_counted: set[int],
    max_norm: float,
    norm_type: float,
    error_if_nonfinite: bool,
    group: Any,
    comm_device: torch.device,
    out_device: torch.device,
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over every rank of a pipeline (``group``; ``None``
    for one rank): the norm of all stages' gradients, a tied parameter counted once (its
    non-owning copies are in ``not_counted``), every gradient scaled by the same factor."""
    grads = [p.grad for p in params if p.grad is not None]
    counted = [p.grad for p in params if p.grad is not None and id(p) not in not_counted]
    dtype = grads[0].dtype if grads else torch.float32

    def reduce(acc: torch.Tensor, is_max: bool) -> torch.Tensor:
        acc = acc.to(comm_device)
        dist.all_reduce(acc, op=dist.ReduceOp.MAX if is_max else dist.ReduceOp.SUM, group=group)
        return acc.cpu()

    total = clip.clip_grad_norm_(
        grads,
        counted,
        max_norm,
        norm_type,
        error_if_nonfinite=error_if_nonfinite,
        reduce=None if group is None else reduce,
    )
    return total.to(dtype).to(out_device)
