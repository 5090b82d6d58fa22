"""DeferredBatchNorm: running statistics of one pipelined step equal plain BatchNorm's on the
whole mini-batch, untouched by re-materialization."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gpipe
from gpipe.nn import DeferredBatchNorm, convert_deferred_batch_norm


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 5),
        nn.Tanh(),
        nn.Linear(5, 5),
        nn.BatchNorm1d(5),
    ).double()


@pytest.mark.parametrize("remat", ["always", "except_last", "never"])
@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_running_stats_equal_plain_batchnorm_on_whole_batch(remat: str, chunks: int) -> None:
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    plain = _model()
    for _ in range(2):
        plain(x).sum().backward()
    model = convert_deferred_batch_norm(_model(), chunks)
    assert isinstance(model[1], DeferredBatchNorm) and isinstance(model[7], DeferredBatchNorm)
    pipe = gpipe.Pipe(model, balance=[3, 5], chunks=chunks, remat=remat)
    for _ in range(2):
        pipe(x).sum().backward()
    # Only the first BatchNorm's input is independent of how the batch was cut: a later one
    # sees activations normalized with micro-batch statistics (as in any pipeline).
    for i in (1,):
        assert torch.allclose(model[i].running_mean, plain[i].running_mean, atol=1e-12)
        assert torch.allclose(model[i].running_var, plain[i].running_var, atol=1e-12)
        assert model[i].num_batches_tracked.item() == 2
    assert model[7].num_batches_tracked.item() == 2 and model[7].tracked == 0
    pipe.close()


def test_pipe_converts_on_request() -> None:
    pipe = gpipe.Pipe(_model(), balance=[3, 5], chunks=4, deferred_batch_norm=True)
    assert isinstance(pipe[1], DeferredBatchNorm) and pipe[1].chunks == 4
    pipe.close()


def test_eval_uses_running_stats_and_conversion_keeps_state() -> None:
    bn = nn.BatchNorm1d(3)
    bn.running_mean.fill_(2.0)
    bn.weight.data.fill_(3.0)
    d = convert_deferred_batch_norm(nn.Sequential(bn), 2)[0]
    assert isinstance(d, DeferredBatchNorm) and d.running_mean[0] == 2.0 and d.weight[0] == 3.0
    d.eval()
    x = torch.randn(4, 3)
    assert torch.allclose(d(x), bn.eval()(x))


def test_single_microbatch_normalizes_like_batchnorm() -> None:
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3)
    d = convert_deferred_batch_norm(nn.Sequential(bn), 1)[0]
    bn2 = nn.BatchNorm1d(3)
    x = torch.randn(6, 3)
    assert torch.allclose(d(x), bn2(x), atol=1e-6)
    assert torch.allclose(d.running_var, bn2.running_var, atol=1e-6)
