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


def _plain_bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(6, 6), nn.BatchNorm1d(6)]
    return nn.Sequential(*layers).double()


def _mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


@pytest.mark.parametrize(  # by default each schedule with one remat mode, every mode in turn
    ("schedule", "remat"),
    [
        pytest.param(s, r, marks=() if (i - j) % 3 == 0 else pytest.mark.slow)
        for i, s in enumerate(gpipe.schedules.available())
        for j, r in enumerate(["always", "except_last", "never"])
    ],
)
def test_plain_batchnorm_statistics_take_each_micro_batch_once(remat: str, schedule: str) -> None:
    """A plain BatchNorm updates its statistics per micro-batch, as in gradient accumulation;
    a re-materialized micro-batch's second forward must not update them again (it did: with
    the default ``except_last``, M micro-batches counted 2M-1 times, and the statistics
    depended on the schedule)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64)
    y = torch.randn(16, 6, generator=g, dtype=torch.float64)
    m = 4
    ref = _plain_bn_model()
    for xs, ys in zip(x.chunk(m), y.chunk(m)):
        (_mse(ref(xs), ys) / m).backward()
    model = _plain_bn_model()
    v = 2 if schedule in gpipe.schedules.interleaving() else None
    stages = 2 * (v or (2 if schedule in ("zb-v", "dualpipe-v") else 1))
    pipe = gpipe.Pipe(model, balance=[8 // stages] * stages, devices=["cpu", "cpu"], chunks=m,
                      schedule=schedule, virtual_stages=v, remat=remat)  # fmt: skip
    try:
        pipe.step(x, y, _mse)
    finally:
        pipe.close()
    for i in range(1, 8, 2):
        assert model[i].num_batches_tracked.item() == m, i
        assert torch.allclose(model[i].running_mean, ref[i].running_mean, atol=1e-12), i
        assert torch.allclose(model[i].running_var, ref[i].running_var, atol=1e-12), i
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


def test_plain_batchnorm_through_pipe_call_and_backward_is_counted_once() -> None:
    x = torch.randn(16, 6, dtype=torch.float64)
    ref = _plain_bn_model()
    for xs in x.chunk(4):
        ref(xs).sum().backward()
    model = _plain_bn_model()
    pipe = gpipe.Pipe(model, balance=[4, 4], devices=["cpu", "cpu"], chunks=4, remat="always")
    try:
        pipe(x).sum().backward()
    finally:
        pipe.close()
    assert model[1].num_batches_tracked.item() == 4
    assert torch.allclose(model[7].running_var, ref[7].running_var, atol=1e-12)


def _mlp_bn() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(),
        nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3),
    ).double()  # fmt: skip


def _bn_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 6, generator=g, dtype=torch.float64) * 3 + 1
    return x, torch.randint(0, 3, (16,), generator=g)


def _distributed_deferred(rank: int, path) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F

    x, y = _bn_batch()
    dp = dist.get_world_size() // 2
    with gpipe.DistributedPipe(
        _mlp_bn(), chunks=2, balance=[3, 4], data_parallel=dp, deferred_batch_norm=True
    ) as pipe:
        for _ in range(2):
            pipe.step(x, y, F.cross_entropy)
        state = {k: v.clone() for k, v in pipe.state_dict().items() if "running" in k}
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters()}
        try:  # a step that fails in the last stage's loss (targets of the wrong shape)
            pipe.step(x, y[:, None], F.cross_entropy)
            failed = False
        except Exception:
            failed = True
        bns = [m for m in pipe.modules() if isinstance(m, DeferredBatchNorm)]
        after = {k: v.clone() for k, v in pipe.state_dict().items() if "running" in k}
        left = (failed, [(bn.counter, bn.tracked, bn.defer) for bn in bns], after)
    torch.save((state, grads, left), path / f"bn{rank}.pt")


@pytest.mark.slow  # spawns gloo process groups
@pytest.mark.timeout(200)
@pytest.mark.parametrize("world", [2, 4])
def test_distributed_deferred_statistics_cover_the_global_batch(world: int, tmp_path) -> None:
    """``DistributedPipe(deferred_batch_norm=True)`` with D = world / 2 replicas: every
    replica's running statistics (and the gradients) equal the one-process pipe's with
    ``chunks = D·M`` — the replicas' sums are added before the one commit of each step."""
    import torch.nn.functional as F

    from spawn_ranks import run_gloo

    run_gloo(_distributed_deferred, tmp_path, world=world, limit=150)
    x, y = _bn_batch()
    model = _mlp_bn()
    with gpipe.Pipe(model, balance=[3, 4], chunks=world, deferred_batch_norm=True) as pipe:
        for _ in range(2):
            pipe.step(x, y, F.cross_entropy)
    want = model.state_dict()
    want_grads = dict(model.named_parameters())
    for rank in range(world):
        state, grads, (failed, left, after) = torch.load(tmp_path / f"bn{rank}.pt")
        assert state and grads
        # the failed step added nothing and left every layer committing as before
        assert failed and left and all(t == (0, 0, False) for t in left), (rank, left)
        assert all(torch.equal(after[k], state[k]) for k in state), rank
        for k, v in state.items():
            assert torch.allclose(v, want[k], atol=1e-12), (world, rank, k)
        for n, g in grads.items():
            assert torch.allclose(g, want_grads[n].grad, atol=1e-10), (world, rank, n)
