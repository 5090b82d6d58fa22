"""One training step, the same for both pipes: check the call, begin, and add up the loss.

``Pipe.step`` and ``DistributedPipe.step`` differ only in who runs the device loops (threads,
or this rank) and in what follows (nothing, or collectives). The rules of a step are here:
which arguments it takes, how the loss is scaled over micro-batches, how each stage starts
the step (random-stream step, grad mode, loss, the forward's autocast), how the micro-batch
losses are added up.

The invariant: the same call is accepted or refused by both pipes with the same message, and
a stage's state for a step comes from :func:`begin` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from gpipe.base.microbatch import batch_size, tree_flatten
from gpipe.core import reduction as reduction_mod
from gpipe.core.reduction import Reduction
from gpipe.stage.amp import Autocast
from gpipe.stage.stage import Stage, StepState

__all__ = [
    "begin",
    "check_call",
    "check_output_rows",
    "check_targets",
    "collect_fetched",
    "loss_scales",
    "step_actions",
    "total_loss",
]


def check_call(loss_fn: Any, reduction: Any) -> None:
    """``step``'s own arguments: a callable loss and a known reduction."""
    reduction_mod.check(reduction)
    if not callable(loss_fn):
        raise TypeError(
            f"loss_fn must be callable as loss_fn(output, target), got "
            f"{type(loss_fn).__name__}; note the order step(inputs, targets, loss_fn)"
        )


def check_targets(inputs: Any, targets: Any, batch_dim: int) -> None:
    """One target row per input row (targets that merely split into the same number of
    micro-batches would pair outputs with the wrong targets)."""
    if inputs is None or targets is None:
        return
    n_in = batch_size((inputs,), batch_dim)
    n_t = batch_size(targets, batch_dim)
    if n_t != n_in:
        raise ValueError(
            f"targets have {n_t} rows along batch_dim={batch_dim} but the inputs have "
            f"{n_in}; pass one target per input row"
        )


def check_output_rows(
    outputs: Mapping[int, Any], inputs: Sequence[Any], num_microbatches: int, batch_dim: int
) -> None:
    """Each micro-batch's output keeps its rows, and non-tensor outputs agree across
    micro-batches: a layer that changed the batch size (or an output without a batch
    dimension, or a per-micro-batch count) would make the merged or per-micro-batch result
    differ from the model's on the whole batch, silently — refuse it instead."""
    first = tree_flatten(outputs[0], "output")[0]
    for i in range(num_microbatches):
        rows = batch_size(inputs[i], batch_dim)
        leaves = tree_flatten(outputs[i], "output")[0]
        if len(leaves) != len(first):
            raise ValueError(
                f"the model's output for micro-batch {i} has {len(leaves)} leaves but "
                f"micro-batch 0's has {len(first)}; every micro-batch must return the same "
                "structure"
            )
        for (path, v), (_, v0) in zip(leaves, first, strict=True):
            if not isinstance(v, torch.Tensor):
                if not _same_value(v, v0):
                    raise ValueError(
                        f"the model's {path} is {v!r} for micro-batch {i} but {v0!r} for "
                        "micro-batch 0; a non-tensor output cannot be merged over "
                        "micro-batches, so the pipelined result would differ from the "
                        "model's on the whole batch; return it as a tensor with a batch "
                        "dimension"
                    )
                continue
            d = batch_dim if batch_dim >= 0 else v.dim() + batch_dim
            got = v.shape[d] if 0 <= d < v.dim() else None
            if got != rows:
                what = f"{got} rows" if got is not None else f"shape {tuple(v.shape)}"
                raise ValueError(
                    f"the model's {path} has {what} along batch_dim={batch_dim} for "
                    f"micro-batch {i}, whose input has {rows}: a layer changed the batch "
                    "size or returned a tensor without a batch dimension, so the pipelined "
                    "result would differ from the model's on the whole batch; keep the "
                    "batch dimension through every layer, or run such a layer outside "
                    "the Pipe"
                )


def collect_fetched(
    fetched: Mapping[int, Mapping[str, Any]],
    names: Sequence[str],
    num_microbatches: int,
    batch_dim: int,
) -> dict[str, Any]:
    """The activations fetched from inner layers, merged over the micro-batches (only the
    names that were fetched here: in a distributed pipe, those of this rank's layers)."""
    from gpipe.base.microbatch import merge

    have = [n for n in names if all(n in fetched.get(i, {}) for i in range(num_microbatches))]
    return {
        n: merge([fetched[i][n] for i in range(num_microbatches)], batch_dim=batch_dim)
        for n in have
    }


def _same_value(a: Any, b: Any) -> bool:
    try:
        return bool(a is b or a == b)
    except Exception:  # a value whose == is not a plain truth value: cannot tell, so differ
        return False


def step_actions(schedule: Any, grad: bool) -> Any:
    """Every device's actions of a ``step``: the whole schedule, or under ``no_grad`` its
    forward actions only."""
    return schedule.actions if grad else schedule.forward_part()


def loss_scales(
    reduction: Reduction, targets: Sequence[Any], whole: bool = True
) -> tuple[list[float], float]:
    """Each micro-batch's loss factor and the mini-batch's item count
    (:mod:`gpipe.core.reduction`; ``targets`` are the micro-batches' targets, ``whole`` when they
    are the whole mini-batch's and not one data-parallel replica's share), warning where
    ``"mean"`` meets unevenly ignored targets."""
    if reduction == "mean":
        reduction_mod.warn_uneven(targets)
    return reduction_mod.microbatch_scales(reduction, targets, whole=whole)


def begin(
    stages: Sequence[Stage],
    step: int,
    num_microbatches: int,
    grad: bool,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    scale: float | Sequence[float] = 1.0,
    *,
    check_finite: bool = False,
    rng_offset: int = 0,
) -> list[StepState]:
    """Start a step on ``stages``: a fresh state each (random-stream ``step``, grad mode, the
    loss and its scale, the calling thread's autocast for its forwards), and the micro-batch
    offset of this data-parallel replica."""
    states = []
    autocast = Autocast.capture()
    for st in stages:
        states.append(st.begin_step(step, num_microbatches, grad, loss_fn, scale, autocast))
        st.check_finite = check_finite
        st.rng_offset = rng_offset
    return states


def total_loss(losses: Mapping[int, torch.Tensor], num_microbatches: int) -> torch.Tensor:
    """The step's loss: the (already scaled) micro-batch losses added up, in order."""
    missing = [i for i in range(num_microbatches) if i not in losses]
    if missing:
        raise RuntimeError(f"no loss was computed for micro-batches {missing}")
    parts = [losses[i] for i in range(num_microbatches)]
    dev = parts[-1].device
    return torch.stack([p.to(dev) for p in parts]).sum()
