"""One global-norm clip for both pipes (gpipe.core.clip): the plain model's clip_grad_norm_."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpipe
from gpipe.core import clip


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)]).double()


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
@pytest.mark.parametrize("max_norm", [0.05, 100.0])
def test_pipe_clip_equals_the_plain_models(norm_type: float, max_norm: float) -> None:
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.zeros(8, 6, dtype=torch.float64)
    plain, model = _model(), _model()
    F.mse_loss(plain(x), y).backward()
    want = torch.nn.utils.clip_grad_norm_(plain.parameters(), max_norm, norm_type)
    with gpipe.Pipe(model, stages=2, chunks=2, schedule="1f1b") as pipe:
        pipe.step(x, y, F.mse_loss)
        got = pipe.clip_grad_norm_(max_norm, norm_type)
    assert abs(got.item() - want.item()) <= 1e-12 * max(1.0, want.item())
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max().item() <= 1e-12


def test_a_counted_subset_sets_the_norm_and_every_gradient_is_scaled() -> None:
    a, b = torch.full((3,), 3.0), torch.full((4,), 4.0)
    total = clip.clip_grad_norm_([a, b], [a], max_norm=1.0)  # b is a tied copy: not counted
    assert total.item() == pytest.approx(3.0 * 3**0.5)
    coef = 1.0 / (3.0 * 3**0.5 + 1e-6)
    assert torch.allclose(a, torch.full((3,), 3.0 * coef))
    assert torch.allclose(b, torch.full((4,), 4.0 * coef))


def test_a_non_finite_norm_is_refused_when_asked() -> None:
    g = torch.tensor([float("nan"), 1.0])
    with pytest.raises(RuntimeError, match="non-finite"):
        clip.clip_grad_norm_([g], [g], 1.0, error_if_nonfinite=True)
