"""Hooks under split schedules: a split backward forms a weight gradient by formula in ``W``
from the input and output a module call's own hooks saw, where no gradient hook would run.
So a parameter with a gradient hook, and a module with forward hooks of its own, keep their
gradients with autograd. Before, zero-bubble schedules skipped the gradient hooks of split
micro-batches (a clipping hook clipped nothing) and formed a hooked module's weight gradient
from the wrong output (a hook scaling it was ignored)."""

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


def _plain_blocks(scale_output: bool) -> nn.Sequential:
    torch.manual_seed(0)
    blocks = []
    for _ in range(4):
        lin = nn.Linear(6, 6)
        if scale_output:
            lin.register_forward_hook(lambda m, a, out: out * 2)
        blocks.append(nn.Sequential(lin, nn.Tanh()))
    return nn.Sequential(*blocks).double()


def _scale_input(module: nn.Module, args: tuple) -> tuple:
    return (args[0] * 3,)


SPLIT = ["zb-h1", "zb-h2", "zb-v", "interleaved-zb", "dualpipe-v"]


@pytest.mark.parametrize("remat", ["always", "never"])
@pytest.mark.parametrize("schedule", SPLIT)
@pytest.mark.parametrize("hook", ["forward hook, from the start", "pre-hook, after a step"])
def test_a_module_whose_own_hooks_change_its_call_gets_the_plain_gradient(hook, schedule, remat):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 6, generator=g, dtype=torch.float64)
    late = hook.startswith("pre-hook")
    model = _plain_blocks(scale_output=not late)
    v = 2 if schedule in gpipe.schedules.interleaving() else None
    four = v or schedule in ("zb-v", "dualpipe-v")
    pipe = gpipe.Pipe(model, balance=[1] * 4 if four else [2, 2], devices=["cpu", "cpu"],
                      chunks=4, schedule=schedule, virtual_stages=v, remat=remat)  # fmt: skip
    try:
        pipe.step(x, y, _mse)  # the split's own hooks go on at this first step
        if late:  # so this one runs after them
            for block in model:
                block[0].register_forward_pre_hook(_scale_input)
        for p in model.parameters():
            p.grad = None
        pipe.step(x, y, _mse)
    finally:
        pipe.close()
    ref = _plain_blocks(scale_output=not late)
    if late:
        for block in ref:
            block[0].register_forward_pre_hook(_scale_input)
    for xs, ys in zip(x.chunk(4), y.chunk(4)):
        (_mse(ref(xs), ys) / 4).backward()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)
