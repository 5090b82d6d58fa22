"""The one-process runtime: one long-lived worker thread per device, queues between them.

Each worker runs :func:`gpipe.core.executor.execute` over its device's actions; boundary
values travel through a :class:`gpipe.core.mailbox.QueueTransport` (a dictionary of mailboxes under one condition
variable) and move to the receiving stage's device when the stage takes them.

The invariant: :meth:`WorkerPool.run` returns only when every worker has finished its job, and
if any worker failed it raises that worker's :class:`StageError` after the others have been
aborted and have stopped — never a hang (every wait is bounded by ``timeout``), and the pool is
ready for the next step.

On CPU each worker limits PyTorch's intra-op threads to its share of the cores, so K stages
computing at once do not oversubscribe the machine; the grad mode of the calling thread is
applied in the workers for each job. Autocast is not: the stages apply their step's own to
forwards and none to backwards (:mod:`gpipe.stage.amp`), so a job runs without it.
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence

import torch

from gpipe.core.executor import Aborted, StageError
from gpipe.core.mailbox import QueueTransport

__all__ = ["ThreadState", "WorkerPool"]


class ThreadState:
    """Thread-local torch state captured in the caller and re-applied in a worker: grad
    mode (autocast belongs to each step's forwards, :mod:`gpipe.stage.amp`)."""

    def __init__(self) -> None:
        self.grad = torch.is_grad_enabled()

    def apply(self, fn: Callable[[], None]) -> None:
        # Backward runs on this worker thread, not on autograd's per-device thread: a user's
        # loss.backward() on CUDA reaches the pipe's bridge on that device thread, which then
        # waits for the workers; their own backward queued behind it would never run.
        with torch.set_grad_enabled(self.grad), torch.autograd.set_multithreading_enabled(False):
            fn()


def _worker(
    jobs: queue.Queue,
    results: queue.Queue,
    index: int,
    threads: int | None,
    device: torch.device | None,
) -> None:
    broken: BaseException | None = None
    try:
        if threads is not None:
            torch.set_num_threads(threads)
        if device is not None and device.type == "cuda":
            torch.cuda.set_device(device)  # a layer's device="cuda" tensors land on its GPU
    except Exception as e:  # every job then reports it, rather than a silent dead worker
        broken = RuntimeError(f"worker {index} could not start on {device}: {e}")
    while True:
        job = jobs.get()
        if job is None:
            return
        fn, state = job
        if broken is not None:
            results.put((index, broken))
            continue
        try:
            state.apply(fn)
            results.put((index, None))
        except BaseException as e:
            results.put((index, e))


class WorkerPool:
    """``size`` daemon threads; ``run(jobs)`` runs ``jobs[i]`` on thread ``i`` and waits.

    ``threads_per_worker`` (CPU only) caps each worker's intra-op threads. The threads stop
    when :meth:`close` is called or the pool is garbage-collected.
    """

    def __init__(
        self,
        size: int,
        transport: QueueTransport,
        threads_per_worker: int | None = None,
        devices: Sequence[torch.device] | None = None,
    ):
        self.size = size
        self.transport = transport
        self._jobs = [queue.Queue() for _ in range(size)]
        self._results: queue.Queue = queue.Queue()
        self._threads = [
            threading.Thread(
                target=_worker,
                args=(
                    self._jobs[i],
                    self._results,
                    i,
                    threads_per_worker,
                    None if devices is None else devices[i],
                ),
                name=f"gpipe-device-{i}",
                daemon=True,
            )
            for i in range(size)
        ]
        for t in self._threads:
            t.start()
        self._finalizer = weakref.finalize(self, WorkerPool._stop, self._jobs, self._threads)
        self._stuck = False

    @staticmethod
    def _stop(jobs: list[queue.Queue], threads: list[threading.Thread]) -> None:
        for q in jobs:
            q.put(None)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=5)

    def close(self) -> None:
        """Stop the worker threads (idempotent). A stuck worker is told to stop when it comes
        back and is not waited for."""
        if self._stuck and self._finalizer.alive:
            self._finalizer.detach()
            for q in self._jobs:
                q.put(None)
            return
        self._finalizer()

    def runs_on(self, ident: int) -> bool:
        """Whether the thread ``ident`` is one of this pool's workers."""
        return any(t.ident == ident for t in self._threads)

    @property
    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    @property
    def stuck(self) -> bool:
        """True when a worker never came back from a failed step; build a new pool."""
        return self._stuck

    def run(
        self,
        jobs: Sequence[Callable[[], None]],
        on_abort: Callable[[], None] | None = None,
        state: ThreadState | None = None,
    ) -> None:
        """Run one job per worker; raise the first worker failure once the others stopped.

        After a failure the other workers get ``timeout`` seconds to notice the abort (their
        waits wake at once; a layer busy in its own code finishes its action first). A worker
        that is still busy after that is abandoned: the failure is raised anyway and the pool
        reports :attr:`stuck`. ``on_abort`` runs when the step is abandoned (the caller marks
        its step data cancelled so late workers stop before their next action). ``state`` is
        the grad mode the jobs run under (default: the caller's); the backward of ``pipe(x)``
        passes its forward's.
        """
        if not self._finalizer.alive:
            raise RuntimeError("this pipeline's workers were closed; build a new Pipe")
        if self._stuck:
            raise RuntimeError("a worker of this pipeline is stuck in a layer; build a new Pipe")
        if len(jobs) != self.size:
            raise ValueError(f"expected {self.size} jobs, got {len(jobs)}")
        self.transport.reset()
        state = state or ThreadState()
        for q, fn in zip(self._jobs, jobs):
            q.put((fn, state))
        errors: list[BaseException] = []
        pending = self.size
        # Workers bound their own waits; this loop only adds a last-resort limit for a job that
        # never returns (a layer stuck in its own code).
        limit = self.transport.timeout * 2 + 60
        deadline = time.monotonic() + limit
        while pending:
            try:
                _, err = self._results.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.transport.abort()
                if on_abort is not None:
                    on_abort()
                self._stuck = True
                if errors:
                    break
                raise TimeoutError(
                    f"pipeline workers did not finish within {limit:.0f}s; a stage is stuck"
                ) from None
            pending -= 1
            if err is not None:
                if not isinstance(err, Aborted):
                    errors.append(err)
                if not self.transport.aborted:
                    self.transport.abort()
                    if on_abort is not None:
                        on_abort()
                    deadline = min(deadline, time.monotonic() + self.transport.timeout)
        if errors:
            first = next((e for e in errors if isinstance(e, StageError)), errors[0])
            raise first
