"""Faults in the one-process runtime: a raising stage in forward or backward at any stage and
micro-batch, a stalled stage, and a long soak — always an error naming the place, never a hang,
and a pipe that works again afterwards.

"Works again" is checked by value: the step after a failure runs on a *different* batch, and its
loss and every parameter's gradient equal the independent reference (tests/reference_impl.py)
on that batch, random streams included. The keyed step counter counts training calls, failed
ones too, so the recovery step after ``n`` earlier calls draws as step ``n``.
"""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch
from torch import nn

import gpipe
import reference_impl
from gpipe.stage.remat import is_recomputing

D = 4
P = 0.25  # dropout on the non-tag columns: the recovery step's random streams are checked too
TOL = 1e-10


class Fault(nn.Module):
    """A linear layer that fails when told to, on the micro-batch whose first value is ``tag``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D).double()
        self.drop = nn.Dropout(P)
        self.mode: str | None = None  # "forward", "backward" or "stall"
        self.tag = -1.0
        self.stall = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hit = self.mode is not None and bool((x[:, 0] == self.tag).all())
        if hit and self.mode == "forward":
            raise ValueError("injected forward fault")
        if hit and self.mode == "stall" and not is_recomputing():
            time.sleep(self.stall)
        out = torch.cat([x[:, :1], self.drop(self.fc(x))[:, 1:]], dim=1)  # column 0: the tag
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


def _batch(m: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * m, D, dtype=torch.float64, generator=g)
    x[:, 0] = torch.arange(m, dtype=torch.float64).repeat_interleave(2)  # rows of mb t hold t
    return x


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()


def _grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]  # a missing grad fails here


def _check_step(model: nn.Module, loss: torch.Tensor, x: torch.Tensor, m: int, step: int) -> None:
    """``loss`` and ``model``'s gradients are those of the reference step ``step`` on ``x``."""
    ref = _model(len(model) // 2)
    ref_loss = reference_impl.step(ref, x, None, _loss, chunks=m, step=step)
    assert abs(loss.item() - ref_loss.item()) <= TOL, (loss.item(), ref_loss.item())
    got, want = _grads(model), _grads(ref)
    assert len(got) == len(want) == 2 * (len(model) // 2)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        assert (a - b).abs().max().item() <= TOL, name


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
@pytest.mark.parametrize("where", ["forward", "backward"])
@pytest.mark.parametrize("k", [2, 3])
def test_fault_at_every_stage_is_named_and_pipe_recovers(schedule: str, where: str, k: int) -> None:
    m = 4
    model = _model(k)
    pipe = gpipe.Pipe(model, balance=[2] * k, chunks=m, schedule=schedule, timeout=20)
    x = _batch(m)
    calls = 0
    for s in range(k):
        for mb in (0, m - 1):
            fault = model[2 * s + 1]
            fault.mode, fault.tag = where, float(mb)
            t0 = time.monotonic()
            with pytest.raises(gpipe.StageError) as info:
                pipe.step(x, None, _loss)
            calls += 1
            assert time.monotonic() - t0 < 20
            err = info.value
            assert (err.stage, err.microbatch) == (s, mb), str(err)
            # the first stage has no input gradient to compute, so under a split backward
            # its whole backward runs in the weight-gradient action
            words = ("backward", "weight-gradient") if where == "backward" else ("forward",)
            assert any(f"{w} of micro-batch {mb}" in str(err) for w in words), str(err)
            fault.mode = None
            model.zero_grad()
            fresh = _batch(m, seed=100 + calls)  # a new batch: nothing stale can pass for it
            loss = pipe.step(fresh, None, _loss)  # usable again, and right
            _check_step(model, loss, fresh, m, step=calls)
            calls += 1
    pipe.close()


@pytest.mark.slow  # timed: waits out the stage timeout twice
def test_stalled_stage_fails_within_twice_the_timeout_and_pipe_recovers() -> None:
    model = _model(2)
    timeout = 2.0
    pipe = gpipe.Pipe(model, balance=[2, 2], chunks=2, timeout=timeout)
    x = _batch(2)
    _check_step(model, pipe.step(x, None, _loss), x, 2, step=0)  # a clean step first
    model.zero_grad()
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
    fresh = _batch(2, seed=5)
    loss = pipe.step(fresh, None, _loss)  # a fresh set of workers runs the next step
    _check_step(model, loss, fresh, 2, step=2)
    time.sleep(2 * timeout)  # the abandoned worker wakes, notices the abort and exits
    pipe.close()


@pytest.mark.slow  # 300 steps
def test_soak_varying_shapes_no_growth_no_leaked_threads() -> None:
    """300 steps with changing sequence lengths: memory stays flat, threads end on close; every
    50th step's loss and gradients equal the independent reference's (float32 tolerance)."""
    import resource

    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Dropout(0.1), nn.Linear(32, 16))

    def soak_loss(out: torch.Tensor, _: object) -> torch.Tensor:
        return out.pow(2).mean()

    gc.collect()  # end earlier tests' pipes' workers now, not in the middle of this test
    before_threads = set(threading.enumerate())
    model = build()
    pipe = gpipe.Pipe(model, balance=[2, 2], chunks=4, schedule="1f1b")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rss = []
    checked = 0
    for step in range(300):
        seq = 8 + (step * 7) % 24
        x = torch.randn(8, seq, 16)
        loss = pipe.step(x, None, soak_loss)
        if step % 50 == 25:
            ref = build()
            ref.load_state_dict(model.state_dict())
            ref_loss = reference_impl.step(ref, x, None, soak_loss, chunks=4, step=step)
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5), step
            for a, b in zip(model.parameters(), ref.parameters(), strict=True):
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
            checked += 1
        opt.step()
        opt.zero_grad()
        if step % 50 == 49:
            gc.collect()
            with open("/proc/self/statm") as f:
                rss.append(int(f.read().split()[1]) * resource.getpagesize())
    assert checked == 6
    growth = (rss[-1] - rss[1]) / 2**20
    assert growth < 20, f"RSS grew {growth:.1f} MiB over 200 steps: {rss}"
    workers = [t for t in threading.enumerate() if t not in before_threads]
    assert sorted(t.name for t in workers) == ["gpipe-device-0", "gpipe-device-1"]
    assert all(t.is_alive() for t in workers)
    pipe.close()
    del pipe
    gc.collect()
    for t in workers:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in workers)


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
