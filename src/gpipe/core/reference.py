"""Un-pipelined reference runs with the same keyed random streams as the pipeline.

The pipeline's promise is "the same as un-pipelined mini-batch training". When the model has
random layers the two only agree if both draw the same random numbers, so this module runs the
plain model one micro-batch at a time, each layer inside the same keyed region
(seed, step, micro-batch, layer) that :class:`gpipe.stage.stage.Stage` uses. Without random layers
``reference_step`` equals the ordinary ``loss_fn(model(x), y).backward()`` on the whole batch.
The invariant: it draws exactly what the pipeline draws (same keys, same split). It shares
:mod:`gpipe.stage.rng` and :mod:`gpipe.base.microbatch` with the pipeline, so it cannot catch a bug in
those; it is a convenience for users. The test suite defends the invariant against its own
reference, ``tests/reference_impl.py`` (see docs/testing.md), and checks that this module
agrees with it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from gpipe.base.microbatch import merge, split
from gpipe.core.reduction import Reduction, microbatch_scales
from gpipe.stage import amp, rng, rng_replay
from gpipe.stage.loss import zero_loss

__all__ = ["reference_forward", "reference_step"]


def _run(layers: Sequence[nn.Module], args: tuple, seed: int, step: int, microbatch: int) -> Any:
    x: Any = args
    for i, layer in enumerate(layers):
        with rng.keyed(seed, step, microbatch, i):
            x = layer(*x) if i == 0 else layer(x)
    return x


def reference_forward(
    module: nn.Sequential | Sequence[nn.Module],
    *inputs: Any,
    chunks: int = 1,
    seed: int = 0,
    step: int = 0,
    batch_dim: int = 0,
) -> Any:
    """The un-pipelined forward that ``Pipe(module, chunks=chunks, seed=seed)(*inputs)`` equals
    at its ``step``-th training call."""
    layers = list(module)
    mbs = split(inputs, chunks, batch_dim=batch_dim)
    return merge([_run(layers, mb, seed, step, t) for t, mb in enumerate(mbs)], batch_dim=batch_dim)


def reference_step(
    module: nn.Sequential | Sequence[nn.Module],
    inputs: Any,
    targets: Any,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    chunks: int = 1,
    seed: int = 0,
    step: int = 0,
    batch_dim: int = 0,
    reduction: Reduction = "mean",
) -> torch.Tensor:
    """The un-pipelined equivalent of ``Pipe.step``: forward each micro-batch through the whole
    model with keyed random streams, add the losses (each scaled as ``reduction`` says:
    divided by M for ``"mean"``, by its share of the items for a count), backward
    each (a layer's own checkpoint then recomputes with the forward's draws, as in the pipe)
    without autocast, as the pipe's backward (:mod:`gpipe.stage.amp`). Gradients accumulate in
    ``module``'s parameters; returns the loss."""
    layers = list(module)
    mbs = split((inputs,), chunks, batch_dim=batch_dim)
    m = len(mbs)
    tmbs = [None] * m if targets is None else split(targets, m, batch_dim=batch_dim)
    scales = microbatch_scales(reduction, tmbs)[0]
    hooks = [
        h for i, layer in enumerate(layers) for h in rng.install_hooks(layer, i, rng_replay.replay)
    ]
    try:
        losses, draws = [], [{} for _ in mbs]
        for t, mb in enumerate(mbs):
            with rng.recording(draws[t]):
                out = _run(layers, mb, seed, step, t)
                losses.append(loss_fn(out, tmbs[t]) * scales[t] if scales[t] else zero_loss(out))
        total = sum(losses)
        if torch.is_grad_enabled() and isinstance(total, torch.Tensor) and total.requires_grad:
            # one backward per micro-batch, so that a layer's own checkpoint recomputing a
            # random module draws that micro-batch's recorded numbers (gpipe.stage.rng_replay)
            for t, loss in enumerate(losses):
                if loss.requires_grad:
                    with amp.off(), rng_replay.backward_of(0, t, True, draws[t]):
                        loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return total.detach()
