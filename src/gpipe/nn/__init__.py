"""Layers that pipelines need."""

from gpipe.nn.batchnorm import (
    DeferredBatchNorm,
    convert_deferred_batch_norm,
    convert_deferred_batch_norm_in,
)

__all__ = ["DeferredBatchNorm", "convert_deferred_batch_norm", "convert_deferred_batch_norm_in"]
