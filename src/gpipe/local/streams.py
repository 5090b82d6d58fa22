"""CUDA streams, events and copies of the one-process runtime — the only module that knows them.

Each pipeline device ``d`` on a GPU gets two streams of its own: ``compute[d]``, on which its
worker runs every action (forward, recompute, backward; autograd runs a backward kernel on
the stream of its forward), and ``copy[d]``, on which boundary values to and from it are
copied, so a transfer overlaps the compute of other micro-batches. The rules:

* **Out.** A boundary value leaves worker ``p`` with an event recorded on ``compute[p]``
  after the action that wrote it. A copy to another device runs with the copy streams of
  both ends current (a cross-device copy in PyTorch runs on the source device's current
  stream and fences the destination's), after both waited on that event, with
  ``non_blocking=True``; an event is recorded on each copy stream after it.
* **In.** Before worker ``q``'s action reads the value, ``compute[q]`` waits on those events
  (a CPU consumer waits for them on the host). A value passed on within one device to
  another worker needs no copy, only the wait on the producer's event.
* **Allocator.** ``record_stream`` on every tensor used on a stream other than the one it
  was allocated on: the source on the copy streams that read it, the copy on the consumer's
  compute stream, a same-device hand-off on the consumer's compute stream, the caller's
  values on the compute stream of the worker that reads them, the step's results on the
  caller's current stream. So no block is reused while another stream may still read it.
* **Step edges.** A step begins with every compute stream waiting on the caller's current
  streams (values the caller made are complete) and ends with the caller's current streams
  waiting on every compute stream (what the caller reads afterwards is complete). A caller's
  tensor on another GPU than the worker that reads it is copied by the caller, under its own
  streams, before the step.

The invariant: no kernel reads a tensor before the kernels that wrote it completed, and no
memory is handed out again while a kernel on any stream may still read it. On a pipe without
GPUs every function here is a no-op that returns its argument: same interface, no CUDA call.

The CUDA calls go through :data:`OPS` (a :class:`CudaOps`), so tests can count and order them
with a fake on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gpipe.base.microbatch import tree_flatten
from gpipe.schedules import device_of

__all__ = [
    "OPS",
    "CudaOps",
    "DeviceStreams",
    "Parcel",
    "StreamedTransport",
    "indexed",
    "streamed",
]


class CudaOps:
    """The CUDA calls of this module, in one place (a test swaps in a recording fake)."""

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    def current_stream(self, device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    def new_event(self) -> Any:
        return torch.cuda.Event()

    def record(self, event: Any, stream: Any) -> None:
        event.record(stream)

    def wait(self, stream: Any, event: Any) -> None:
        stream.wait_event(event)

    def synchronize(self, event: Any) -> None:
        event.synchronize()

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        tensor.record_stream(stream)

    @contextlib.contextmanager
    def use(self, streams: Sequence[Any]) -> Iterator[None]:
        """Make each of ``streams`` its device's current stream in this thread."""
        with contextlib.ExitStack() as stack:
            for s in streams:
                stack.enter_context(torch.cuda.stream(s))
            yield

    def copy(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return tensor.to(device, non_blocking=True)


OPS: Any = CudaOps()


def streamed(device: torch.device) -> bool:
    """Whether work on ``device`` is ordered by streams and events (CUDA), not by the host."""
    return device.type == "cuda"


def _needs_copy(src: torch.device, dst: torch.device) -> bool:
    return src != dst


def indexed(device: torch.device) -> torch.device:
    """``cuda`` as the ``cuda:i`` it means here (the current device), so that it compares
    equal to its tensors' devices and ``torch.cuda.set_device`` accepts it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


@dataclass
class Parcel:
    """A boundary value in flight between two workers, with the events its reader waits on."""

    value: Any
    events: list[Any] = field(default_factory=list)


class DeviceStreams:
    """The compute and copy stream of each pipeline device (``None`` for one without CUDA)."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.ops = OPS
        self.devices = [indexed(torch.device(d)) for d in devices]
        self.on = [streamed(d) for d in self.devices]
        self.active = any(self.on)
        self.compute = [self.ops.new_stream(d) if on else None for d, on in self._pairs()]
        self.copy = [self.ops.new_stream(d) if on else None for d, on in self._pairs()]

    def _pairs(self) -> list[tuple[torch.device, bool]]:
        return list(zip(self.devices, self.on, strict=True))

    def _caller_devices(self) -> list[torch.device]:
        return list(dict.fromkeys(d for d, on in self._pairs() if on))

    # ------------------------------------------------------------- a worker's job

    @contextlib.contextmanager
    def computing(self, d: int) -> Iterator[None]:
        """Run the body (worker ``d``'s actions) on ``compute[d]``."""
        if not self.on[d]:
            yield
            return
        with self.ops.use([self.compute[d]]):
            yield

    def begin(self) -> list[Any]:
        """In the caller: events on its current streams, which every worker waits on first."""
        marks = []
        for dev in self._caller_devices():
            ev = self.ops.new_event()
            self.ops.record(ev, self.ops.current_stream(dev))
            marks.append(ev)
        return marks

    def enter(self, d: int, marks: Sequence[Any]) -> None:
        """In worker ``d``: its compute stream waits on the caller's ``marks``."""
        if self.on[d]:
            for ev in marks:
                self.ops.wait(self.compute[d], ev)

    def leave(self, d: int) -> Any:
        """In worker ``d``: an event after everything its job queued (``None`` off CUDA)."""
        if not self.on[d]:
            return None
        ev = self.ops.new_event()
        self.ops.record(ev, self.compute[d])
        return ev

    def join(self, ends: dict[int, Any]) -> None:
        """In the caller: its current stream on each device waits on that device's workers."""
        for d, ev in sorted(ends.items()):
            if ev is not None:
                self.ops.wait(self.ops.current_stream(self.devices[d]), ev)

    # ------------------------------------------------------------- caller <-> worker values

    def hand_over(self, obj: Any, d: int) -> Any:
        """``obj``, from the caller, for worker ``d``: a tensor on another GPU is copied here
        (under the caller's streams), and each tensor on ``d``'s GPU is marked as used on
        ``compute[d]``. CPU tensors stay: the worker copies them under its compute stream."""
        if not self.on[d]:
            return obj
        dev = self.devices[d]
        leaves, rebuild = tree_flatten(obj)
        out = []
        for _, v in leaves:
            if isinstance(v, torch.Tensor) and streamed(v.device):
                if _needs_copy(v.device, dev):
                    v = v.to(dev)
                self.ops.record_stream(v, self.compute[d])
            out.append(v)
        return rebuild(out)

    def hand_back(self, *objs: Any) -> None:
        """Mark the step's results (made on compute streams) as used on the caller's streams."""
        if not self.active:
            return
        for obj in objs:
            for _, v in tree_flatten(obj)[0]:
                if isinstance(v, torch.Tensor) and streamed(v.device):
                    self.ops.record_stream(v, self.ops.current_stream(v.device))

    # ------------------------------------------------------------- worker -> worker values

    def send(self, value: Any, p: int, q: int) -> Any:
        """In worker ``p``: ``value`` on its way to worker ``q`` (a :class:`Parcel`)."""
        if not (self.on[p] or self.on[q]):
            return value
        ops, dst = self.ops, self.devices[q]
        leaves, rebuild = tree_flatten(value)
        tensors = [v for _, v in leaves if isinstance(v, torch.Tensor)]
        ready = None
        if self.on[p] and tensors:
            ready = ops.new_event()
            ops.record(ready, self.compute[p])
        moving = [_needs_copy(t.device, dst) for t in tensors]
        lanes = [s for s in (self.copy[p], self.copy[q]) if s is not None]
        if any(moving) and ready is not None:
            for s in lanes:
                ops.wait(s, ready)
        copies = iter(self._copies(tensors, moving, p, q, lanes))
        out = [next(copies) if isinstance(v, torch.Tensor) else v for _, v in leaves]
        events = []
        if any(moving):
            for s in lanes:
                ev = ops.new_event()
                ops.record(ev, s)
                events.append(ev)
        if ready is not None and not all(moving) and p != q:
            events.append(ready)
        return Parcel(rebuild(out), events)

    def _copies(
        self, tensors: list[torch.Tensor], moving: list[bool], p: int, q: int, lanes: list[Any]
    ) -> list[torch.Tensor]:
        ops, dst, out = self.ops, self.devices[q], []
        for t, move in zip(tensors, moving, strict=True):
            if not move:
                if p != q and self.on[q]:
                    ops.record_stream(t, self.compute[q])  # read on another worker's stream
                out.append(t)
                continue
            with ops.use(lanes):
                y = ops.copy(t, dst)
            for s, dev in ((self.copy[p], self.devices[p]), (self.copy[q], dst)):
                if s is not None and dev == t.device:
                    ops.record_stream(t, s)  # read by the copy, made on another stream
            if self.on[q]:
                ops.record_stream(y, self.compute[q])  # made on copy[q], read on compute[q]
            out.append(y)
        return out

    def receive(self, parcel: Any, q: int) -> Any:
        """In worker ``q``: the value of ``parcel``, once its reader may use it."""
        if not isinstance(parcel, Parcel):
            return parcel
        for ev in parcel.events:
            if self.on[q]:
                self.ops.wait(self.compute[q], ev)
            else:
                self.ops.synchronize(ev)  # a CPU reader waits for the copy on the host
        return parcel.value


class StreamedTransport:
    """Worker ``device``'s view of a transport: values leave and arrive through
    :meth:`DeviceStreams.send` / :meth:`DeviceStreams.receive`. ``where(s)`` is the worker
    of stage ``s`` (default ``s % K``)."""

    def __init__(
        self,
        inner: Any,
        streams: DeviceStreams,
        device: int,
        where: Callable[[int], int] | None = None,
    ) -> None:
        self.inner = inner
        self.streams = streams
        self.device = device
        k = len(streams.devices)
        self.where = where or (lambda s: device_of(s, k))

    def send(self, kind: str, stage: int, microbatch: int, value: Any) -> None:
        q = self.where(stage)
        self.inner.send(kind, stage, microbatch, self.streams.send(value, self.device, q))

    def recv(self, kind: str, stage: int, microbatch: int) -> Any:
        return self.streams.receive(self.inner.recv(kind, stage, microbatch), self.device)
