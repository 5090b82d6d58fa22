"""Flagship models for the pipeline library, each a flat ``nn.Sequential`` of cells.

The invariant: every model here can be cut between any two children, and every child maps one
tensor to one tensor.
"""

from gpipe.models.transformer import (
    TransformerConfig,
    TransformerLM,
    init_weights,
    lm_loss,
)

__all__ = ["TransformerConfig", "TransformerLM", "init_weights", "lm_loss"]
