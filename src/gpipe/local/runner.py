"""One step at a time in one process: the device loops of a step over a pool of workers.

:class:`LocalRunner` is what ``gpipe.Pipe`` drives a step with. It hands each worker of a
:class:`~gpipe.local.workers.WorkerPool` the executor loop over its device's actions — on
its device's compute stream, with boundary values through :mod:`gpipe.local.streams` —
marks the step cancelled when it is abandoned and replaces a pool whose worker never came
back from a failed step.

The invariant: at most one step (a ``step``, a ``pipe(x)`` or its backward) runs on a runner
at a time; a call from another thread waits for it (bounded by ``2 × timeout + 60 s``), and
a call from inside the running step (a loss function, a layer, a hook) is refused instead of
deadlocking.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from gpipe.core.executor import StepData, execute
from gpipe.core.mailbox import QueueTransport
from gpipe.local.streams import Arriving, DeviceStreams, StreamedTransport
from gpipe.local.workers import ThreadState, WorkerPool
from gpipe.stage.stage import Stage

__all__ = ["LocalRunner"]


class LocalRunner:
    """Runs steps on one worker thread per device of ``devices``.

    ``threads_per_worker`` (CPU only) caps each worker's intra-op threads; ``timeout`` bounds
    every wait for a boundary value. The workers start with :meth:`start`.
    """

    def __init__(
        self,
        devices: Sequence[torch.device],
        threads_per_worker: int | None,
        timeout: float,
    ) -> None:
        self.devices = list(devices)
        self.threads_per_worker = threads_per_worker
        self.timeout = timeout
        self.transport = QueueTransport(timeout)
        self.streams = DeviceStreams(self.devices)
        self.pool: WorkerPool | None = None
        self._lock = threading.Lock()
        self._owner: int | None = None

    def start(self) -> None:
        """Start the workers (one per device)."""
        self.pool = WorkerPool(
            len(self.devices), self.transport, self.threads_per_worker, self.devices
        )

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self.pool is not None:
            self.pool.close()

    @contextlib.contextmanager
    def owned(self, what: str) -> Iterator[None]:
        """Hold the runner for one step: a concurrent call from another thread waits for it (a
        step is bounded by ``timeout``); a call from inside the running step is refused."""
        me = threading.get_ident()
        if self._owner == me or (self.pool is not None and self.pool.runs_on(me)):
            raise RuntimeError(
                f"{what} was called from inside a running step of the same Pipe (from loss_fn, "
                "a layer or a hook); a pipe runs one step at a time — call it after the step"
            )
        limit = self.timeout * 2 + 60
        if not self._lock.acquire(timeout=limit):
            raise TimeoutError(
                f"{what} waited {limit:.0f}s for another thread's step on this Pipe to finish"
            )
        self._owner = me
        try:
            yield
        finally:
            self._owner = None
            self._lock.release()

    def run(
        self,
        stages: Sequence[Stage],
        per_device: Sequence[Sequence[Any]],
        data: StepData,
        state: ThreadState | None,
        placement: Sequence[int],
    ) -> None:
        """Run device ``d``'s actions ``per_device[d]`` on its stages, all devices at once.

        Afterwards, also when the step fails, ``data.events`` is the step's timeline sorted by
        start, in host times; actions on GPUs also left CUDA events in ``data.gpu_marks``,
        which :class:`~gpipe.core.executor.Timeline` turns into device times when they are
        read (the step itself never waits for the GPU). ``state`` is the grad mode the jobs run under (default: the caller's;
        autocast is each step's own, applied by its stages). ``placement[s]`` is the device
        of stage ``s``: the schedule's placement, never a default.
        """
        assert self.pool is not None, "start() the runner first"
        k = len(self.devices)

        def where(s: int) -> int:
            return placement[s]

        by_device = [{st.index: st for st in stages if placement[st.index] == d} for d in range(k)]
        if self.pool.stuck:  # a worker never returned from a failed step: start afresh
            self.pool.close()
            self.transport = QueueTransport(self.timeout)
            self.start()
        streams, first, last = self.streams, where(0), where(data.num_stages - 1)
        if streams.active:  # the caller's values, ready for the workers that read them
            for name, d in (("inputs", first), ("targets", last), ("grad_outputs", last)):
                values = getattr(data, name)
                if values is not None:
                    setattr(data, name, Arriving(streams, values, d))
        marks, ends = streams.begin(), {}
        jobs = [
            functools.partial(
                self._job, d, per_device[d], by_device[d], self.transport, data, marks, ends, where
            )
            for d in range(k)
        ]

        def cancel() -> None:
            data.cancelled = True

        try:
            self.pool.run(jobs, on_abort=cancel, state=state)
        finally:
            streams.join(ends)
            streams.hand_back(data.outputs, data.losses, data.input_grads, data.fetched)
            data.events.sort(key=lambda e: (e.start, e.device))

    def _job(
        self,
        d: int,
        actions: Sequence[Any],
        stages: dict[int, Stage],
        transport: QueueTransport,
        data: StepData,
        marks: list[Any],
        ends: dict[int, Any],
        where: Callable[[int], int],
    ) -> None:
        """Worker ``d``'s part of a step, on its compute stream: wait for the caller's
        values, run the actions, mark the end of what it queued."""
        streams = self.streams
        if streams.active:
            transport = StreamedTransport(transport, streams, d, where)
        with streams.computing(d):
            streams.enter(d, marks)
            try:
                execute(d, actions, stages, transport, data)
            finally:
                ends[d] = streams.leave(d)
