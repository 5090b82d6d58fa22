"""Gradient hooks on parameters run as in the plain model, in every schedule: a split backward
forms a weight gradient by formula in ``W``, where no hook would run, so a hooked parameter's
gradient stays with autograd. Before, zero-bubble schedules skipped the hooks of the split
micro-batches — a clipping hook then silently clipped nothing."""

from __future__ import annotations

import collections

import pytest
import torch
from torch import nn

import gpipe


def _model(calls: collections.Counter) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for i in range(4):
        lin, norm = nn.Linear(6, 6), nn.LayerNorm(6)
        lin.weight.register_hook(lambda g: g.clamp(-0.01, 0.01))  # changes the gradient
        norm.weight.register_hook(lambda g: g * 0.5)  # a parameter B reduces itself
        lin.bias.register_post_accumulate_grad_hook(lambda p, i=i: calls.update([i]))
        blocks.append(nn.Sequential(lin, norm, nn.Tanh()))
    return nn.Sequential(*blocks).double()


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize("remat", ["always", "never"])
@pytest.mark.parametrize("schedule", gpipe.schedules.available())
def test_parameter_hooks_run_once_per_micro_batch_and_shape_the_gradient(schedule, remat):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 6, generator=g, dtype=torch.float64)
    ref_calls: collections.Counter = collections.Counter()
    ref = _model(ref_calls)
    for xs, ys in zip(x.chunk(4), y.chunk(4)):
        (_mse(ref(xs), ys) / 4).backward()
    calls: collections.Counter = collections.Counter()
    model = _model(calls)
    v = 2 if schedule in gpipe.schedules.interleaving() else None
    four = v or schedule in ("zb-v", "dualpipe-v")
    pipe = gpipe.Pipe(model, balance=[1] * 4 if four else [2, 2], devices=["cpu", "cpu"],
                      chunks=4, schedule=schedule, virtual_stages=v, remat=remat)  # fmt: skip
    try:
        pipe.step(x, y, _mse)
        fallback = [st.fallback_parameters() for st in pipe._stages]
    finally:
        pipe.close()
    assert calls == ref_calls == collections.Counter({i: 4 for i in range(4)})
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)
    # the profile counts them: the hooked parameters are the graph's, not W's formula's
    assert all(any(name.endswith(".0.weight") for name in f) for f in fallback)
