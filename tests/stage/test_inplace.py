"""Layers that write their input in place, right after a cut: the pipeline computes what the
plain model computes, or refuses with the stage and micro-batch — never a silent change."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpipe
import reference_impl


class _Doubled(nn.Module):
    """A functional in-place write on the input (no ``inplace`` attribute to see)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul_(2)


def _model(act: type[nn.Module] | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(6, 6), act() if act else nn.ReLU(inplace=True)]
    return nn.Sequential(*layers[:-1]).double()  # 7 layers: every odd one writes in place


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(8, 6, generator=g, dtype=torch.float64),
        torch.randn(8, 6, generator=g, dtype=torch.float64),
    )


def _pipe(model: nn.Module, schedule: str, remat: str) -> gpipe.Pipe:
    v = 2 if schedule in gpipe.schedules.interleaving() else None
    four = v or schedule in ("zb-v", "dualpipe-v")
    # every stage after the first starts with the in-place layer
    balance = [1, 2, 2, 2] if four else [1, 6]
    return gpipe.Pipe(model, balance=balance, devices=["cpu", "cpu"], chunks=4,
                      schedule=schedule, virtual_stages=v, remat=remat)  # fmt: skip


@pytest.mark.parametrize("remat", ["always", "except_last", "never"])
@pytest.mark.parametrize("schedule", gpipe.schedules.available())
def test_an_in_place_relu_after_a_cut_trains_as_the_plain_model(schedule: str, remat: str):
    """Autograd refused it (the boundary input is a leaf that requires grad) in every
    schedule and mode; the stage now feeds its layers a copy."""
    x, y = _batch()
    model = _model()
    pipe = _pipe(model, schedule, remat)
    try:
        loss = pipe.step(x, y, _mse)
    finally:
        pipe.close()
    _equals_reference(loss, model, _model(), x, y)


def _equals_reference(loss, model, ref, x, y, steps: int = 1) -> None:
    """``loss`` and ``model``'s gradients equal ``steps`` reference steps of ``ref``."""
    for _ in range(steps):
        ref_loss = reference_impl.step(ref, x, y, _mse, chunks=4)
    assert torch.allclose(loss, ref_loss, atol=1e-12)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


def test_a_functional_in_place_write_is_learned_without_re_materialization():
    x, y = _batch()
    model = _model(_Doubled)
    pipe = _pipe(model, "1f1b", "never")
    try:
        for _ in range(2):  # the first step learns it, the second starts with copies
            loss = pipe.step(x, y, _mse)
    finally:
        pipe.close()
    _equals_reference(loss, model, _model(_Doubled), x, y, steps=2)


def test_a_functional_in_place_write_under_re_materialization_is_refused_by_name():
    x, y = _batch()
    pipe = _pipe(_model(_Doubled), "gpipe", "always")
    try:
        with pytest.raises(RuntimeError, match=r"stage 1: micro-batch 0's forward wrote into"):
            pipe.step(x, y, _mse)
    finally:
        pipe.close()


def test_the_users_batch_is_not_written_by_an_in_place_first_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(6, 6), nn.Linear(6, 6)).double()
    x, y = _batch()
    kept = x.clone()
    pipe = gpipe.Pipe(model, balance=[2, 1], devices=["cpu", "cpu"], chunks=2, remat="always")
    try:
        pipe.step(x, y, _mse)
    finally:
        pipe.close()
    assert torch.equal(x, kept)
