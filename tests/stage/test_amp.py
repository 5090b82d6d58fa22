"""Autocast only where the forward runs: a pipelined step under ``torch.autocast`` computes what
the plain loop computes — forward and loss inside the region, ``loss.backward()`` outside it.

The model keeps some layers in float32 inside the bf16 region (autocast disabled around
them, the input cast to float), as users do for numerically delicate layers. Their backward
must run in float32, as it does in the plain loop; a backward run under autocast would do
their matmuls in bf16 (about 3e-3 relative off). The reference is the plain loop over the
same micro-batches (gradients accumulated in ``.grad``), so the pipelined step runs the same
ops in the same dtypes and only float32 additions may differ in order: 1e-5 relative. (A
whole-batch reference would differ by bf16 rounding: each micro-batch's bf16 weight gradient
is rounded before it is added.)

Cases: every schedule with every re-materialization mode through ``Pipe.step``, the
``pipe(x)`` + ``loss.backward()`` path (its recompute runs inside the backward), an input
computed before the pipe (its gradient is sent on by the step), ``DistributedPipe`` on two
gloo ranks, ``gpipe.reference_step``, :mod:`gpipe.stage.amp` by itself, and one test on
``GPIPE_TEST_DEVICE`` (fp16 with a loss scale on CUDA).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import gpipe
from gpipe.schedules import available, interleaving
from gpipe.stage import amp
from gpipe.stage.remat import MODES

D = 8
M = 4
BATCH = 16
RTOL, ATOL = 1e-5, 1e-8  # float32 accumulation order; a bf16 backward is ~3e-3 off
CPU = torch.device("cpu")
DEV = torch.device(os.environ.get("GPIPE_TEST_DEVICE", "cpu"))
V_SHAPED = ("zb-v", "dualpipe-v")  # two stages per device, placed in a V


class Fp32Island(nn.Module):
    """A layer the user keeps in float32 inside an autocast region."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return torch.tanh(self.lin(x.float()))


def make_model(device: torch.device = CPU) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [
        nn.Linear(D, D),
        Fp32Island(),
        nn.Linear(D, D),
        nn.ReLU(),
        Fp32Island(),
        nn.Linear(D, D),
        Fp32Island(),
        nn.Linear(D, D),
    ]  # 2 or 4 stages: an island on every pair of stages
    return nn.Sequential(*layers).to(device)


def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out.float() - target) ** 2).mean()


def data(device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, D, generator=g)
    return x.to(device), torch.randn(BATCH, D, generator=g).to(device)


def plain_loop(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    dtype: torch.dtype = torch.bfloat16,
    scale: float = 1.0,
) -> torch.Tensor:
    """The loop a pipe must match: per micro-batch, forward and loss (``/ M``, times
    ``scale``) under autocast, ``backward()`` outside it; returns the summed loss."""
    losses = []
    for xb, yb in zip(x.chunk(M), y.chunk(M), strict=True):
        with torch.autocast(x.device.type, dtype=dtype):
            loss = loss_fn(model(xb), yb) / M * scale
        loss.backward()
        losses.append(loss.detach())
    return torch.stack(losses).sum()


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Equal up to float32 accumulation order; the message names ``what``."""
    assert got is not None, what
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")


def assert_grads_equal(got: nn.Module, want: nn.Module) -> None:
    for (name, a), b in zip(got.named_parameters(), want.parameters(), strict=True):
        assert_close(a.grad, b.grad, name)


def options(schedule: str, remat: str) -> dict:
    """Both pipes' options: two devices, with two stages each for the schedules that take
    (or need) them."""
    v = 2 if schedule in interleaving() or schedule in V_SHAPED else 1
    balance = [4 // v] * (2 * v)
    return dict(balance=balance, chunks=M, schedule=schedule, virtual_stages=v, remat=remat)


def build(schedule: str, remat: str, model: nn.Module, device: torch.device) -> gpipe.Pipe:
    return gpipe.Pipe(model, devices=[device, device], timeout=60, **options(schedule, remat))


@pytest.mark.parametrize(("schedule", "remat"), list(itertools.product(available(), MODES)))
def test_step_under_autocast_equals_the_plain_loop(schedule: str, remat: str) -> None:
    x, y = data()
    ref = make_model()
    want = plain_loop(ref, x, y)
    model = make_model()
    with build(schedule, remat, model, CPU) as pipe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pipe.step(x, y, loss_fn)
        assert torch.is_autocast_enabled("cpu") is False  # the caller's state is kept
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=0)
    assert_grads_equal(model, ref)


def test_reference_step_under_autocast_equals_the_plain_loop() -> None:
    # gpipe.reference_step, the un-pipelined step, runs its backward without autocast too
    x, y = data()
    ref = make_model()
    want = plain_loop(ref, x, y)
    model = make_model()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = gpipe.reference_step(model, x, y, loss_fn, chunks=M)
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=0)
    assert_grads_equal(model, ref)


@pytest.mark.parametrize("remat", MODES)
def test_pipe_call_under_autocast_then_backward_outside_equals_the_plain_loop(
    remat: str,
) -> None:
    # the recompute of a re-materialized micro-batch runs inside loss.backward(), outside the
    # region: it repeats the forward's autocast, and the gradients are computed without it
    x, y = data()
    ref = make_model()
    plain_loop(ref, x, y)
    model = make_model()
    with build("gpipe", remat, model, CPU) as pipe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(pipe(x), y)  # the mean of the micro-batches' means
        loss.backward()
    assert_grads_equal(model, ref)


def test_pipe_call_backward_inside_another_region_still_runs_without_autocast() -> None:
    # a backward called inside an fp16 region: the recompute repeats the forward's bf16, the
    # stages' backward runs without autocast (the plain loop's backward outside the region)
    x, y = data()
    ref = make_model()
    plain_loop(ref, x, y)
    model = make_model()
    with build("gpipe", "always", model, CPU) as pipe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(pipe(x), y)  # the mean of the micro-batches' means
        with torch.autocast("cpu", dtype=torch.float16):
            loss.backward()
    assert_grads_equal(model, ref)


def test_an_input_computed_before_the_pipe_gets_its_gradient_without_autocast() -> None:
    # pipe.step sends the input gradient on through the caller's graph: a backward, so not in
    # the caller's region even though step was called inside it
    x, y = data()
    torch.manual_seed(1)
    front_ref = Fp32Island()
    front = Fp32Island()
    front.load_state_dict(front_ref.state_dict())
    ref = make_model()
    want = plain_loop(lambda xb: ref(front_ref(xb)), x, y)
    model = make_model()
    with build("zb-h1", "except_last", model, CPU) as pipe, torch.autocast("cpu"):
        loss = pipe.step(front(x), y, loss_fn)  # bf16, the CPU's default autocast dtype
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=0)
    assert_grads_equal(model, ref)
    assert_grads_equal(front, front_ref)


def _in_thread(fn: Callable[[], object]) -> object:
    out: dict[str, object] = {}
    t = threading.Thread(target=lambda: out.update(v=fn()))
    t.start()
    t.join(10)
    return out["v"]


def test_forward_state_is_captured_and_reapplied_exactly_on_another_thread() -> None:
    def seen() -> tuple:
        a = torch.ones(2, 2)
        return (a @ a).dtype, torch.is_autocast_enabled("cpu"), torch.is_autocast_cache_enabled()

    # float16, not CPU autocast's default bfloat16, and the cache off: both must travel
    with torch.autocast("cpu", dtype=torch.float16, cache_enabled=False):
        state = amp.Autocast.capture()
        with amp.off():
            assert seen()[:2] == (torch.float32, False)
        assert seen() == (torch.float16, True, False)  # off() leaves the region as it was
    assert state == amp.Autocast((("cpu", torch.float16),), cache=False)
    assert _in_thread(lambda: _under(state, seen)) == (torch.float16, True, False)
    # a state without autocast disables a region the body is called in (a recompute run by a
    # backward inside another region repeats its forward's arithmetic)
    none = amp.Autocast.capture()
    assert none == amp.Autocast((), cache=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _under(none, seen)[:2] == (torch.float32, False)
        assert _under(state, seen) == (torch.float16, True, False)
        assert seen() == (torch.bfloat16, True, True)


def _under(state: amp.Autocast, fn: Callable[[], tuple]) -> tuple:
    with state.forward():
        return fn()


def _distributed(rank: int, tmp: Path) -> None:
    x, y = data()
    ref = make_model()
    want = plain_loop(ref, x, y)
    for schedule, remat in [("zb-h1", "always"), ("zb-v", "except_last")]:
        model = make_model()
        pipe = gpipe.DistributedPipe(model, timeout=60, **options(schedule, remat))
        with pipe, torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pipe.step(x, y, loss_fn)
        torch.testing.assert_close(loss, want, rtol=RTOL, atol=0)
        mine = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert len(mine) in (6, 8), (schedule, sorted(mine))  # this rank's half of the model
        for name, p in ref.named_parameters():
            if name in mine:
                assert_close(mine[name], p.grad, f"rank {rank}, {schedule}: {name}")


@pytest.mark.slow  # spawns a gloo process group
def test_distributed_step_under_autocast_on_every_rank_equals_the_plain_loop(
    tmp_path: Path,
) -> None:
    from spawn_ranks import run_gloo

    run_gloo(_distributed, tmp_path, limit=150)


@pytest.mark.device
@pytest.mark.parametrize("schedule", ["zb-h1", "interleaved"])
def test_on_the_device_fp32_layers_keep_a_float32_backward(schedule: str) -> None:
    """fp16 with a loss scale on CUDA (bf16 on CPU): the fp32 layers' backward runs in float32
    on the scaled gradients, as in the plain loop — not in fp16."""
    dtype, scale = (torch.float16, 1024.0) if DEV.type == "cuda" else (torch.bfloat16, 1.0)
    x, y = data(DEV)
    ref = make_model(DEV)
    want = plain_loop(ref, x, y, dtype, scale)
    model = make_model(DEV)
    with build(schedule, "except_last", model, DEV) as pipe, torch.autocast(DEV.type, dtype=dtype):
        loss = pipe.step(x, y, lambda o, t: loss_fn(o, t) * scale)
    torch.testing.assert_close(loss, want, rtol=RTOL, atol=0)
    assert_grads_equal(model, ref)
