"""Layers that checkpoint themselves (``torch.utils.checkpoint``, non-reentrant, as
``gradient_checkpointing_enable()`` does): their recompute runs inside the stage's backward,
outside the forward's keyed random stream. It used to draw other dropout masks than the
forward, and the gradients were silently those of another function, in every schedule. Now a
random module's recompute draws again what its forward drew (the generator state recorded
before each call), so the gradients are those of the same model without its checkpoints; a
functional random op in a recomputed body cannot be matched to its forward call and is
refused with the stage and micro-batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gpipe
import reference_impl


class _Checkpointed(nn.Module):
    def __init__(self, dropout: str = "", p: float = 0.3, own_checkpoint: bool = True) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.drop, self.dropout, self.p = nn.Dropout(p), dropout, p
        self.own_checkpoint = own_checkpoint

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.dropout == "module":
            h = self.drop(h)
            h = self.drop(h)  # a module called twice: its two calls replayed in order
        elif self.dropout == "functional":
            h = F.dropout(h, self.p, self.training)
        return torch.tanh(self.b(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.own_checkpoint:
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=False)


def _model(dropout: str = "", p: float = 0.3, own_checkpoint: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[_Checkpointed(dropout, p, own_checkpoint) for _ in range(4)]).double()


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _run(model: nn.Module, schedule: str, remat: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 6, generator=g, dtype=torch.float64)
    v = 2 if schedule in gpipe.schedules.interleaving() else None
    four = v or schedule in ("zb-v", "dualpipe-v")
    pipe = gpipe.Pipe(model, balance=[1] * 4 if four else [2, 2], devices=["cpu", "cpu"],
                      chunks=4, schedule=schedule, virtual_stages=v, remat=remat)  # fmt: skip
    try:
        return pipe.step(x, y, _mse)
    finally:
        pipe.close()


@pytest.mark.parametrize("remat", ["always", "never"])
@pytest.mark.parametrize("schedule", gpipe.schedules.available())
def test_checkpointed_layers_without_random_ops_give_the_plain_gradients(schedule, remat):
    model = _model()
    _run(model, schedule, remat)
    ref = _model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 6, generator=g, dtype=torch.float64)
    for xs, ys in zip(x.chunk(4), y.chunk(4)):
        (_mse(ref(xs), ys) / 4).backward()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


@pytest.mark.parametrize("remat", ["always", "except_last", "never"])
@pytest.mark.parametrize("schedule", gpipe.schedules.available())
def test_a_dropout_recomputed_by_a_layers_own_checkpoint_draws_the_forwards_masks(schedule, remat):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 6, generator=g, dtype=torch.float64)
    model = _model("module")
    v = 2 if schedule in gpipe.schedules.interleaving() else None
    four = v or schedule in ("zb-v", "dualpipe-v")
    pipe = gpipe.Pipe(model, balance=[1] * 4 if four else [2, 2], devices=["cpu", "cpu"],
                      chunks=4, schedule=schedule, virtual_stages=v, remat=remat)  # fmt: skip
    try:
        for _ in range(2):  # the first step runs each layer under the full mode, then not
            for p in model.parameters():
                p.grad = None
            loss = pipe.step(x, y, _mse)
    finally:
        pipe.close()
    twin = _model("module", own_checkpoint=False)  # the same masks, nothing recomputed
    twin_loss = reference_impl.step(twin, x, y, _mse, chunks=4, step=1)
    assert torch.allclose(loss, twin_loss, atol=1e-12)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


@pytest.mark.parametrize("remat", ["always", "never"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "zb-v"])
def test_a_functional_dropout_recomputed_by_a_layers_own_checkpoint_is_refused(schedule, remat):
    pattern = r"stage \d, micro-batch \d: aten\.bernoulli_ drew random numbers during"
    with pytest.raises(RuntimeError, match=pattern) as info:
        _run(_model("functional"), schedule, remat)
    assert "use the pipe's re-materialization" in str(info.value)


def test_a_dropout_that_draws_nothing_is_no_reason_to_refuse():
    model = _model("module", p=0.0)
    assert torch.isfinite(_run(model, "1f1b", "never"))
    assert all(p.grad is not None for p in model.parameters())


def test_the_public_reference_recomputes_a_checkpointed_dropout_with_the_forwards_masks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 6, generator=g, dtype=torch.float64)
    model, twin = _model("module"), _model("module", own_checkpoint=False)
    loss = gpipe.reference_step(model, x, y, _mse, chunks=4, seed=3, step=2)
    twin_loss = reference_impl.step(twin, x, y, _mse, chunks=4, seed=3, step=2)
    assert torch.allclose(loss, twin_loss, atol=1e-12)
    for a, b in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


def _distributed_scenario(rank: int, tmp) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    y = torch.randn(8, 6, generator=g, dtype=torch.float64)
    for schedule in ("zb-h1", "zb-v"):
        model = _model("module")
        balance = [1] * 4 if schedule == "zb-v" else [2, 2]
        with gpipe.DistributedPipe(model, balance=balance, chunks=4, schedule=schedule,
                                   remat="always", timeout=60) as pipe:  # fmt: skip
            pipe.step(x, y, _mse)
            mine = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        twin = _model("module", own_checkpoint=False)
        reference_impl.step(twin, x, y, _mse, chunks=4)
        assert len(mine) == 8  # this rank's half of the model
        for name, p in twin.named_parameters():
            if name in mine:
                assert torch.allclose(mine[name], p.grad, atol=1e-10), (schedule, name)


@pytest.mark.slow  # spawns a gloo process group
def test_a_checkpointed_dropout_is_recomputed_exactly_by_the_distributed_runtime(tmp_path):
    from spawn_ranks import run_gloo

    run_gloo(_distributed_scenario, tmp_path)
