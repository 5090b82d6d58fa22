"""The stream, event and copy bookkeeping of the one-process runtime, checked on a CPU.

``gpipe.local.streams`` makes every CUDA call through ``streams.OPS``; here a fake stands in
for it and models what CUDA guarantees: a stream is ordered after the writes queued on it and
after the events it waited on; an event captures what its stream was ordered after when it
was recorded. Tensors are tagged with the stream that wrote them; every read (a copy, a stage
taking its input or its output gradient, the caller reading a result) checks that the reading
stream is ordered after that write, and that a tensor read on a stream other than the one it
was allocated on was passed to ``record_stream`` for that stream. The CUDA runs themselves
are ``benchmarks/gpu.sh``'s job on a lent GPU.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
import torch
from torch import nn

import gpipe
import reference_impl
from gpipe.base.microbatch import tree_flatten
from gpipe.local import streams
from gpipe.stage.stage import Stage

D = 6


class Stream:
    def __init__(self, name: str, device: torch.device) -> None:
        self.name, self.device = name, device
        self.seen: set[int] = set()  # the writes this stream is ordered after
        self.writes: set[int] = set()  # the writes queued on this stream

    def __repr__(self) -> str:
        return self.name


class Event:
    def __init__(self) -> None:
        self.seen: set[int] | None = None  # None until recorded
        self.stream: Stream | None = None


class FakeOps:
    """A recording stand-in for the CUDA calls, with CUDA's ordering rules."""

    def __init__(self, gpu: Any = lambda device: True) -> None:
        self.gpu = gpu  # which devices the fake treats as GPUs (as streams.streamed)
        self.lock = threading.RLock()
        self.log: list[tuple] = []
        self.local = threading.local()
        self.defaults: dict[str, Stream] = {}
        self.names = itertools.count()
        self.writes = itertools.count()
        self.tag: dict[int, tuple[int, Stream]] = {}  # storage -> (write, allocating stream)
        self.recorded: set[tuple[int, str]] = set()  # (storage, stream) given to record_stream
        self.keep: list[torch.Tensor] = []  # tagged storages stay alive (no address reuse)
        self.errors: list[str] = []
        self.uses: list[tuple[int, Stream, Stream, str]] = []
        self.host_seen: set[int] = set()  # the writes the host waited for
        self.ran_on: list[tuple[int, str]] = []  # (stage, stream) of every stage action
        self.results: list[torch.Tensor] = []  # what the caller reads after a step

    # the CudaOps interface
    def new_stream(self, device: torch.device) -> Stream:
        with self.lock:
            s = Stream(f"s{next(self.names)}", device)
            self.log.append(("new_stream", s))
            return s

    def current_stream(self, device: torch.device) -> Stream:
        cur = getattr(self.local, "current", {})
        key = str(device)
        if key in cur:
            return cur[key]
        with self.lock:
            return self.defaults.setdefault(key, Stream(f"default:{key}", device))

    def new_event(self) -> Event:
        return Event()

    def record(self, event: Event, stream: Stream) -> None:
        with self.lock:
            event.seen, event.stream = set(stream.seen), stream
            self.log.append(("record", stream.name))

    def wait(self, stream: Stream, event: Event) -> None:
        with self.lock:
            if event.seen is None:
                self.errors.append(f"{stream} waits on an event never recorded")
                return
            stream.seen |= event.seen
            self.log.append(("wait", stream.name, event.stream.name))

    def synchronize(self, event: Event) -> None:
        with self.lock:
            self.host_seen |= event.seen or set()
            self.log.append(("synchronize", event.stream.name))

    def record_stream(self, tensor: torch.Tensor, stream: Stream) -> None:
        with self.lock:
            self.recorded.add((_storage(tensor), stream.name))
            self.log.append(("record_stream", stream.name))

    @contextlib.contextmanager
    def use(self, streams_: Sequence[Stream]) -> Iterator[None]:
        old = dict(getattr(self.local, "current", {}))
        cur = dict(old)
        for s in streams_:
            cur[str(s.device)] = s
        self.local.current = cur
        try:
            yield
        finally:
            self.local.current = old

    def copy(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        # As PyTorch: a copy between GPUs runs on the source device's current stream, after it
        # waited on the destination's, and the destination's current stream (which the copy
        # is allocated on) then waits on the copy; a host-device copy runs on the GPU end's.
        src_cur, dst_cur = self.current_stream(tensor.device), self.current_stream(device)
        lane = src_cur if self.gpu(tensor.device) else dst_cur
        if lane is src_cur and self.gpu(device) and dst_cur is not src_cur:
            with self.lock:
                src_cur.seen |= dst_cur.seen
        self.check_read(tensor, lane, "copy")
        y = torch.empty(tensor.shape, device="meta") if device.type == "meta" else tensor.clone()
        with self.lock:
            self.log.append(("copy", lane.name))
        self.write(y, lane)
        if self.gpu(device) and dst_cur is not lane:
            with self.lock:
                dst_cur.seen |= lane.seen
                self.tag[_storage(y)] = (self.tag[_storage(y)][0], dst_cur)
        return y

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.log.append(("pin",))
        return tensor

    # the model
    def write(self, tensor: torch.Tensor, stream: Stream) -> None:
        with self.lock:
            w = next(self.writes)
            stream.seen.add(w)
            stream.writes.add(w)
            self.tag[_storage(tensor)] = (w, stream)
            self.keep.append(tensor)

    def check_read(self, tensor: torch.Tensor, stream: Stream, what: str) -> None:
        with self.lock:
            tag = self.tag.get(_storage(tensor))
            if tag is None:
                return
            w, alloc = tag
            if w not in stream.seen:
                self.errors.append(f"{what}: read on {stream} before its write on {alloc}")
            if alloc is not stream:
                self.uses.append((_storage(tensor), stream, alloc, what))

    def problems(self) -> list[str]:
        """Reads before their writes, and tensors used on a stream other than the one that
        made them without ``record_stream`` for it (checked once the calls are made)."""
        with self.lock:
            return self.errors + [
                f"{what}: used on {stream}, made on {alloc}, no record_stream"
                for key, stream, alloc, what in self.uses
                if (key, stream.name) not in self.recorded
            ]


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [v for _, v in tree_flatten(obj)[0] if isinstance(v, torch.Tensor)]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeOps:
    """Every CPU device is treated as a CUDA device whose calls go to a FakeOps; stages tag
    what they write on their current stream and check what they read."""
    ops = FakeOps()
    monkeypatch.setattr(streams, "OPS", ops)
    monkeypatch.setattr(streams, "streamed", lambda device: True)
    forward, backward = Stage.forward, Stage.backward

    def checked_forward(
        self: Stage, m: int, x: Any, target: Any = None, *, split: bool = False
    ) -> Any:
        cur = ops.current_stream(self.device)
        ops.ran_on.append((self.index, cur.name))
        for t in _tensors(x) + _tensors(target):
            ops.check_read(t, cur, f"stage {self.index} forward of micro-batch {m}")
        res = forward(self, m, x, target, split=split)
        for t in _tensors(res.value) + _tensors(res.loss):
            ops.write(t, cur)
        if self.is_last:  # step returns the losses; pipe(x) the outputs
            ops.results.extend(_tensors(res.loss) if res.loss is not None else _tensors(res.value))
        return res

    def checked_backward(self: Stage, m: int, grad: Any, *, split: bool = False) -> Any:
        cur = ops.current_stream(self.device)
        ops.ran_on.append((self.index, cur.name))
        for t in _tensors(grad):
            ops.check_read(t, cur, f"stage {self.index} backward of micro-batch {m}")
        gin = backward(self, m, grad, split=split)
        for t in _tensors(gin):
            ops.write(t, cur)
        if self.index == 0:
            ops.results.extend(_tensors(gin))
        return gin

    monkeypatch.setattr(Stage, "forward", checked_forward)
    monkeypatch.setattr(Stage, "backward", checked_backward)
    return ops


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D), nn.Tanh(), nn.Linear(D, D)
    ).double()


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, D, generator=g, dtype=torch.float64)
    return x, torch.randn(8, D, generator=g, dtype=torch.float64)


def reference(x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model = make_model()
    reference_impl.step(model, x, y, loss_fn, chunks=4)
    return [p.grad for p in model.parameters()]


def check_caller_side(fake: FakeOps, pipe: gpipe.Pipe, caller: Stream) -> None:
    """After a step the caller's stream is ordered after everything the workers queued, and
    the results it reads were given to record_stream for it."""
    compute = pipe._runner.streams.compute
    for d, s in enumerate(compute):
        assert s.writes and s.writes <= caller.seen, f"caller not ordered after worker {d}"
    for t in fake.results:
        fake.check_read(t, caller, "the caller reading a result")
    for stage, stream in fake.ran_on:  # every action ran on its worker's compute stream
        assert stream == compute[pipe.placement[stage]].name


@pytest.fixture(params=[True, False], ids=["copied", "same-device"])
def copies(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    if request.param:  # the two workers' GPUs differ: every boundary value is copied
        monkeypatch.setattr(streams, "_needs_copy", lambda src, dst: True)
    return request.param


@pytest.mark.parametrize(
    ("schedule", "balance"),
    [
        ("gpipe", [2, 3]),
        ("1f1b", [2, 3]),
        ("interleaved", [1, 1, 1, 2]),
        ("zb-h1", [2, 3]),
        ("zb-v", [1, 1, 1, 2]),  # V-shaped: stages 1 and 2 share a device, the last is on 0
        ("dualpipe-v", [1, 1, 1, 2]),
    ],
)
def test_step_reads_every_tensor_after_its_write_and_keeps_its_memory(
    fake: FakeOps, copies: bool, schedule: str, balance: list[int]
) -> None:
    x, y = batch()
    caller = fake.current_stream(x.device)
    fake.write(x, caller)
    fake.write(y, caller)
    model = make_model()
    pipe = gpipe.Pipe(model, balance=balance, chunks=4, schedule=schedule, devices=["cpu"] * 2)
    pipe.step(x, y, loss_fn)
    assert fake.problems() == []
    check_caller_side(fake, pipe, caller)
    assert fake.problems() == []
    for a, b in zip(model.parameters(), reference(x, y), strict=True):
        torch.testing.assert_close(a.grad, b, atol=1e-12, rtol=0)
    new = [e for e in fake.log if e[0] == "new_stream"]
    # a compute stream per pipeline device; a copy lane for the edge the copies cross (both
    # fake devices are the CPU: one edge within one device, one stream), each made once
    lanes = pipe._runner.streams.lanes
    assert len(new) == 2 + (1 if copies else 0) and len(lanes) == (1 if copies else 0)
    copied = [e for e in fake.log if e[0] == "copy"]
    # boundaries between devices x 4 micro-batches x (activation, gradient), each 1 tensor
    place = pipe.placement
    crossing = sum(place[s] != place[s + 1] for s in range(len(balance) - 1))
    assert len(copied) == (crossing * 4 * 2 if copies else 0)
    assert {e[1] for e in copied} <= {s.name for lane in lanes.values() for s in lane.streams}
    pipe.close()


def test_pipe_call_and_backward_read_every_tensor_after_its_write(
    fake: FakeOps, copies: bool
) -> None:
    x, y = batch()
    x.requires_grad_(True)
    caller = fake.current_stream(x.device)
    fake.write(x, caller)
    model = make_model()
    pipe = gpipe.Pipe(model, balance=[2, 3], chunks=4, devices=["cpu"] * 2)
    out = pipe(x)
    check_caller_side(fake, pipe, caller)
    loss = sum(loss_fn(o, t) for o, t in zip(out.chunk(4), y.chunk(4), strict=True)) / 4
    loss.backward()
    assert fake.problems() == []
    check_caller_side(fake, pipe, caller)
    assert fake.problems() == []
    for a, b in zip(model.parameters(), reference(x.detach(), y), strict=True):
        torch.testing.assert_close(a.grad, b, atol=1e-12, rtol=0)
    pipe.close()


def test_a_copy_waits_for_its_producer_and_its_reader_waits_for_the_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # two "GPUs": worker 0 on cpu, worker 1 on meta (so the value really changes device)
    ops = FakeOps()
    monkeypatch.setattr(streams, "OPS", ops)
    monkeypatch.setattr(streams, "streamed", lambda device: True)
    ds = streams.DeviceStreams([torch.device("cpu"), torch.device("meta")])
    c0, c1 = ds.compute
    x = torch.randn(2, D)
    with ops.use([c0]):
        ops.write(x, c0)
        parcel = ds.send({"h": x, "n": 3}, 0, 1)
    lane = ds.lanes[(torch.device("cpu"), torch.device("meta"))]
    k0, k1 = lane.src, lane.dst
    assert parcel.value["n"] == 3 and parcel.value["h"].device.type == "meta"
    sent = ops.log[2:]  # after the two compute streams
    # the edge's lane, made on first use
    assert [e for e in sent if e[0] == "new_stream"] == [("new_stream", k0), ("new_stream", k1)]
    i_ready = sent.index(("record", c0.name))
    i_copy = next(i for i, e in enumerate(sent) if e[0] == "copy")
    # the lane's source stream waits on the producer's event (only) before the copy
    assert [e for e in sent[:i_copy] if e[0] == "wait"] == [("wait", k0.name, c0.name)]
    assert i_ready < sent.index(("wait", k0.name, c0.name))
    assert sent[i_copy] == ("copy", k0.name)  # on the source device's lane stream
    assert ("record_stream", k0.name) in sent[i_copy:]  # the source, read by the copy
    assert ("record_stream", c1.name) in sent[i_copy:]  # the copy, read by the consumer
    assert len(parcel.events) == 1  # after the copy, on the destination's lane stream
    n = len(ops.log)
    with ops.use([c1]):
        y = ds.receive(parcel, 1)
    assert ops.log[n:] == [("wait", c1.name, k1.name)]
    ops.check_read(y["h"], c1, "consumer")
    assert ops.problems() == []


def test_each_direction_has_its_own_lane_which_waits_only_on_its_producer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # values cross between two "GPUs" in both directions; a stream that carries the copies
    # of one direction never waits on the other side's compute (a copy must not queue
    # behind the compute of the worker it goes to), and each copy still reads after its write
    ops = FakeOps()
    monkeypatch.setattr(streams, "OPS", ops)
    monkeypatch.setattr(streams, "streamed", lambda device: True)
    ds = streams.DeviceStreams([torch.device("cpu"), torch.device("meta")])
    c0, c1 = ds.compute
    carried: dict[int, set[str]] = {0: set(), 1: set()}
    for _ in range(2):
        x = torch.randn(2, D)
        with ops.use([c0]):
            ops.write(x, c0)
            n = len(ops.log)
            ds.send(x, 0, 1)
        carried[0] |= {e[1] for e in ops.log[n:] if e[0] in ("copy", "record")} - {c0.name}
        g = torch.empty(2, D, device="meta")
        with ops.use([c1]):
            ops.write(g, c1)
            n = len(ops.log)
            ds.send(g, 1, 0)
        carried[1] |= {e[1] for e in ops.log[n:] if e[0] in ("copy", "record")} - {c1.name}
    assert carried[0] and carried[1] and not carried[0] & carried[1]
    waits = [e for e in ops.log if e[0] == "wait"]
    assert not [w for w in waits if w[1] in carried[0] and w[2] != c0.name]
    assert not [w for w in waits if w[1] in carried[1] and w[2] != c1.name]
    assert len([e for e in ops.log if e[0] == "new_stream"]) == 2 + 4  # made once
    assert ops.problems() == []


def test_a_cpu_input_is_pinned_and_copied_on_its_lane_and_read_after_its_copy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # worker 0 on a "GPU" (meta); the caller's micro-batches on the CPU
    ops = FakeOps(gpu=lambda device: device.type == "meta")
    monkeypatch.setattr(streams, "OPS", ops)
    monkeypatch.setattr(streams, "streamed", lambda device: device.type == "meta")
    ds = streams.DeviceStreams([torch.device("meta")])
    (c0,) = ds.compute
    micro = [{"x": torch.randn(2, D), "n": i} for i in range(3)]
    n = len(ops.log)
    arriving = streams.Arriving(ds, micro, 0)
    lane = ds.lanes[(torch.device("cpu"), torch.device("meta"))]
    assert lane.src is None and lane.dst is not None and lane.dst is not c0
    made = ops.log[n:]
    # per micro-batch: pinned, copied on the lane (not on the compute stream), the copy
    # marked as used on the compute stream, an event after it on the lane
    assert [e[0] for e in made if e[0] in ("pin", "copy", "record")] == [
        "pin",
        "copy",
        "record",
    ] * 3
    assert {e[1] for e in made if e[0] == "copy"} == {lane.dst.name}
    assert ("record_stream", c0.name) in made
    assert not [e for e in made if e[0] in ("wait", "synchronize")]  # the caller never waits
    assert len(arriving) == 3
    with ops.use([c0]):
        for m in (0, 1, 2):
            k = len(ops.log)
            got = arriving[m]
            assert ops.log[k:] == [("wait", c0.name, lane.dst.name)]
            assert got["n"] == m and got["x"].device.type == "meta"
            ops.check_read(got["x"], c0, f"stage 0 reading micro-batch {m}")
    assert ops.problems() == []


def test_a_cpu_reader_waits_for_the_copy_on_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = FakeOps(gpu=lambda device: device.type == "meta")
    monkeypatch.setattr(streams, "OPS", ops)
    monkeypatch.setattr(streams, "streamed", lambda device: device.type == "meta")
    ds = streams.DeviceStreams([torch.device("meta"), torch.device("cpu")])
    assert ds.compute[1] is None  # no stream for the CPU worker
    x = torch.empty(2, D, device="meta")
    parcel = ds.send(x, 0, 1)
    lane = ds.lanes[(torch.device("meta"), torch.device("cpu"))]
    assert lane.dst is None  # a copy to the host runs on the GPU end's lane stream
    n = len(ops.log)
    y = ds.receive(parcel, 1)
    assert ops.log[n:] == [("synchronize", lane.src.name)]
    assert ops.tag[_storage(y)][0] in ops.host_seen  # the host waited for the copy


def test_without_gpus_the_streams_module_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    ops = FakeOps()
    monkeypatch.setattr(streams, "OPS", ops)
    ds = streams.DeviceStreams([torch.device("cpu")] * 2)
    x = {"a": torch.randn(2)}
    assert not ds.active
    assert ds.send(x, 0, 1) is x and ds.receive(x, 1) is x and ds.hand_over(x, 0) is x
    with ds.computing(0):
        ds.enter(0, ds.begin())
        ds.join({0: ds.leave(0)})
    ds.hand_back(x)
    assert ops.log == []  # not one CUDA call


DEV = torch.device(os.environ.get("GPIPE_TEST_DEVICE", "cpu"))


class StreamProbe(nn.Module):
    """Records the current CUDA stream of each of its forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.seen: list[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch.cuda.current_stream(x.device))
        return self.fc(x)


@pytest.mark.device
@pytest.mark.skipif(DEV.type != "cuda", reason="CUDA streams need a GPU (GPIPE_TEST_DEVICE)")
def test_on_a_gpu_each_worker_computes_on_its_own_stream() -> None:
    probes = [StreamProbe(), StreamProbe()]
    pipe = gpipe.Pipe(nn.Sequential(*probes), balance=[1, 1], chunks=2, devices=[DEV, DEV])
    x = torch.randn(4, D, device=DEV)
    pipe.step(x, x, lambda o, t: ((o - t) ** 2).mean())
    compute = pipe._runner.streams.compute
    assert compute[0] != compute[1]
    for d, probe in enumerate(probes):
        assert probe.seen and all(s == compute[d] for s in probe.seen)
        assert all(s != torch.cuda.default_stream(DEV) for s in probe.seen)
    pipe.close()


class TimingEvent:
    """A stand-in for a timing ``torch.cuda.Event``: its "device time" is the order it was
    recorded in (one second apart); waiting for it completes it and every earlier one."""

    def __init__(self, log: list[str], made: list[TimingEvent]) -> None:
        self.t, self.log, self.made, self.done = len(made), log, made, False
        made.append(self)

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.log.append("synchronize")
        for ev in self.made[: self.t + 1]:
            ev.done = True

    def elapsed_time(self, end: TimingEvent) -> float:
        assert self.done and end.done, "elapsed_time of an event not complete"
        return (end.t - self.t) * 1000.0


def test_a_step_never_waits_for_its_gpu_timings_which_are_read_when_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gpipe.core import executor

    log: list[str] = []
    made: list[TimingEvent] = []

    monkeypatch.setattr(executor, "_timed_by_events", lambda device: True)
    monkeypatch.setattr(executor, "_event", lambda: TimingEvent(log, made))
    x, y = batch()
    with gpipe.Pipe(make_model(), balance=[2, 3], chunks=4, devices=["cpu"] * 2) as pipe:
        pipe.step(x, y, loss_fn)
        pipe.step(x, y, loss_fn)
        assert made and log == []  # neither step waited for its events
        timeline = executor.Timeline.of(executor.StepData(1))
        assert timeline.ready() and timeline.resolved() == []
        events = pipe.last_events  # the user asks: now the last step's events are read
        assert log and len(events) == 2 * 4 * 2
        # device times: each action spans the events recorded around it (whole seconds apart
        # here), not the host clock's
        for e in events:
            span = e.end - e.start
            assert span >= 1 and span == pytest.approx(round(span), abs=1e-9)
        assert events == sorted(events, key=lambda e: (e.start, e.device))
        n = len(log)
        assert pipe.last_events == events and len(log) == n  # read once
