"""A model of how NCCL runs point-to-point operations, to replay what ranks issued on gloo.

A recorded run is, per rank, its host's sequence of events: ``Issue`` (a batch of operations
on one group, issued together: one ``batch_isend_irecv``, or one ``isend``/``irecv``) and
``Wait`` (the host blocks on one operation's work). :func:`replay` runs those sequences
under NCCL's rules and says whether every rank reaches its end:

- a *communicator* (a group not made with ``backend="gloo"``) runs each rank's batches
  strictly in the order that rank issued them: a batch starts once every earlier batch of that
  rank on that communicator completed, and completes once each of its operations met its
  partner (the operations of one batch may meet in any order);
- a send from ``a`` to ``b`` meets the receive at ``b`` from ``a`` of the same rank order on that
  communicator (NCCL has no tags), and only while both their batches have started; their byte
  sizes must agree;
- on a gloo group an operation meets its partner (same pair, tag and order) once both are
  issued, whatever else is pending;
- a host's ``Wait`` returns once the operation completed (on a communicator: once its whole
  batch did, the coalesced work); issuing never blocks.

The invariant: :func:`replay` returns ``None`` only if every event of every rank ran and every
operation met its partner; otherwise a description of where each stuck rank waits.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Op:
    """One point-to-point operation: ``kind`` ``"send"`` or ``"recv"``, the peer's global rank,
    the byte count and the tag."""

    kind: str
    peer: int
    nbytes: int
    tag: int = 0


@dataclass(frozen=True)
class Issue:
    """A batch of operations issued together on group number ``group`` (the order of its
    ``new_group`` call, the same on every rank); ``ids`` name them for :class:`Wait`."""

    group: int
    ops: tuple[Op, ...]
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Wait:
    """The host blocks until operation ``op_id`` (an id of an earlier :class:`Issue`) is done."""

    op_id: int


Event = Issue | Wait


class _Batch:
    __slots__ = ("group", "left", "rank", "started")

    def __init__(self, rank: int, group: int, n: int) -> None:
        self.rank, self.group, self.left, self.started = rank, group, n, False


def replay(
    logs: dict[int, list[Event]], host_groups: set[int], host_waits: bool = True
) -> str | None:
    """Run every rank's ``logs`` under NCCL's rules (``host_groups``: the gloo groups); ``None``
    when all complete, else what is stuck (see the module docstring). Without ``host_waits``
    a host never blocks (every batch is issued at once): only the communicators' own order
    can then hold an operation back."""
    if not host_waits:
        logs = {r: [e for e in events if isinstance(e, Issue)] for r, events in logs.items()}
    pc = dict.fromkeys(logs, 0)
    fifo: dict[tuple[int, int], deque[_Batch]] = {}  # (group, rank) -> batches not complete
    op_batch: dict[tuple[int, int], _Batch] = {}  # (rank, op id) -> its batch
    done: set[tuple[int, int]] = set()  # (rank, op id) met its partner
    # (group, sender, receiver, tag or None, kind) -> that side's op ids in issue order
    lines: dict[tuple, list[tuple[int, int, Op]]] = {}
    matched: dict[tuple, int] = {}  # how many of a line's pairs met
    errors: list[str] = []

    def line_of(rank: int, group: int, op: Op) -> tuple:
        src, dst = (rank, op.peer) if op.kind == "send" else (op.peer, rank)
        tag = op.tag if group in host_groups else None
        return (group, src, dst, tag)

    def active(rank: int, op_id: int) -> bool:
        b = op_batch[(rank, op_id)]
        return b.group in host_groups or b.started

    def meet() -> bool:
        progress = False
        for key, m in list(matched.items()):
            sends = lines.get((*key, "send"), [])
            recvs = lines.get((*key, "recv"), [])
            while m < min(len(sends), len(recvs)):
                (sr, sid, sop), (rr, rid, rop) = sends[m], recvs[m]
                if not (active(sr, sid) and active(rr, rid)):
                    break
                if sop.nbytes != rop.nbytes:
                    errors.append(
                        f"group {key[0]}: rank {sr}'s send #{m} to rank {rr} has {sop.nbytes} "
                        f"bytes, the receive {rop.nbytes}"
                    )
                for r, i in ((sr, sid), (rr, rid)):
                    done.add((r, i))
                    op_batch[(r, i)].left -= 1
                m += 1
                progress = True
            matched[key] = m
        return progress

    def settle() -> bool:
        progress = False
        for q in fifo.values():
            while q and q[0].started and q[0].left == 0:
                q.popleft()
                progress = True
            if q and not q[0].started:
                q[0].started = True
                progress = True
        return progress

    def step_hosts() -> bool:
        progress = False
        for rank, events in logs.items():
            while pc[rank] < len(events):
                ev = events[pc[rank]]
                if isinstance(ev, Wait):
                    b = op_batch[(rank, ev.op_id)]
                    host = b.group in host_groups
                    if (host and (rank, ev.op_id) not in done) or (not host and b.left):
                        break
                else:
                    b = _Batch(rank, ev.group, len(ev.ops))
                    if ev.group not in host_groups:
                        fifo.setdefault((ev.group, rank), deque()).append(b)
                    for op, i in zip(ev.ops, ev.ids, strict=True):
                        op_batch[(rank, i)] = b
                        key = line_of(rank, ev.group, op)
                        lines.setdefault((*key, op.kind), []).append((rank, i, op))
                        matched.setdefault(key, 0)
                pc[rank] += 1
                progress = True
        return progress

    while step_hosts() | settle() | meet():
        pass
    if errors:
        return "; ".join(errors[:3])

    def partner_state(rank: int, op_id: int) -> str:
        """What the first unmet op of ``op_id``'s batch waits for."""
        b = op_batch[(rank, op_id)]
        for key, m in matched.items():
            for side, other in (("send", "recv"), ("recv", "send")):
                mine = lines.get((*key, side), [])
                for n, (r, i, op) in enumerate(mine[m:], m):
                    if op_batch[(r, i)] is not b:
                        continue
                    theirs = lines.get((*key, other), [])
                    if n >= len(theirs):
                        return f"its {side} #{n} with rank {op.peer}: the peer has not posted it"
                    pr, pi, _ = theirs[n]
                    if not active(pr, pi):
                        return (
                            f"its {side} #{n} with rank {op.peer}: the peer's is queued behind "
                            "an earlier batch"
                        )
                    return f"its {side} #{n} with rank {op.peer}: queued behind an earlier batch"
        return "nothing unmet"

    stuck = []
    for rank, events in logs.items():
        if pc[rank] < len(events):
            ev = events[pc[rank]]
            assert isinstance(ev, Wait)
            b = op_batch[(rank, ev.op_id)]
            stuck.append(
                f"rank {rank} waits (event {pc[rank]} of {len(events)}) on group {b.group}, "
                f"{partner_state(rank, ev.op_id)}"
            )
    for (group, rank), q in fifo.items():
        if q:
            stuck.append(f"rank {rank}: {len(q)} batch(es) on group {group} never complete")
    loose = [(r, i) for (r, i) in op_batch if (r, i) not in done]
    if loose and not stuck:
        stuck.append(f"{len(loose)} operation(s) never met a partner, e.g. {loose[0]}")
    return "; ".join(stuck) or None
