"""Faults in the one-process runtime: a raising stage in forward or backward at any stage and
micro-batch, a stalled stage, and a long soak — always an error naming the place, never a hang,
and a pipe that works again afterwards."""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from torch import nn

import gpipe
from gpipe.remat import is_recomputing

D = 4


class Fault(nn.Module):
    """A linear layer that fails when told to, on the micro-batch whose first value is ``tag``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D).double()
        self.mode: str | None = None  # "forward", "backward" or "stall"
        self.tag = -1.0
        self.stall = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hit = self.mode is not None and bool((x[:, 0] == self.tag).all())
        if hit and self.mode == "forward":
            raise ValueError("injected forward fault")
        if hit and self.mode == "stall" and not is_recomputing():
            time.sleep(self.stall)
        out = torch.cat([x[:, :1], self.fc(x)[:, 1:]], dim=1)  # column 0 carries the tag
        if hit and self.mode == "backward":
            out = _FailBackward.apply(out)
        return out


class _FailBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: object, g: torch.Tensor) -> torch.Tensor:
        raise ValueError("injected backward fault")


def _model(k: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(k):
        layers += [nn.Identity(), Fault()]
    return nn.Sequential(*layers)


def _batch(m: int) -> torch.Tensor:
    x = torch.randn(2 * m, D, dtype=torch.float64)
    x[:, 0] = torch.arange(m, dtype=torch.float64).repeat_interleave(2)  # rows of mb t hold t
    return x


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("k", [2, 3])
def test_fault_at_every_stage_is_named_and_pipe_recovers(schedule: str, where: str, k: int) -> None:
    m = 4
    model = _model(k)
    pipe = gpipe.Pipe(model, balance=[2] * k, chunks=m, schedule=schedule, timeout=20)
    x = _batch(m)
    for s in range(k):
        for mb in (0, m - 1):
            fault = model[2 * s + 1]
            fault.mode, fault.tag = where, float(mb)
            t0 = time.monotonic()
            with pytest.raises(gpipe.StageError) as info:
                pipe.step(x, None, _loss)
            assert time.monotonic() - t0 < 20
            err = info.value
            assert (err.stage, err.microbatch) == (s, mb), str(err)
            # the first stage has no input gradient to compute, so under a split backward
            # its whole backward runs in the weight-gradient action
            words = ("backward", "weight-gradient") if where == "backward" else ("forward",)
            assert any(f"{w} of micro-batch {mb}" in str(err) for w in words), str(err)
            fault.mode = None
            model.zero_grad()
            pipe.step(x, None, _loss)  # usable again
            assert all(p.grad is not None for p in model.parameters())
    pipe.close()


def test_stalled_stage_fails_within_twice_the_timeout_and_pipe_recovers() -> None:
    model = _model(2)
    timeout = 2.0
    pipe = gpipe.Pipe(model, balance=[2, 2], chunks=2, timeout=timeout)
    x = _batch(2)
    pipe.step(x, None, _loss)  # a clean step first
    fault = model[1]
    fault.mode, fault.tag, fault.stall = "stall", 1.0, 3 * timeout
    t0 = time.monotonic()
    with pytest.raises(
        gpipe.StageError, match=r"stage 1 .*waited 2s for the activation of micro-batch 1"
    ) as info:
        pipe.step(x, None, _loss)
    elapsed = time.monotonic() - t0
    assert elapsed < 2 * timeout + 1.0, elapsed  # 2x the timeout, plus scheduling slack
    assert isinstance(info.value.__cause__, TimeoutError)
    fault.mode = None
    model.zero_grad()
    pipe.step(x, None, _loss)  # a fresh set of workers runs the next step
    assert all(p.grad is not None for p in model.parameters())
    time.sleep(2 * timeout)  # the abandoned worker wakes, notices the abort and exits
    pipe.close()


def test_soak_varying_shapes_no_growth_no_leaked_threads() -> None:
    """300 steps with changing sequence lengths: memory stays flat, threads end on close."""
    import resource

    before_threads = threading.active_count()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 16))
    pipe = gpipe.Pipe(model, balance=[2, 2], chunks=4, schedule="1f1b")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rss = []
    for step in range(300):
        seq = 8 + (step * 7) % 24
        x = torch.randn(8, seq, 16)
        loss = pipe.step(x, None, lambda out, _: out.pow(2).mean())
        assert torch.isfinite(loss)
        opt.step()
        opt.zero_grad()
        if step % 50 == 49:
            gc.collect()
            with open("/proc/self/statm") as f:
                rss.append(int(f.read().split()[1]) * resource.getpagesize())
    growth = (rss[-1] - rss[1]) / 2**20
    assert growth < 20, f"RSS grew {growth:.1f} MiB over 200 steps: {rss}"
    assert threading.active_count() == before_threads + 2
    pipe.close()
    del pipe
    gc.collect()
    assert threading.active_count() == before_threads


def test_non_finite_loss_guard_names_the_micro_batch() -> None:
    model = _model(2)
    x = _batch(4)
    x[5, 1] = float("nan")  # a row of micro-batch 2
    pipe = gpipe.Pipe(model, balance=[2, 2], chunks=4, check_finite=True)
    with pytest.raises(gpipe.StageError, match="loss of micro-batch 2 is nan") as info:
        pipe.step(x, None, _loss)
    assert isinstance(info.value.__cause__, FloatingPointError)
    assert all(p.grad is None for p in model.parameters())  # no backward ran for it
    pipe.close()
    unguarded = gpipe.Pipe(_model(2), balance=[2, 2], chunks=4)
    assert torch.isnan(unguarded.step(x, None, _loss))  # off by default
    unguarded.close()


def test_missing_targets_are_named() -> None:
    pipe = gpipe.Pipe(_model(2), balance=[2, 2], chunks=2)
    with pytest.raises(gpipe.StageError, match=r"targets=None .*pass the targets to step"):
        pipe.step(_batch(2), None, torch.nn.functional.mse_loss)
    pipe.close()
