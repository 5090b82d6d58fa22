"""A parameter used by stages on two workers (a module that appears twice, tied weights, a
weight read directly by another layer): every schedule, K ∈ {2, 3}, M ∈ {K, 2K} and every
re-materialization mode, with dropout, gives the independent reference's gradients (float64,
≤ 1e-10), and the same bits on every step (float32) — the threads' timing never shows.
"""

from __future__ import annotations

import functools
import itertools
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpipe
import reference_impl
from gpipe import schedules
from gpipe.planner.balance import balance as balance_costs
from gpipe.schedules import ScheduleSpec
from gpipe.stage.shared_params import Overlaid

D = 8
BATCH = 24


class Use(nn.Module):
    """Calls a module it does not own (the same object may sit in several layers)."""

    def __init__(self, inner: nn.Module, p: float) -> None:
        super().__init__()
        self.inner = inner
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.tanh(self.inner(x)))


class ReadsWeight(nn.Module):
    """Reads another layer's weight directly, outside that layer's own call."""

    def __init__(self, source: nn.Linear) -> None:
        super().__init__()
        self.source = source

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(x, self.source.weight.t()))


def make(dtype: torch.dtype, p: float = 0.2) -> nn.Sequential:
    """Ten layers: ``shared`` at 0, 4 and 9; ``head.weight`` is ``first.weight`` (tied); layer
    7 reads ``first.weight`` directly."""
    torch.manual_seed(0)
    shared = nn.Linear(D, D)
    first = nn.Linear(D, D)
    head = nn.Linear(D, D)
    head.weight = first.weight
    layers: list[nn.Module] = [Use(shared, p), Use(first, p)]
    layers += [Use(nn.Linear(D, D), p) for _ in range(2)]
    layers += [Use(shared, p), Use(nn.Linear(D, D), p), Use(nn.Linear(D, D), p)]
    layers += [ReadsWeight(first), Use(head, p), Use(shared, 0.0)]
    return nn.Sequential(*layers).to(dtype)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def data(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return (
        torch.randn(BATCH, D, generator=g, dtype=dtype),
        torch.randn(BATCH, D, generator=g, dtype=dtype),
    )


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def pipe_of(model: nn.Module, schedule: str, k: int, m: int, remat: str) -> gpipe.Pipe:
    v = ScheduleSpec(schedule).virtual_stages
    return gpipe.Pipe(
        model,
        balance=balance_costs([1.0] * len(model), k * v),
        devices=["cpu"] * k,
        chunks=m,
        schedule=schedule,
        remat=remat,
        seed=5,
    )


_REF: dict[int, tuple[float, list[torch.Tensor]]] = {}


def reference(m: int) -> tuple[float, list[torch.Tensor]]:
    if m not in _REF:
        model = make(torch.float64)
        x, y = data(torch.float64)
        loss = reference_impl.step(model, x, y, loss_fn, chunks=m, seed=5)
        _REF[m] = (loss.item(), grads(model))
    return _REF[m]


CASES = list(
    itertools.product(schedules.available(), [2, 3], [1, 2], ["always", "except_last", "never"])
)


@pytest.mark.parametrize(("schedule", "k", "mult", "remat"), CASES)
def test_shared_parameters_get_the_reference_gradients(
    schedule: str, k: int, mult: int, remat: str
) -> None:
    m = k * mult
    model = make(torch.float64)
    pipe = pipe_of(model, schedule, k, m, remat)
    x, y = data(torch.float64)
    loss = pipe.step(x, y, loss_fn)
    ref_loss, ref_grads = reference(m)
    assert abs(loss.item() - ref_loss) <= 1e-12
    got = grads(model)
    assert len(got) == len(ref_grads)
    assert max((a - b).abs().max().item() for a, b in zip(got, ref_grads)) <= 1e-10
    pipe.close()


class Stall:
    """Slows one worker: a pause before each call of a layer placed on it. The worker it
    slows changes from step to step, so the workers reach the shared parameters (and stages
    begin their first split forward) in another order on each step."""

    def __init__(self, model: nn.Sequential, schedule: str, k: int) -> None:
        spec = ScheduleSpec(schedule)
        counts = balance_costs([1.0] * len(model), k * spec.virtual_stages)
        stage_of = [s for s, n in enumerate(counts) for _ in range(n)]
        self.worker_of = [spec.placement(k)[s] for s in stage_of]
        self.slow: int | None = None
        self.handles = [
            layer.register_forward_pre_hook(functools.partial(self._pause, i))
            for i, layer in enumerate(model)
        ]

    def _pause(self, layer: int, module: nn.Module, args: tuple) -> None:
        if self.worker_of[layer] == self.slow:
            time.sleep(0.002)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("schedule", schedules.available())
def test_shared_gradients_are_the_same_bits_on_every_step(schedule: str) -> None:
    """Steps of the same batch from zeroed gradients, the first included, each with another
    worker slowed: one gradient, bit for bit. The first step is the one a lazily built state
    (hooks installed at a stage's first split forward) would make different."""
    model = make(torch.float32, p=0.0)
    pipe = pipe_of(model, schedule, 2, 4, "never")
    stall = Stall(model, schedule, 2)
    x, y = data(torch.float32)
    seen: list[list[torch.Tensor]] = []
    for slow in (0, 1, None):
        stall.slow = slow
        pipe.zero_grad()
        pipe.step(x, y, loss_fn)
        seen.append(grads(model))
    stall.remove()
    pipe.close()
    names = [n for n, _ in model.named_parameters()]
    for step, later in enumerate(seen[1:], 2):
        differ = [n for n, a, b in zip(names, seen[0], later, strict=True) if not torch.equal(a, b)]
        assert not differ, f"{schedule}: step {step}'s gradients of {differ} differ from step 1's"


def test_autograd_bridge_path_adds_the_borrowed_gradients() -> None:
    """``loss_fn(pipe(x), y).backward()`` adds what each stage's alias gathered, once."""
    model = make(torch.float64)
    pipe = pipe_of(model, "gpipe", 3, 6, "except_last")
    x, y = data(torch.float64)
    loss_fn(pipe(x), y).backward()
    _, ref = reference(6)
    assert max((a - b).abs().max().item() for a, b in zip(grads(model), ref)) <= 1e-10
    # an input-gradients-only backward touches no .grad, borrowed or owned
    before = grads(model)
    xi = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad(loss_fn(pipe(xi), y), [xi])
    assert gx.shape == x.shape
    assert all(torch.equal(a, b) for a, b in zip(before, grads(model)))
    pipe.close()


def test_tables_are_overlaid_only_while_the_pipe_lives() -> None:
    model = make(torch.float32)
    shared = model[0].inner
    pipe = pipe_of(model, "1f1b", 2, 2, "never")
    assert isinstance(shared._parameters, Overlaid)  # used by both workers
    assert not isinstance(model[2].inner._parameters, Overlaid)  # one stage only
    names = {n for n, _ in model.named_parameters()}
    assert names == {n for n, _ in make(torch.float32).named_parameters()}
    pipe.close()
    assert type(shared._parameters) is dict


class RootWeight(nn.Module):
    """A parameter of the model itself, read by the first and the last captured layer."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(D, D) / 3)
        self.blocks = nn.ModuleList([nn.Linear(D, D) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x @ self.w
        for b in self.blocks:
            x = torch.tanh(b(x))
        return x @ self.w.t()


@pytest.mark.parametrize("schedule", schedules.available())
def test_a_captured_models_own_parameter_read_by_two_workers(schedule: str) -> None:
    """The captured segments' generated code reads the segment's own parameter table: the
    borrowing stage must see its alias there too (else a split schedule loses its part)."""
    x, y = data(torch.float64)
    plain = RootWeight().double()
    loss_fn(plain(x), y).backward()
    model = RootWeight().double()
    v = ScheduleSpec(schedule).virtual_stages
    pipe = gpipe.Pipe(model, sample=(x[:6],), stages=2, chunks=4, schedule=schedule,
                      virtual_stages=v if schedule in schedules.interleaving() else None,
                      devices=["cpu", "cpu"])  # fmt: skip
    pipe.step(x, y, loss_fn)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        assert (a.grad - b.grad).abs().max().item() <= 1e-12
    pipe.close()
    assert all(type(m._parameters) is dict for m in pipe.modules())
