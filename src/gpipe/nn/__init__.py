"""Layers that pipelines need."""

from gpipe.nn.batchnorm import (
    DeferredBatchNorm,
    commit_over,
    convert_deferred_batch_norm,
    convert_deferred_batch_norm_in,
    deferred_in,
)

__all__ = [
    "DeferredBatchNorm",
    "commit_over",
    "convert_deferred_batch_norm",
    "convert_deferred_batch_norm_in",
    "deferred_in",
]
