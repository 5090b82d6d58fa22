"""Value checks for ``gpipe.local.workers`` by itself: the queue transport (delivery, timeout
message, abort, reset), the thread state a worker re-applies (grad mode but not autocast, autograd
multithreading off) and the worker pool (one job per thread, the first StageError wins, abort
callback, closed pool, intra-op threads). They kill the local-runtime mutants the pipe tests
let live (docs/mutation.md)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gpipe.core.executor import Aborted, StageError
from gpipe.core.mailbox import QueueTransport
from gpipe.local.workers import ThreadState, WorkerPool
from gpipe.schedules import Action


def test_transport_delivers_by_kind_stage_and_microbatch() -> None:
    t = QueueTransport(timeout=5.0)
    t.send("act", 1, 0, "a10")
    t.send("grad", 1, 0, "g10")
    t.send("act", 1, 1, "a11")
    assert t.recv("act", 1, 1) == "a11"
    assert t.recv("grad", 1, 0) == "g10"
    assert t.recv("act", 1, 0) == "a10"


def test_transport_waits_for_a_late_send() -> None:
    t = QueueTransport(timeout=5.0)
    timer = threading.Timer(0.05, lambda: t.send("act", 2, 3, 7))
    timer.start()
    assert t.recv("act", 2, 3) == 7
    timer.join()


@pytest.mark.parametrize(("kind", "word"), [("act", "activation"), ("grad", "gradient")])
def test_transport_timeout_names_what_it_waited_for(kind: str, word: str) -> None:
    t = QueueTransport(timeout=0.05)
    with pytest.raises(TimeoutError) as info:
        t.recv(kind, 2, 5)
    assert str(info.value) == f"waited 0s for the {word} of micro-batch 5 for stage 2"


def test_transport_keeps_waiting_after_another_delivery() -> None:
    # a delivery for someone else wakes the waiter 0.9 s before its deadline: it waits on
    t = QueueTransport(timeout=1.5)
    timers = [
        threading.Timer(0.6, lambda: t.send("act", 9, 9, "other")),
        threading.Timer(0.8, lambda: t.send("act", 1, 0, "mine")),
    ]
    for timer in timers:
        timer.start()
    assert t.recv("act", 1, 0) == "mine"
    for timer in timers:
        timer.join()


def test_transport_abort_and_reset() -> None:
    t = QueueTransport(timeout=5.0)
    assert t.aborted is False
    timer = threading.Timer(0.05, t.abort)
    timer.start()
    with pytest.raises(Aborted):
        t.recv("act", 0, 0)
    timer.join()
    assert t.aborted is True
    t.send("act", 0, 0, 1)
    t.reset()
    assert t.aborted is False
    t2 = QueueTransport(timeout=0.05)
    t2.send("act", 0, 0, 1)
    t2.reset()
    with pytest.raises(TimeoutError):
        t2.recv("act", 0, 0)  # undelivered values are forgotten


def _in_thread(fn):
    out = {}

    def run() -> None:
        out["v"] = fn()

    th = threading.Thread(target=run)
    th.start()
    th.join()
    return out["v"]


def test_thread_state_carries_grad_mode_but_not_autocast() -> None:
    # autocast is each step's, applied by its stages to forwards only (gpipe.stage.amp): a job runs
    # without it, so a backward on a worker never sees the caller's region
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        state = ThreadState()
    assert state.grad is False
    seen = {}

    def job() -> None:
        seen["grad"] = torch.is_grad_enabled()
        seen["autocast"] = torch.is_autocast_enabled("cpu")
        seen["mt"] = torch.autograd.is_multithreading_enabled()

    _in_thread(lambda: state.apply(job))
    assert seen == {"grad": False, "autocast": False, "mt": False}
    plain = ThreadState()
    assert plain.grad is True
    _in_thread(lambda: plain.apply(job))
    assert (seen["grad"], seen["autocast"]) == (True, False)
    assert torch.is_autocast_enabled("cpu") is False  # left as it was


def test_pool_runs_job_i_on_worker_i() -> None:
    pool = WorkerPool(2, QueueTransport(timeout=5.0), threads_per_worker=1)
    try:
        assert pool.size == 2 and pool.alive and not pool.stuck
        assert all(t.daemon for t in pool._threads)  # never keep the process alive
        assert QueueTransport().timeout == 300.0
        seen: dict[int, tuple[str, int, bool]] = {}

        def job(i: int):
            def run() -> None:
                me = threading.current_thread()
                seen[i] = (me.name, torch.get_num_threads(), pool.runs_on(me.ident))

            return run

        pool.run([job(0), job(1)])
        assert seen == {0: ("gpipe-device-0", 1, True), 1: ("gpipe-device-1", 1, True)}
        assert pool.runs_on(threading.get_ident()) is False
        with pytest.raises(ValueError) as info:
            pool.run([job(0)])
        assert str(info.value) == "expected 2 jobs, got 1"
        pool._stuck = True  # as after a worker that never came back
        with pytest.raises(RuntimeError) as info:
            pool.run([job(0), job(1)])
        assert str(info.value) == "a worker of this pipeline is stuck in a layer; build a new Pipe"
        pool._stuck = False
    finally:
        pool.close()
    assert not pool.alive
    with pytest.raises(RuntimeError) as info:
        pool.run([lambda: None, lambda: None])
    assert str(info.value) == "this pipeline's workers were closed; build a new Pipe"


def test_pool_raises_the_stage_error_after_aborting_the_others() -> None:
    transport = QueueTransport(timeout=5.0)
    pool = WorkerPool(3, transport)
    aborted = []
    err = StageError(Action("B", 1, 0), 1, ValueError("bad"))

    def fail() -> None:
        raise err

    def wait() -> None:
        transport.recv("act", 0, 0)  # woken by the abort

    def other() -> None:
        raise KeyError("second")

    try:
        with pytest.raises(StageError) as info:
            pool.run([wait, other, fail], on_abort=lambda: aborted.append(1))
        assert info.value is err
        assert aborted == [1]  # once, however many workers fail
        assert not pool.stuck
        with pytest.raises(KeyError):
            pool.run([lambda: None, other, wait])
        pool.run([lambda: None] * 3)  # ready for the next step
        assert transport.aborted is False
    finally:
        pool.close()


def _fail() -> None:
    raise StageError(Action("F", 0, 0), 0, ValueError("bad"))


def test_pool_abandons_a_worker_busy_past_the_timeout() -> None:
    # after a failure the others get transport.timeout (0.2 s) to stop; one busy in its own
    # code for 3 s is abandoned: the failure is raised at once and the pool reports stuck
    pool = WorkerPool(2, QueueTransport(timeout=0.2))
    aborted: list[int] = []
    start = time.monotonic()
    try:
        with pytest.raises(StageError):
            pool.run([_fail, lambda: time.sleep(3.0)], on_abort=lambda: aborted.append(1))
        assert time.monotonic() - start < 0.9  # not a second more, not until the layer returns
        assert pool.stuck is True
        assert aborted == [1, 1]  # when the failure came in, and when the worker was abandoned
    finally:
        pool.close()


def test_pool_waits_for_a_worker_that_finishes_within_the_timeout() -> None:
    pool = WorkerPool(2, QueueTransport(timeout=1.0))
    try:
        with pytest.raises(StageError):
            pool.run([_fail, lambda: time.sleep(0.05)])
        assert pool.stuck is False
        pool.run([lambda: time.sleep(0.05), lambda: None])  # jobs longer than 0.01 s are fine
    finally:
        pool.close()
