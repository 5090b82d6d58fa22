"""The distributed transport's point-to-point operations, replayed under NCCL's ordering rules.

NCCL runs a communicator's operations in the order each rank issued them, and a receive holds
back every later operation on that communicator until its send arrives; gloo has no such rule,
so a protocol that deadlocks on GPUs can pass every gloo test. Here K spawned gloo ranks run
every schedule for three steps with the transport issuing as it does on a GPU (every message
with its header, each flush one ``batch_isend_irecv`` per group) and record, per rank, each
batch of operations (group, send or receive, peer, bytes, tag) and each wait on one; the
replay (tests/dist/nccl_model.py) then runs those sequences under NCCL's rules. The first step sends
every tensor on the gloo header group (no sizes are known yet), the second and third go direct
on the point-to-point groups: the steady state of training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gpipe import schedules
from nccl_model import Event, Issue, Op, Wait, replay
from spawn_ranks import gloo_results

pytestmark = pytest.mark.timeout(300)

SCHEDULES = schedules.available()
STEPS = 3
LAYERS = 16


class _Recorder:
    """Wraps ``torch.distributed``'s ``new_group`` and point-to-point functions (in both
    namespaces: ``P2POp`` compares its op with ``distributed_c10d``'s own) and records
    :mod:`nccl_model` events: each group by the order of its creation, which is the same on
    every rank."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.host: set[int] = set()  # groups made with backend="gloo"
        self._groups: dict[int, tuple[int, Any]] = {}  # id -> (number, the group, kept alive)
        self._made = 0
        self._ids = 0
        self._batching = False

    def install(self) -> None:
        import torch.distributed as dist
        from torch.distributed import distributed_c10d as c10d

        orig = {n: getattr(c10d, n) for n in ("new_group", "isend", "irecv", "batch_isend_irecv")}

        def new_group(*args: Any, **kwargs: Any) -> Any:
            group = orig["new_group"](*args, **kwargs)
            if kwargs.get("backend") == "gloo":
                self.host.add(self._made)
            self._groups.setdefault(id(group), (self._made, group))
            self._made += 1
            return group

        def single(name: str) -> Any:
            def wrapper(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                work = orig[name](tensor, *args, **kwargs)
                if self._batching:
                    return work
                group = kwargs["group"]
                peer_arg = kwargs.get("group_dst", kwargs.get("group_src"))
                peer = dist.get_global_rank(group, peer_arg)
                kind = "send" if name == "isend" else "recv"
                op = Op(kind, peer, _nbytes(tensor), kwargs.get("tag", 0))
                (i,) = self._issue(group, [op])
                return _Work(work, i, self.events)

            return wrapper

        isend, irecv = single("isend"), single("irecv")

        def batch(p2p_ops: list[Any]) -> list[Any]:
            self._batching = True
            try:
                works = orig["batch_isend_irecv"](p2p_ops)
            finally:
                self._batching = False
            ops = [
                Op(
                    "send" if o.op in (isend, orig["isend"]) else "recv",
                    o.peer,
                    _nbytes(o.tensor),
                    o.tag,
                )
                for o in p2p_ops
            ]
            ids = self._issue(p2p_ops[0].group, ops)
            if len(works) == len(ids):
                return [_Work(w, i, self.events) for w, i in zip(works, ids, strict=True)]
            return [_Work(w, ids[0], self.events) for w in works]  # NCCL's one coalesced work

        fns = {"new_group": new_group, "isend": isend, "irecv": irecv, "batch_isend_irecv": batch}
        for name, fn in fns.items():
            setattr(dist, name, fn)
            setattr(c10d, name, fn)

    def _issue(self, group: Any, ops: list[Op]) -> tuple[int, ...]:
        ids = tuple(range(self._ids, self._ids + len(ops)))
        self._ids += len(ops)
        self.events.append(Issue(self._groups[id(group)][0], tuple(ops), ids))
        return ids


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Work:
    """A work whose ``wait`` is recorded as a :class:`nccl_model.Wait`."""

    def __init__(self, work: Any, op_id: int, events: list[Event]) -> None:
        self._work, self._id, self._events = work, op_id, events

    def wait(self, *args: Any, **kwargs: Any) -> Any:
        self._events.append(Wait(self._id))
        return self._work.wait(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _balance(num_stages: int) -> list[int]:
    q, r = divmod(LAYERS, num_stages)
    return [q + (s < r) for s in range(num_stages)]


def _scenario(rank: int, path: Path) -> None:
    import torch.distributed as dist

    from gpipe.dist.pipe import DistributedPipe

    rec = _Recorder()
    rec.install()
    k = dist.get_world_size()
    out: dict[str, list[Event]] = {}
    for name in SCHEDULES:
        torch.manual_seed(0)
        model = nn.Sequential(
            *(nn.Linear(4, 4) if i % 2 == 0 else nn.Tanh() for i in range(LAYERS))
        )
        v = schedules.ScheduleSpec(name).placement(k)
        m = 2 * k
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(2 * m, 4, generator=g), torch.randint(0, 4, (2 * m,), generator=g)
        balance = _balance(len(v))
        with DistributedPipe(model, chunks=m, balance=balance, schedule=name, timeout=30) as pipe:
            transport = pipe.parts.transport  # the GPU path's way of issuing, on gloo
            transport.inline = False
            transport.coalesce = True
            rec.events = []
            for _ in range(STEPS):
                pipe.step(x, y, F.cross_entropy)
            out[name] = rec.events
    torch.save({"events": out, "host": rec.host}, path / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def recorded(tmp_path_factory) -> dict[int, dict[str, Any]]:
    """Per K, every rank's recording, recorded at first use (one spawn of K ranks)."""
    cache: dict[int, dict[str, Any]] = {}

    def get(k: int) -> dict[str, Any]:
        if k not in cache:
            tmp = tmp_path_factory.mktemp(f"nccl{k}")
            ranks = gloo_results(_scenario, tmp, world=k, limit=240)
            cache[k] = {"host": ranks[0]["host"], "events": [r["events"] for r in ranks]}
        return cache[k]

    return get


@pytest.mark.parametrize(
    "k", [2, pytest.param(3, marks=pytest.mark.slow), pytest.param(4, marks=pytest.mark.slow)]
)
def test_every_schedule_completes_under_nccl_ordering(recorded, k):
    got = recorded(k)
    failures = {}
    for name in SCHEDULES:
        logs = {r: got["events"][r][name] for r in range(k)}
        issued = [e for log in logs.values() for e in log if isinstance(e, Issue)]
        direct = [e for e in issued if e.group not in got["host"]]
        assert direct, f"{name}, K={k}: no tensor went on a point-to-point group"
        # the communicators' order alone, then with each host blocking where it waits
        for host_waits in (False, True):
            stuck = replay(logs, got["host"], host_waits)
            if stuck is not None:
                failures[name, host_waits] = stuck
    assert not failures, f"K={k}: deadlocks under NCCL's ordering: {failures}"


# ---------------------------------------------------------------------- the model itself


def _send(peer: int, n: int = 4) -> Op:
    return Op("send", peer, n)


def _recv(peer: int, n: int = 4) -> Op:
    return Op("recv", peer, n)


def _two_ranks(grads: int) -> dict[int, list[Event]]:
    """Rank 0 posts the receive of g0 ahead of sending a0, a1 (on group 5); rank 1 receives a0
    and a1, waits for them, then sends g0; the gradient travels on group ``grads``."""
    return {
        0: [
            Issue(grads, (_recv(1),), (0,)),
            Issue(5, (_send(1),), (1,)),
            Issue(5, (_send(1),), (2,)),
            Wait(0),
        ],
        1: [
            Issue(5, (_recv(0),), (0,)),
            Issue(5, (_recv(0),), (1,)),
            Wait(0),
            Wait(1),
            Issue(grads, (_send(0),), (2,)),
        ],
    }


def test_the_model_deadlocks_receives_posted_ahead_on_one_communicator():
    # one group for both ways: rank 0's receive of g0 holds back its sends of a0, a1
    logs = _two_ranks(grads=5)
    stuck = replay(logs, set())
    assert "rank 1 waits" in stuck and "the peer's is queued behind an earlier batch" in stuck
    assert "never complete" in replay(logs, set(), host_waits=False)
    # the same operations on gloo (no in-order rule) complete
    assert replay(logs, {5}) is None
    # one group per direction: the receive of g0 no longer holds back the sends of a0, a1
    assert replay(_two_ranks(grads=6), set()) is None


def test_the_model_matches_within_a_batch_in_any_order_and_checks_sizes():
    # each rank's one batch sends before it receives: both batches have started, so they meet
    logs = {
        0: [Issue(1, (_send(1), _recv(1)), (0, 1)), Wait(1)],
        1: [Issue(1, (_send(0), _recv(0)), (0, 1)), Wait(1)],
    }
    assert replay(logs, set()) is None
    bad = {0: [Issue(1, (_send(1, 8),), (0,))], 1: [Issue(1, (_recv(0, 4),), (0,))]}
    assert "8 bytes" in replay(bad, set())
    lonely = {0: [Issue(1, (_send(1),), (0,))], 1: []}
    assert replay(lonely, set()) is not None
