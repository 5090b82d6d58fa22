"""BatchNorm whose running statistics cover the whole mini-batch, not one micro-batch.

In a pipeline each BatchNorm layer sees one micro-batch at a time. Plain BatchNorm would update
its running mean and variance M times per step from M small samples. ``DeferredBatchNorm``
normalizes each micro-batch with that micro-batch's statistics (as the layer would at that
batch size) but *defers* the running-statistics update: it accumulates sums over the M
micro-batches and commits once per step.

A distributed pipe's data-parallel replicas each see a share of the mini-batch: there the
layer only accumulates (``begin_step(m, defer=True)``) and :func:`commit_over` adds up the
replicas' sums after the step and commits once, so the statistics are the whole global
batch's on every replica.

The invariant: after one training step over M micro-batches, ``running_mean`` and
``running_var`` equal those of a plain ``BatchNorm`` that saw the whole mini-batch at once; a
re-materialization pass (``gpipe.stage.remat.is_recomputing()``) adds nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from gpipe.stage.remat import is_recomputing

__all__ = ["DeferredBatchNorm", "commit_over", "convert_deferred_batch_norm", "deferred_in"]


class DeferredBatchNorm(_BatchNorm):
    """BatchNorm (any of 1d/2d/3d input) for ``chunks`` micro-batches per step."""

    sum: torch.Tensor
    sum_squares: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        chunks: int = 1,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True)
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.chunks = chunks
        self.register_buffer("sum", torch.zeros_like(self.running_mean), persistent=False)
        self.register_buffer("sum_squares", torch.zeros_like(self.running_var), persistent=False)
        self.counter = 0  # elements accumulated per channel
        self.tracked = 0  # micro-batches accumulated
        self.defer = False  # commit only when told (commit_over), not at the last micro-batch

    def begin_step(self, chunks: int, defer: bool = False) -> None:
        """Start a mini-batch of ``chunks`` micro-batches: the pipe calls this each training
        step with the real micro-batch count (which a clamp may have lowered), and anything
        left from an unfinished step is dropped rather than mixed into this one. ``defer``:
        only accumulate; :func:`commit_over` commits after the step."""
        if chunks < 1:
            raise ValueError(f"chunks must be >= 1, got {chunks}")
        self.chunks, self.defer = chunks, defer
        self.sum.zero_()
        self.sum_squares.zero_()
        self.counter = 0
        self.tracked = 0

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() <= 1:
            raise ValueError(
                f"expected at least 2-D input (batch, channels, ...), got {input.dim()}-D"
            )

    def _track(self, x: torch.Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        with torch.no_grad():
            self.sum += x.sum(dims)
            self.sum_squares += (x**2).sum(dims)
        self.counter += x.numel() // x.shape[1]
        self.tracked += 1

    def _commit(self) -> None:
        if self.momentum is None:
            self.num_batches_tracked += 1
            factor = 1.0 / float(self.num_batches_tracked)
        else:
            self.num_batches_tracked += 1
            factor = self.momentum
        mean = self.sum / self.counter
        var = self.sum_squares / self.counter - mean**2
        if self.counter > 1:
            var = var * (self.counter / (self.counter - 1))
        with torch.no_grad():
            self.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            self.running_var.mul_(1 - factor).add_(var, alpha=factor)
        self.sum.zero_()
        self.sum_squares.zero_()
        self.counter = 0
        self.tracked = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(
                input,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                False,
                0.0,
                self.eps,
            )
        if not is_recomputing():
            self._track(input)
            if self.tracked == self.chunks and not self.defer:
                self._commit()
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @classmethod
    def convert(cls, module: nn.Module, chunks: int = 1) -> nn.Module:
        """Return ``module`` with every BatchNorm replaced by a DeferredBatchNorm (in place
        for children; the returned object is ``module`` unless it is itself a BatchNorm)."""
        if isinstance(module, DeferredBatchNorm):
            module.chunks = chunks
            return module
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            new = cls(module.num_features, module.eps, module.momentum, module.affine, chunks)
            new = new.to(device=module.running_mean.device, dtype=module.running_mean.dtype)
            with torch.no_grad():
                if module.affine:
                    new.weight.copy_(module.weight)
                    new.bias.copy_(module.bias)
                new.running_mean.copy_(module.running_mean)
                new.running_var.copy_(module.running_var)
                new.num_batches_tracked.copy_(module.num_batches_tracked)
            new.train(module.training)
            return new
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child, chunks))
        return module


def deferred_in(modules: Iterable[nn.Module]) -> list[DeferredBatchNorm]:
    """Every :class:`DeferredBatchNorm` inside ``modules``, in order."""
    return [m for mod in modules for m in mod.modules() if isinstance(m, DeferredBatchNorm)]


def commit_over(layers: Sequence[DeferredBatchNorm], group: Any = None) -> None:
    """Commit the deferred statistics of ``layers`` once, summed over the processes of
    ``group`` first (the data-parallel replicas; ``None``: this process alone), so each
    layer's running statistics are those of the whole global batch. One collective for all
    the layers (their sums in float64, then each back in its own dtype)."""
    import torch.distributed as dist

    if group is not None and layers:
        parts = [t.double() for bn in layers for t in (bn.sum, bn.sum_squares)]
        counts = torch.tensor([bn.counter for bn in layers], dtype=torch.float64)
        flat = torch.cat([*parts, counts.to(parts[0].device)])
        dist.all_reduce(flat, group=group)
        at = 0
        for bn in layers:
            for t in (bn.sum, bn.sum_squares):
                t.copy_(flat[at : at + t.numel()])
                at += t.numel()
        for bn, n in zip(layers, flat[at:].tolist(), strict=True):
            bn.counter = int(n)
    for bn in layers:
        if bn.counter:
            bn._commit()
        bn.defer = False


def convert_deferred_batch_norm(module: nn.Module, chunks: int = 1) -> nn.Module:
    """Replace every ``nn.BatchNorm*d`` in ``module`` by :class:`DeferredBatchNorm` for
    ``chunks`` micro-batches per step, keeping weights and running statistics."""
    return DeferredBatchNorm.convert(module, chunks)


def convert_deferred_batch_norm_in(module: nn.Module | Sequence[nn.Module]) -> Any:
    """``module`` (a module, or a list or sequence of layers) with every BatchNorm replaced
    by a :class:`DeferredBatchNorm`, in the user's own container where it is one, so its
    BatchNorms are the pipe's."""
    if isinstance(module, nn.Module):
        return convert_deferred_batch_norm(module)
    if isinstance(module, list):
        module[:] = [convert_deferred_batch_norm(m) for m in module]
        return module
    return [convert_deferred_batch_norm(m) for m in module]
