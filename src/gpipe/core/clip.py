"""Global gradient-norm clipping, written once for both pipes.

``torch.nn.utils.clip_grad_norm_`` over a pipeline's gradients, wherever they live: the norm
of every counted gradient (a tied parameter's non-owning copies are left out, so it counts
once), added up across the pipeline's processes by the caller's ``reduce`` (an all-reduce;
``None`` in one process), then every gradient scaled by the same factor.

The invariant: every stage scales by one factor computed from the same float64 total, so the
clipped gradients equal those of the un-pipelined model up to the order of a sum. On a GPU the
norms are computed by ``torch._foreach_norm`` per (device, dtype) and read to the host once,
and the scaling is one ``torch._foreach_mul_`` per (device, dtype): no host sync per
parameter.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

import torch

__all__ = ["clip_grad_norm_", "grouped"]

INF = float("inf")


def grouped(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``tensors`` grouped by (device, dtype), the unit the foreach kernels take."""
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = defaultdict(list)
    for t in tensors:
        groups[(t.device, t.dtype)].append(t)
    return list(groups.values())


def _local(counted: Sequence[torch.Tensor], norm_type: float) -> torch.Tensor:
    """This process's part of the total: the max (inf-norm) or the sum of ``|g|_p ** p``, a
    float64 scalar on the host, read once."""
    parts = []
    for group in grouped(counted):
        norms = torch._foreach_norm(group, norm_type)
        stacked = torch.stack([n.double() for n in norms])
        parts.append(stacked.max() if norm_type == INF else (stacked**norm_type).sum())
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    device = parts[0].device
    joined = torch.stack([p.to(device) for p in parts])
    local = joined.max() if norm_type == INF else joined.sum()
    return local.cpu()


def clip_grad_norm_(
    grads: Sequence[torch.Tensor],
    counted: Sequence[torch.Tensor],
    max_norm: float,
    norm_type: float = 2.0,
    *,
    error_if_nonfinite: bool = False,
    reduce: Callable[[torch.Tensor, bool], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Scale ``grads`` so that the total ``norm_type`` norm of ``counted`` (a subset of
    ``grads``) over every process is at most ``max_norm``; return that total (float64 on
    the host). ``reduce(local, is_max)`` adds up (or maxes) the processes' float64 parts."""
    norm_type = float(norm_type)
    acc = _local([g.detach() for g in counted], norm_type)
    if reduce is not None:
        acc = reduce(acc, norm_type == INF)
    total = acc if norm_type == INF else acc ** (1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(
            f"the total norm of order {norm_type} of the gradients is non-finite; set "
            "error_if_nonfinite=False to clip anyway"
        )
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for group in grouped([g.detach() for g in grads]):
        torch._foreach_mul_(group, coef.to(device=group[0].device, dtype=group[0].dtype))
    return total
