"""The one function gpipe keeps out of dynamo's graphs: :func:`raise_eagerly`.

Imported by :func:`gpipe.base.compiling.refuse_compiling` only while dynamo traces (it imports
``torch._dynamo``, which a plain ``import gpipe`` does not load). The invariant: an error
handed to :func:`raise_eagerly` reaches the caller of the compiled function as it is.
"""

from __future__ import annotations

import torch

__all__ = ["raise_eagerly"]


def _raise(error: BaseException) -> None:
    raise error


raise_eagerly = torch.compiler.disable(
    _raise,
    reason="gpipe refuses torch.compile of a pipe (its forward, step or profiling): compile "
    "the layers instead, e.g. nn.Sequential(*(torch.compile(layer) for layer in layers))",
)
"""Raise the given error where dynamo breaks its graph, so it is not swallowed by the trace."""
