"""What the local runtime does for GPUs that CPU can check: device choice, autograd threads,
autocast reused by recompute, targets on the last stage's device.

The CUDA paths themselves run in ``benchmarks/gpu.sh`` on a lent GPU; these tests pin the
bookkeeping those paths rely on.
"""

from __future__ import annotations

import os
import threading
from typing import ClassVar

import pytest
import torch
from torch import nn

import gpipe
from gpipe.local import devices as partition

D = 6
# benchmarks/gpu.sh runs the tests marked "device" with GPIPE_TEST_DEVICE=cuda on a lent GPU
DEV = torch.device(os.environ.get("GPIPE_TEST_DEVICE", "cpu"))


@pytest.mark.parametrize(
    ("gpus", "k", "want"),
    [
        (0, 2, ["cpu", "cpu"]),
        (1, 2, ["cuda:0", "cuda:0"]),
        (2, 3, ["cuda:0", "cuda:1", "cuda:0"]),
        (4, None, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
        (0, None, ["cpu"]),
    ],
)
def test_default_devices_use_every_gpu_and_never_fall_back_to_cpu(
    monkeypatch: pytest.MonkeyPatch, gpus: int, k: int | None, want: list[str]
) -> None:
    # K stages over n GPUs go to cuda:(s mod n); with more stages than GPUs the pipe used to
    # put every stage on the CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert [str(d) for d in partition.default_devices(k)] == want


def test_an_unindexed_cuda_device_means_the_current_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # torch.cuda.set_device refuses "cuda" without an index, and tensors report "cuda:i"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    devs = partition.pipe_devices(["cuda", "cuda:0", 0], None, None, None, 1)
    assert [str(d) for d in devs] == ["cuda:1", "cuda:0", "cuda:0"]


def test_a_worker_that_cannot_start_on_its_device_fails_every_job(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gpipe.core.mailbox import QueueTransport
    from gpipe.local.workers import WorkerPool

    def refuse(device: torch.device) -> None:
        raise ValueError(f"no such device {device}")

    monkeypatch.setattr(torch.cuda, "set_device", refuse)
    pool = WorkerPool(
        2, QueueTransport(timeout=5.0), devices=[torch.device("cpu"), torch.device("cuda", 3)]
    )
    ran: list[int] = []
    for _ in range(2):  # at once, not after the pool's last-resort limit; and again
        with pytest.raises(RuntimeError, match="worker 1 could not start on cuda:3: no such"):
            pool.run([lambda: ran.append(0), lambda: ran.append(1)])
    assert ran == [0, 0]
    pool.close()


class Probe(nn.Module):
    """A linear layer that records, per call, its thread's autograd multithreading flag in
    backward and the dtype its matmul computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.backward_flags: list[tuple[str, bool]] = []
        self.dtypes: list[torch.dtype] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        self.dtypes.append(y.dtype)
        if y.requires_grad:
            y.register_hook(self._hook)
        return y.float()

    def _hook(self, grad: torch.Tensor) -> None:
        name = threading.current_thread().name
        self.backward_flags.append((name, torch._C._is_multithreading_enabled()))


@pytest.mark.device
def test_stage_backward_runs_on_the_worker_with_autograd_multithreading_off() -> None:
    torch.manual_seed(0)
    probe = Probe()
    model = nn.Sequential(nn.Linear(D, D), probe)
    pipe = gpipe.Pipe(model, balance=[1, 1], chunks=2, devices=[DEV, DEV], timeout=30)
    x = torch.randn(4, D, device=DEV)
    pipe(x).sum().backward()
    assert len(probe.backward_flags) == 2  # one per micro-batch
    for name, flag in probe.backward_flags:
        assert name.startswith("gpipe-device-") and flag is False
    assert torch._C._is_multithreading_enabled()  # the caller's own setting is untouched


@pytest.mark.device
def test_pipe_backward_works_with_the_callers_autograd_multithreading_off() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)).double()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)).double().to(DEV)
    pipe = gpipe.Pipe(model, balance=[2, 1], chunks=2, devices=[DEV, DEV], timeout=30)
    x = torch.randn(4, D, dtype=torch.float64, device=DEV)
    with torch.autograd.set_multithreading_enabled(False):
        (pipe(x) ** 2).sum().backward()
    (plain(x) ** 2).sum().backward()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)


@pytest.mark.device
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_step_works_with_the_callers_autograd_multithreading_off(schedule: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)).double()
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)).double().to(DEV)
    pipe = gpipe.Pipe(
        model, balance=[2, 1], chunks=2, schedule=schedule, devices=[DEV, DEV], timeout=30
    )
    x = torch.randn(4, D, dtype=torch.float64, device=DEV)
    y = torch.randn(4, D, dtype=torch.float64, device=DEV)

    def loss_fn(o: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return ((o - t) ** 2).mean()

    with torch.autograd.set_multithreading_enabled(False):
        loss = pipe.step(x, y, loss_fn)
        assert not torch._C._is_multithreading_enabled()  # the caller's setting is kept
    want = loss_fn(plain(x), y)
    want.backward()
    torch.testing.assert_close(loss, want.detach(), atol=1e-12, rtol=0)
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-12, rtol=0)
    pipe.close()


@pytest.mark.device
def test_recompute_repeats_the_forwards_autocast_even_when_backward_is_outside_it() -> None:
    torch.manual_seed(0)
    probe = Probe()
    model = nn.Sequential(nn.Linear(D, D), probe)
    pipe = gpipe.Pipe(
        model, balance=[1, 1], chunks=2, remat="always", devices=[DEV, DEV], timeout=30
    )
    x = torch.randn(4, D, device=DEV)
    with torch.autocast(DEV.type, dtype=torch.bfloat16):
        out = pipe(x)
    out.sum().backward()  # outside the autocast region, as training loops often do
    assert probe.dtypes == [torch.bfloat16] * 4  # 2 forwards + 2 recomputes


@pytest.mark.device
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_step_with_a_grad_scaler_in_the_loss_equals_the_plain_loop(schedule: str) -> None:
    """fp16 training with ``GradScaler``: ``step`` runs the backward itself, so the scale goes
    into ``loss_fn`` (README, "Mixed precision"); after ``unscale_`` the gradients are the
    plain model's under the same autocast, micro-batch by micro-batch."""

    def make() -> nn.Sequential:
        torch.manual_seed(0)
        layers = [nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)]
        return nn.Sequential(*layers).to(DEV)

    x = torch.randn(8, D, device=DEV)
    y = torch.randint(0, 3, (8,), device=DEV)
    ce = nn.functional.cross_entropy
    ref = make()
    ref_scaler = torch.amp.GradScaler(DEV.type, init_scale=1024.0)
    ref_loss = 0.0
    for xb, yb in zip(x.chunk(4), y.chunk(4), strict=True):
        with torch.autocast(DEV.type, dtype=torch.float16):
            loss = ce(ref(xb), yb) / 4
        ref_scaler.scale(loss).backward()
        ref_loss += loss.item()
    ref_scaler.unscale_(torch.optim.SGD(ref.parameters(), lr=0.1))
    model = make()
    pipe = gpipe.Pipe(model, balance=[2, 3], chunks=4, schedule=schedule, devices=[DEV, DEV])
    scaler = torch.amp.GradScaler(DEV.type, init_scale=1024.0)
    with torch.autocast(DEV.type, dtype=torch.float16):
        scaled = pipe.step(x, y, lambda out, t: scaler.scale(ce(out, t)))
    scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.1))
    assert scaled.item() / scaler.get_scale() == pytest.approx(ref_loss, rel=1e-6)
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    pipe.close()


def test_targets_are_moved_to_the_last_stages_device() -> None:
    # the last stage moves the targets where its outputs are (here "meta" stands in for a GPU)
    from gpipe.stage.stage import _to_device

    y = {"labels": torch.arange(4), "weights": torch.ones(4), "name": "batch"}
    moved = _to_device(y, torch.device("meta"))
    assert moved["labels"].device.type == "meta" and moved["weights"].device.type == "meta"
    assert moved["labels"].shape == (4,) and moved["name"] == "batch"
    same = torch.ones(2)
    assert _to_device(same, torch.device("cpu")) is same  # no copy where it already is


@pytest.mark.parametrize(
    ("backend", "env", "want"),
    [
        ("gloo", {}, "cpu"),
        ("gloo", {"LOCAL_RANK": "3"}, "cpu"),
        ("nccl", {"LOCAL_RANK": "0"}, "cuda:0"),
        ("nccl", {"LOCAL_RANK": "3"}, "cuda:3"),
    ],
)
def test_distributed_default_device_follows_local_rank(backend: str, env: dict, want: str) -> None:
    from gpipe.dist.pipe import default_device

    assert str(default_device(backend, env)) == want


@pytest.mark.parametrize("env", [{}, {"LOCAL_RANK": "x"}])
def test_distributed_on_nccl_without_local_rank_refused(env: dict) -> None:
    from gpipe.dist.pipe import default_device

    with pytest.raises(ValueError, match="LOCAL_RANK is .*launch with torchrun"):
        default_device("nccl", env)


class FakeEvent:
    """Stands in for ``torch.cuda.Event``: its device clock runs at twice the host's speed."""

    made: ClassVar[list[FakeEvent]] = []

    def __init__(self, t: float | None = None) -> None:
        import time

        self.host = time.perf_counter() if t is None else t
        self.t = 2.0 * self.host
        self.synced = False
        FakeEvent.made.append(self)

    def synchronize(self) -> None:
        self.synced = True

    def elapsed_time(self, other: FakeEvent) -> float:
        return (other.t - self.t) * 1e3  # milliseconds, as CUDA events report


def test_gpu_action_times_come_from_device_events_after_the_step() -> None:
    from gpipe.core.executor import StepData, resolve_gpu_times
    from gpipe.schedules import Action, Event

    a, b = Action("F", 0, 0), Action("B", 0, 0)
    data = StepData(1)
    data.events = [Event(a, 0, 0.1, 0.2), Event(b, 0, 0.3, 0.4)]  # host times (queued)
    ref = FakeEvent(10.0)
    data.gpu_ref[0] = (ref, 0.05)
    ends = [FakeEvent(10.5), FakeEvent(11.0), FakeEvent(11.25), FakeEvent(12.0)]
    data.gpu_marks = [(a, 0, ends[0], ends[1]), (b, 0, ends[2], ends[3])]
    resolve_gpu_times(data)
    # device seconds since the reference event, plus the reference's host time
    assert [(e.start, e.end) for e in data.events] == [(1.05, 2.05), (2.55, 4.05)]
    assert all(e.synced for e in (ends[1], ends[3])) and data.gpu_marks == []


def test_a_step_on_an_event_timed_device_reports_device_times(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gpipe.core import executor

    monkeypatch.setattr(executor, "_timed_by_events", lambda device: True)
    monkeypatch.setattr(executor, "_event", FakeEvent)
    FakeEvent.made = []
    pipe = gpipe.Pipe(nn.Sequential(nn.Linear(D, D), nn.Linear(D, D)), balance=[1, 1], chunks=2)
    pipe.step(torch.randn(4, D), torch.randn(4, D), lambda o, t: ((o - t) ** 2).mean())
    events = pipe.last_events
    assert len(events) == 8  # 2 stages x 2 micro-batches x (F, B)
    # every action's end event was waited for and its times read from the device clock
    assert sum(e.synced for e in FakeEvent.made) == 8
    assert all(0 <= e.start < e.end for e in events)
