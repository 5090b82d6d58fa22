"""Layers that checkpoint themselves (``torch.utils.checkpoint``, non-reentrant): their
recompute runs inside the stage's backward, outside the forward's keyed random stream. Without
random ops the pipeline gives the plain model's gradients; a dropout in the recomputed body
would draw a mask the forward never drew, so it is refused with the stage and micro-batch
(it gave wrong gradients, silently, in every schedule)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import gpipe


class _Checkpointed(nn.Module):
    def __init__(self, dropout: str = "", p: float = 0.3) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 6)
        self.drop, self.dropout, self.p = nn.Dropout(p), dropout, p

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        if self.dropout == "module":
            h = self.drop(h)
        elif self.dropout == "functional":
            h = F.dropout(h, self.p, self.training)
        return torch.tanh(self.b(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.body, x, use_reentrant=False)


def _model(dropout: str = "", p: float = 0.3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[_Checkpointed(dropout, p) for _ in range(4)]).double()


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


@pytest.mark.parametrize("remat", ["always", "never"])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "zb-v"])
@pytest.mark.parametrize("dropout", ["module", "functional"])
def test_a_dropout_recomputed_by_a_layers_own_checkpoint_is_refused(dropout, schedule, remat):
    what = "Dropout" if dropout == "module" else r"aten\.bernoulli_"
    pattern = rf"stage \d, micro-batch \d: {what} drew random numbers during the backward"
    with pytest.raises(RuntimeError, match=pattern) as info:
        _run(_model(dropout), schedule, remat)
    assert "use the pipe's re-materialization" in str(info.value)


def test_a_dropout_that_draws_nothing_is_no_reason_to_refuse():
    model = _model("module", p=0.0)
    assert torch.isfinite(_run(model, "1f1b", "never"))
    assert all(p.grad is not None for p in model.parameters())
