"""Per-layer action costs of one micro-batch: from FLOPs, or timed on the real device.

Both give, for each layer, ``(F, B, W)`` in seconds: the forward, the input-gradient half of
the backward and the weight-gradient half, with ``B + W`` the whole backward (timed as one
walk of the graph; ``B`` alone as the walk that prunes the weight gradients). A stage's
action then costs the sum over its layers, plus a fixed per-action overhead and, for a
backward split into two actions, the share ``split_extra`` more (both added by the planner).

The invariant: the two sources answer the same question in the same unit, so a plan built on
either is ranked by the same rule; only :func:`measure` runs anything, and it leaves the
layers' parameters, gradients and modes as it found them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from gpipe.base.microbatch import tree_flatten, tree_unflatten

__all__ = ["default_flops_per_second", "from_flops", "measure", "rows_like"]


def default_flops_per_second(device: str, workers: int) -> float:
    """A rough sustained FLOP rate per pipeline device: it sets the unit of FLOP-based step
    times (their ranking does not depend on it). A CPU's cores are shared by ``workers``."""
    if device == "cuda":
        return 5e13
    # a 2-core CPU runs the small LM's forward matmuls at about 6e10 FLOP/s per thread
    return 6e10 * max(1, (os.cpu_count() or 1) // max(1, workers))


def from_flops(
    costs: Sequence[Any],
    flops_per_second: float,
    backward_factor: float = 1.5,
) -> list[tuple[float, float, float]]:
    """``(F, B, W)`` per layer from ``cost.profile``'s FLOPs at ``flops_per_second``.

    A backward FLOP takes ``backward_factor`` times a forward one (on the CPU its kernels run
    slower than the forward's matmuls; measured in ``BENCHMARKS.md``). The backward of a layer
    with parameters is split evenly between B and W (a matmul's input and weight gradients
    cost the same); a layer without parameters has no W. ``B + W`` is the whole backward; what
    a split into two actions costs beyond it is the planner's ``split_extra``.
    """
    out = []
    for c in costs:
        f = c.flops / flops_per_second
        bwd = c.backward_flops * backward_factor / flops_per_second
        w = bwd / 2 if c.param_bytes else 0.0
        out.append((f, bwd - w, w))
    return out


def rows_like(sample: Any, rows: int, device: torch.device | None = None) -> Any:
    """``sample`` with ``rows`` rows along dim 0, repeating its rows cyclically (real data, so
    token ids stay valid), each tensor moved to ``device`` when given."""

    def take(t: Any) -> Any:
        if not isinstance(t, torch.Tensor) or t.dim() == 0:
            return t
        if t.device.type == "meta":
            raise ValueError(
                "measure=True times the layers on real tensors, but the sample is on the meta "
                "device; pass a real sample batch (and a model on a real device), or use "
                "measure=False for FLOP-based costs"
            )
        idx = torch.arange(rows, device=t.device) % t.shape[0]
        out = t.index_select(0, idx)
        return out.to(device) if device is not None else out

    leaves, rebuild = tree_flatten(sample)
    return tree_unflatten(rebuild, [take(v) for _, v in leaves])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _float_leaves(obj: Any) -> list[torch.Tensor]:
    return [
        v for _, v in tree_flatten(obj)[0] if isinstance(v, torch.Tensor) and v.is_floating_point()
    ]


def _detach(obj: Any, grad: bool) -> Any:
    leaves, rebuild = tree_flatten(obj)
    return tree_unflatten(
        rebuild,
        [
            v.detach().requires_grad_(grad and v.is_floating_point())
            if isinstance(v, torch.Tensor)
            else v
            for _, v in leaves
        ],
    )


def measure(
    layers: Sequence[nn.Module],
    sample_microbatch: tuple,
    *,
    repeats: int = 3,
    threads: int | None = None,
) -> list[tuple[float, float, float]]:
    """``(F, B, W)`` seconds per layer, medians of ``repeats`` timed runs after one warm-up,
    each layer run on the previous one's output on the device of its parameters.

    ``threads`` sets the intra-op threads while timing (a CPU pipe gives each worker
    ``cores // K``). Raises ``ValueError`` naming the layer when it sits on the meta device.
    """
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    grads = [(p, p.grad) for layer in layers for p in layer.parameters()]
    try:
        x: Any = sample_microbatch
        out = []
        for i, layer in enumerate(layers):
            params = [p for p in layer.parameters() if p.requires_grad]
            device = next((p.device for p in layer.parameters()), None)
            if device is not None and device.type == "meta":
                raise ValueError(
                    f"measure=True: layer {i} ({type(layer).__name__}) is on the meta device; "
                    "materialize the model first or use measure=False"
                )
            device = device or torch.device("cpu")
            args = tuple(x) if i == 0 else (x,)
            args = tuple(rows_like(a, _rows(a), device) for a in args)
            times = []
            for r in range(repeats + 1):
                inp = _detach(args, grad=i > 0)
                _sync(device)
                t0 = time.perf_counter()
                y = layer(*inp)
                _sync(device)
                t1 = time.perf_counter()
                outs = [t for t in _float_leaves(y) if t.requires_grad]
                ins = [t for t in _float_leaves(inp) if t.requires_grad]
                ones = [torch.ones_like(t) for t in outs]
                if outs and ins and params:  # B alone: the input gradient, weights pruned
                    torch.autograd.grad(outs, ins, ones, retain_graph=True, allow_unused=True)
                _sync(device)
                t2 = time.perf_counter()
                if outs and (ins or params):  # the whole backward, one walk
                    torch.autograd.backward(outs, ones, inputs=[*ins, *params])
                _sync(device)
                t3 = time.perf_counter()
                if r:
                    times.append((t1 - t0, t2 - t1, t3 - t2))
            f, b, whole = (statistics.median(t[j] for t in times) for j in range(3))
            # W is the whole backward's part beyond B: all of it without an input gradient to
            # form (the first layer), none without parameters
            if not params:
                b = whole
            elif not ins:
                b = 0.0
            out.append((f, min(b, whole), max(whole - b, 0.0)))
            x = _detach(y, grad=False)
        return out
    finally:
        for p, g in grads:
            p.grad = g
        torch.set_num_threads(saved_threads)


def _rows(t: Any) -> int:
    return t.shape[0] if isinstance(t, torch.Tensor) and t.dim() else 1
