"""CUDA streams, events and copies of the one-process runtime — the only module that knows them.

Each pipeline worker ``d`` on a GPU computes on a stream of its own, ``compute[d]``: every
action (forward, recompute, backward; autograd runs a backward kernel on the stream of its
forward). Copies run on **one copy lane per directed edge** ``src device -> dst device`` (made
the first time a value crosses that edge): a stream on each end that is a GPU. A lane carries
only that edge's copies, in the order they were produced, so a transfer never queues behind
the compute of a worker it does not come from, nor behind traffic of the other direction or
of another edge. The rules:

* **Out.** A boundary value leaves worker ``p`` with an event ``ready`` recorded on
  ``compute[p]`` after the action that wrote it. Its copy to ``dst`` runs with the edge's
  lane streams current (PyTorch runs a GPU-to-GPU copy on the source device's current stream
  and fences the destination's both ways; a host-device copy on the GPU end's current
  stream), ``non_blocking=True``, after the lane's source-side stream waited on ``ready``
  (that event only). One event ``copied`` is recorded after it on the lane's destination-side
  stream (the source side's for a copy to the host), which is ordered after the copy.
* **In.** Before worker ``q``'s action reads the value, ``compute[q]`` waits on ``copied``
  (a CPU consumer waits for it on the host). A value passed on within one device to another
  worker needs no copy, only the wait on ``ready``.
* **The caller's values.** A CPU tensor the caller hands to a GPU worker (stage 0's inputs,
  the last stage's targets or output gradients) is pinned, per micro-batch, and copied on the
  ``cpu -> GPU`` lane with ``non_blocking=True`` before the step starts; the worker's
  compute stream waits on that micro-batch's ``copied`` event when its first action reads it
  (:class:`Arriving`), so the copy of micro-batch ``m + 1`` overlaps the compute of ``m``.
  Per micro-batch rather than once for the mini-batch: the same bytes are copied to pinned
  memory either way, and the first copy can start as soon as its own micro-batch is pinned.
  A tensor on another GPU is copied by the caller, under its own streams, before the step.
* **Allocator.** ``record_stream`` on every GPU tensor used on a stream other than the one
  it was allocated on: the source on the lane stream that reads it, the copy (allocated on
  the lane's destination stream) on the consumer's compute stream, a same-device hand-off
  on the consumer's compute stream, the caller's values on the compute stream of the worker
  that reads them, the step's results on the caller's current stream. Pinned host memory
  needs nothing more: PyTorch's caching host allocator records an event on the copying
  stream and reuses the block only once that event completed.
* **Step edges.** A step begins with every compute stream waiting on the caller's current
  streams (values the caller made are complete) and ends with the caller's current streams
  waiting on every compute stream (what the caller reads afterwards is complete). The host
  never waits for the GPU in a step (timings are read when asked: ``Pipe.last_events``).

The invariant: no kernel reads a tensor before the kernels (or the copy) that wrote it
completed, no memory is handed out again while a kernel on any stream may still read it, and
a copy waits only on the action that produced its value. On a pipe without GPUs every
function here is a no-op that returns its argument: same interface, no CUDA call.

The CUDA calls go through :data:`OPS` (a :class:`CudaOps`), so tests can count and order them
with a fake on a machine without a GPU.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from gpipe.base.microbatch import tree_flatten
from gpipe.schedules import device_of

__all__ = [
    "OPS",
    "Arriving",
    "CudaOps",
    "DeviceStreams",
    "Lane",
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

    def pin(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` in page-locked host memory (itself if it already is), so that its copy
        to a GPU runs asynchronously on the copying stream."""
        return tensor if tensor.is_pinned() else tensor.pin_memory()


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


@dataclass(eq=False)
class Lane:
    """The copy streams of one directed edge ``src -> dst``: one on each end that is a GPU
    (``None`` on a CPU end; one stream for both ends of an edge within one device)."""

    src: Any
    dst: Any

    @property
    def streams(self) -> list[Any]:
        """The streams made current for a copy on this edge."""
        return [s for s in dict.fromkeys((self.src, self.dst)) if s is not None]

    @property
    def last(self) -> Any:
        """The stream ordered after every copy of this edge (the destination's, else the
        source's): the one its ``copied`` events are recorded on."""
        return self.dst if self.dst is not None else self.src


class DeviceStreams:
    """The compute stream of each pipeline worker (``None`` for one without CUDA) and the copy
    lane of each directed edge between devices (made on first use)."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.ops = OPS
        self.devices = [indexed(torch.device(d)) for d in devices]
        self.on = [streamed(d) for d in self.devices]
        self.active = any(self.on)
        self.compute = [self.ops.new_stream(d) if on else None for d, on in self._pairs()]
        self.lanes: dict[tuple[torch.device, torch.device], Lane] = {}
        self._lanes_lock = threading.Lock()

    def _pairs(self) -> list[tuple[torch.device, bool]]:
        return list(zip(self.devices, self.on, strict=True))

    def _caller_devices(self) -> list[torch.device]:
        return list(dict.fromkeys(d for d, on in self._pairs() if on))

    def lane(self, src: torch.device, dst: torch.device) -> Lane:
        """The copy lane of the edge ``src -> dst`` (workers' threads share it)."""
        with self._lanes_lock:
            lane = self.lanes.get((src, dst))
            if lane is None:
                a = self.ops.new_stream(src) if streamed(src) else None
                b = a if dst == src else self.ops.new_stream(dst) if streamed(dst) else None
                lane = self.lanes[(src, dst)] = Lane(a, b)
            return lane

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
        """``obj``, from the caller, for worker ``d`` (a :class:`Parcel` when copies are in
        flight): a CPU tensor for a GPU worker is pinned and copied on the ``cpu -> GPU``
        lane without blocking; a tensor on another GPU is copied here (under the caller's
        streams); each tensor on ``d``'s GPU is marked as used on ``compute[d]``."""
        if not self.on[d]:
            return obj
        ops, dev = self.ops, self.devices[d]
        leaves, rebuild = tree_flatten(obj)
        out, used = [], []
        for _, v in leaves:
            if isinstance(v, torch.Tensor) and streamed(v.device):
                if _needs_copy(v.device, dev):
                    v = v.to(dev)
                ops.record_stream(v, self.compute[d])
            elif isinstance(v, torch.Tensor) and v.device.type == "cpu":
                lane = self.lane(v.device, dev)
                with torch.no_grad(), ops.use(lane.streams):  # a leaf, as the caller's value
                    y = ops.copy(ops.pin(v), dev)
                v = y.requires_grad_(True) if v.requires_grad else y
                ops.record_stream(v, self.compute[d])  # made on the lane, read on compute[d]
                used.append(lane)
            out.append(v)
        if not used:
            return rebuild(out)
        return Parcel(rebuild(out), [self._mark(lane.last) for lane in _distinct(used)])

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
        ready = None
        if self.on[p] and any(isinstance(v, torch.Tensor) for _, v in leaves):
            ready = self._mark(self.compute[p])
        out, used, handed = [], [], False
        for _, t in leaves:
            if not isinstance(t, torch.Tensor):
                out.append(t)
            elif not _needs_copy(t.device, dst):
                if p != q and self.on[q] and streamed(t.device):
                    ops.record_stream(t, self.compute[q])  # read on another worker's stream
                handed = handed or p != q
                out.append(t)
            else:
                lane = self.lane(t.device, dst)
                if ready is not None and lane.src is not None and all(lane is not u for u in used):
                    ops.wait(lane.src, ready)  # the copy waits on its producer only
                out.append(self._copy(t, lane, q))
                used.append(lane)
        events = [self._mark(lane.last) for lane in _distinct(used)]
        if ready is not None and handed:
            events.append(ready)
        return Parcel(rebuild(out), events)

    def _copy(self, t: torch.Tensor, lane: Lane, q: int) -> torch.Tensor:
        """``t`` copied to worker ``q``'s device on ``lane``, its memory kept safe."""
        ops = self.ops
        with ops.use(lane.streams):
            y = ops.copy(t, self.devices[q])
        if lane.src is not None:
            ops.record_stream(t, lane.src)  # made on a compute stream, read by the copy
        if self.on[q]:
            ops.record_stream(y, self.compute[q])  # made on the lane, read on compute[q]
        return y

    def _mark(self, stream: Any) -> Any:
        ev = self.ops.new_event()
        self.ops.record(ev, stream)
        return ev

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


def _distinct(lanes: list[Lane]) -> list[Lane]:
    return list({id(lane): lane for lane in lanes}.values())


class Arriving(Sequence):
    """The caller's per-micro-batch values for worker ``d`` (:meth:`DeviceStreams.hand_over`
    of each): reading item ``m`` orders the reader's stream after that micro-batch's copy."""

    def __init__(self, streams: DeviceStreams, values: Sequence[Any], d: int) -> None:
        self.streams, self.d = streams, d
        self.parcels = [streams.hand_over(v, d) for v in values]

    def __len__(self) -> int:
        return len(self.parcels)

    def __getitem__(self, m: Any) -> Any:
        if not isinstance(m, int):
            raise TypeError(f"micro-batch index must be an int, got {type(m).__name__}")
        return self.streams.receive(self.parcels[m], self.d)


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
