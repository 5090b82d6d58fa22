"""The transfers of one rank's channels: headers and bulk parts on the gloo header group, direct
tensors on the point-to-point group of their directed edge, batched as
``torch.distributed.pipelining`` batches them.

:class:`Wire` issues what :mod:`gpipe.dist.p2pproto` lays out. Header and bulk operations
are single gloo ``isend``/``irecv`` calls (CPU tensors, so under NCCL no header crosses between
host and GPU); the point-to-point operations of one moment — an action's sends and the receives
posted for the next action — are collected and issued together by :meth:`Wire.flush`, one
``batch_isend_irecv`` per edge group (a send to ``b`` on the group of ``me → b``, a receive
from ``a`` on the group of ``a → me``: :func:`gpipe.dist.layout.create_groups`). On such a
group one rank only sends and the other only receives, both in the channel's order, so under
NCCL's in-order execution the ``n``-th send meets the ``n``-th receive and no receive posted
ahead can hold back a send the peer waits for. Every operation is issued from the calling
thread. An inline message
(:mod:`gpipe.dist.p2pproto`) is one buffer: the value's tensors, each at an offset aligned
to :data:`ALIGN` bytes, then the trailer (:func:`pack`, :func:`unpack`).

Host buffers of inline messages are reused (:class:`Buffers`): a fresh large buffer costs a
page fault per 4 KiB page on first touch, every message.

A rank holds only what is in flight: a send is dropped (its buffer back to the pool) once the
peer has read its message (:meth:`Wire.release`, told by the schedule:
:attr:`gpipe.dist.p2pproto.Channels.acks`), and a receive buffer once its value was handed
over and no tensor views it any more — not at the end of the step, so memory does not grow
with the number of micro-batches.

The invariant: every send's buffer stays referenced until its transfer completed
(:meth:`Wire.release`, :meth:`Wire.wait_sends`), and a direct receive is posted only for sizes
both ends expect; a buffer is reused only once its transfer completed and no tensor views it
any more.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from gpipe.dist import p2pproto as proto
from gpipe.dist.wire import as_bytes, tensor_specs

__all__ = [
    "ALIGN",
    "Buffers",
    "Issued",
    "Slot",
    "Wire",
    "pack",
    "packed_size",
    "tensors_of",
    "unpack",
]

ALIGN = 16  # every packed tensor starts at a multiple of this many bytes (any dtype views it)


class Slot:
    """The receives posted for one position of a channel: its header and, when the receiver
    expected its sizes, its direct transfers."""

    __slots__ = ("data", "data_works", "head", "head_work")

    def __init__(self, head: torch.Tensor, head_work: Any) -> None:
        self.head, self.head_work = head, head_work
        self.data: list[torch.Tensor] | None = None
        self.data_works: list[Any] = []


class Buffers:
    """Reusable CPU ``uint8`` buffers by size: :meth:`take` one, :meth:`give` it back once its
    transfer completed, or :meth:`lend` it (a received value views it): it is free again once
    no tensor views it any more."""

    def __init__(self) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self._lent: list[torch.Tensor] = []

    def take(self, n: int) -> torch.Tensor:
        """A buffer of ``n`` bytes (a free one of that size, else a new one)."""
        if self._lent:
            lent, self._lent = self._lent, []
            self.give(lent)
        free = self._free.get(n)
        return free.pop() if free else torch.empty(n, dtype=torch.uint8)

    def give(self, bufs: list[torch.Tensor]) -> None:
        """Return ``bufs`` whose transfers completed; those still viewed are lent."""
        for b in bufs:
            if _unshared(b):
                self._free.setdefault(b.numel(), []).append(b)
            else:
                self._lent.append(b)

    def lend(self, bufs: list[torch.Tensor]) -> None:
        """``bufs`` were handed over inside a value: free once nothing views them."""
        self._lent += bufs


def _unshared(buf: torch.Tensor) -> bool:
    """Whether no tensor but ``buf`` itself refers to its memory."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return False
    return count(buf.untyped_storage()._cdata) <= 2  # ``buf`` and the temporary storage


class Wire:
    """One rank's operations on its pipeline's groups (peers by pipeline device): the gloo
    header group ``meta`` and the point-to-point group of each directed edge it is on
    (``p2p[(a, b)]``: ``a`` sends, ``b`` receives)."""

    def __init__(
        self,
        device: int,
        ranks: list[int],
        peers: list[int],
        p2p: dict[tuple[int, int], Any],
        meta: Any,
        comm_device: torch.device,
    ) -> None:
        self.comm_device = comm_device
        # one coalesced batch_isend_irecv per edge group and flush (NCCL's way); on the host,
        # op by op
        self.coalesce = comm_device.type != "cpu"
        self._device, self._p2p, self._meta = device, p2p, meta
        # the other end of each edge, as a rank of that edge's group
        self._p2p_rank = {
            e: dist.get_group_rank(g, ranks[e[1] if e[0] == device else e[0]])
            for e, g in p2p.items()
        }
        self._meta_rank = {p: dist.get_group_rank(meta, ranks[p]) for p in peers}
        self._sends: list[_Send] = []  # until complete
        # (isend/irecv, tensor, peer, a send's position on the channel)
        self._ops: list[tuple[Callable, torch.Tensor, int, int | None]] = []
        self._slots: list[tuple[Slot, int]] = []  # receives in the batch, by op index
        self.buffers = Buffers()  # inline buffers (host memory)
        self._pooled: set[int] = set()  # ids of send buffers to give back once sent

    def _meta_op(self, op: Callable, t: torch.Tensor, peer: int, tag: int) -> Any:
        peer_arg = "group_dst" if op is dist.isend else "group_src"
        return op(t, group=self._meta, tag=tag, **{peer_arg: self._meta_rank[peer]})

    def post_header(self, peer: int) -> Slot:
        """Post the receive of ``peer``'s next header."""
        head = torch.empty(proto.HEADER_BYTES, dtype=torch.uint8)
        return Slot(head, self._meta_op(dist.irecv, head, peer, proto.HEAD_TAG))

    def send(
        self,
        peer: int,
        head: tuple[int, proto.Key | None, int, int],
        meta: bytes,
        tensors: list[torch.Tensor],
        expected: list[int] | None,
        pos: int,
    ) -> list[int]:
        """Send one message (``head``: type, key, step, M), position ``pos`` of the step's
        channel to ``peer``: header and bulk parts now, direct tensors (when ``expected``
        equals their sizes; else placeholders of the ``expected`` sizes) into the current
        batch. Returns the tensors' byte sizes."""
        mtype, key, step, m = head
        parts = [as_bytes(t.to(self.comm_device)) for t in tensors if t.numel()]
        sizes = [b.numel() for b in parts]
        direct = mtype == proto.DATA and expected == sizes
        mode = proto.DIRECT if direct else proto.BULK
        bulk = []
        if len(meta) > proto.INLINE:
            bulk.append(torch.frombuffer(bytearray(meta), dtype=torch.uint8))
        if direct:
            data = parts
        else:
            bulk += [b.cpu() for b in parts]
            dev = self.comm_device
            data = [torch.empty(n, dtype=torch.uint8, device=dev) for n in expected or ()]
        header = proto.pack_header(mtype, key, step, m, meta, mode)
        for t, tag in [(header, proto.HEAD_TAG)] + [(b, proto.BULK_TAG) for b in bulk]:
            self._sends.append(_Send(self._meta_op(dist.isend, t, peer, tag), t, peer, pos, False))
        for b in data:
            self._ops.append((dist.isend, b, peer, pos))
        return sizes

    def send_inline(
        self,
        peer: int,
        head: tuple[int, proto.Key | None, int, int],
        meta: bytes,
        tensors: list[torch.Tensor],
        known: bytes,
        pos: int,
    ) -> bool:
        """Send, into the current batch, the one buffer of a message whose receiver expects a
        value described by ``known``: the value itself when it is a ``DATA`` message with
        that metadata (returns ``True``), else a placeholder saying that the message follows
        with its header (returns ``False``; the caller sends it)."""
        mtype, key, step, m = head
        assert key is not None
        same = mtype == proto.DATA and meta == known
        trailer = proto.pack_trailer(proto.SAME if same else proto.OTHER, key, step, m)
        parts = [as_bytes(t) for t in tensors if t.numel()] if same else []
        buf = pack(parts, trailer, self.buffers.take(packed_size(known)))
        self._pooled.add(id(buf))
        self._ops.append((dist.isend, buf, peer, pos))
        return same

    def post_header_now(self, slot: Slot, peer: int) -> None:
        """Post the receive of ``peer``'s next header into ``slot`` (inline control: a header
        is received only when the receiver learns that one follows)."""
        fresh = self.post_header(peer)
        slot.head, slot.head_work = fresh.head, fresh.head_work

    def post_data(self, slot: Slot, peer: int, sizes: list[int], inline: bool = False) -> None:
        """Post, into the current batch, the direct receives of one message of ``sizes`` (an
        ``inline`` one into a reused host buffer)."""
        if inline:
            slot.data = [self.buffers.take(n) for n in sizes]
        else:
            dev = self.comm_device
            slot.data = [torch.empty(n, dtype=torch.uint8, device=dev) for n in sizes]
        for b in slot.data:
            self._slots.append((slot, len(self._ops)))
            self._ops.append((dist.irecv, b, peer, None))

    def _edge(self, op: Callable, peer: int) -> tuple[int, int]:
        """The directed edge an op travels: to ``peer`` for a send, from it for a receive."""
        edge = (self._device, peer) if op is dist.isend else (peer, self._device)
        if edge not in self._p2p:
            raise RuntimeError(
                f"no point-to-point group for pipeline devices {edge[0]} -> {edge[1]}: the "
                "schedule sends between devices whose stages are not neighbours in the "
                "placement the groups were made for; build the DistributedPipe again"
            )
        return edge

    def flush(self) -> None:
        """Issue the current batch of point-to-point ops: on host memory (gloo) each op at
        once, in order, which is all ``batch_isend_irecv`` does there, without building its
        ``P2POp`` objects; on a GPU one ``batch_isend_irecv`` per edge group (NCCL coalesces
        each), the groups in the order of their first op."""
        ops, slots = self._ops, self._slots
        if not ops:
            return
        self._ops, self._slots = [], []
        works: list[list[Any]] = [[] for _ in ops]  # the works each op's completion needs
        by_edge: dict[tuple[int, int], list[int]] = {}
        for i, (op, _, peer, _) in enumerate(ops):
            by_edge.setdefault(self._edge(op, peer), []).append(i)
        for edge, idx in by_edge.items():
            g, peer_rank = self._p2p[edge], self._p2p_rank[edge]
            if not self.coalesce:
                for i in idx:
                    op, t, _, _ = ops[i]
                    peer_arg = "group_dst" if op is dist.isend else "group_src"
                    works[i].append(op(t, group=g, **{peer_arg: peer_rank}))
                continue
            got = dist.batch_isend_irecv(
                [dist.P2POp(ops[i][0], ops[i][1], group=g, group_peer=peer_rank) for i in idx]
            )
            if self.comm_device.type != "cpu":  # NCCL times a wait from the issue
                now = time.monotonic()
                got = [Issued(w, now) for w in got]
            one_each = len(got) == len(idx)  # one work per op; NCCL: the coalesced work
            for j, i in enumerate(idx):
                works[i] += [got[j]] if one_each else list(got)
        for i, (op, t, peer, pos) in enumerate(ops):
            if op is dist.isend:
                self._sends += [_Send(w, t, peer, pos, True) for w in works[i]]
        for slot, i in slots:
            slot.data_works += works[i]

    def bulk(self, peer: int, n: int, deadline: float) -> torch.Tensor:
        """Receive ``peer``'s next bulk part of ``n`` bytes (CPU)."""
        buf = torch.empty(n, dtype=torch.uint8)
        wait(self._meta_op(dist.irecv, buf, peer, proto.BULK_TAG), deadline)
        return buf

    def release(self, peer: int, upto: int, deadline: float) -> None:
        """Drop the sends of the channel's first ``upto`` positions this step, which ``peer``
        has read (so their transfers completed, or are about to on the host), and give their
        buffers back. Under NCCL's coalesced batches a work may also cover a later position,
        so a direct send there is dropped only once its work says it completed; a wait that
        fails keeps the send for :meth:`wait_sends` to report."""
        keep: list[_Send] = []
        done: list[_Send] = []
        for s in self._sends:
            if s.peer != peer or s.pos >= upto or not self._completed(s, deadline):
                keep.append(s)
            else:
                done.append(s)
        self._sends = keep
        still = {id(s.buf) for s in keep}
        free = [s.buf for s in done if id(s.buf) in self._pooled and id(s.buf) not in still]
        self._pooled -= {id(b) for b in free}
        self.buffers.give(free)

    def _completed(self, s: _Send, deadline: float) -> bool:
        if s.direct and self.coalesce:  # never block on a coalesced work
            work = s.work.work if isinstance(s.work, Issued) else s.work
            return bool(work.is_completed())
        try:
            wait(s.work, deadline)
        except Exception:
            return False
        return True

    def wait_sends(self, deadline: float) -> BaseException | None:
        """Wait for every send issued so far; the first error (or timeout), if any."""
        pending, self._sends = self._sends, []
        first = None
        for s in pending:
            try:
                wait(s.work, deadline)
            except Exception as e:
                first = first or e
        pooled = list({id(s.buf): s.buf for s in pending if id(s.buf) in self._pooled}.values())
        self._pooled = set()
        if first is None:
            self.buffers.give(pooled)
        return first


class _Send(NamedTuple):
    """A send until it completed: its work, the buffer it reads, the peer, its position on
    the step's channel, and whether it is a direct transfer (else a header or bulk part)."""

    work: Any
    buf: torch.Tensor
    peer: int
    pos: int
    direct: bool


class Issued(NamedTuple):
    """A work on a GPU communicator and when it was issued (``time.monotonic()``):
    ``ProcessGroupNCCL`` measures a wait's timeout from the issue, not from the wait."""

    work: Any
    at: float


def wait(work: Any, deadline: float) -> None:
    """Wait for ``work`` until ``deadline`` (``TimeoutError`` once it has passed); an
    :class:`Issued` work's timeout is counted from its issue, as NCCL counts it, so that a
    receive posted ahead also gets until ``deadline``."""
    now = time.monotonic()
    left = deadline - now
    if left <= 0:
        raise TimeoutError("the deadline passed")
    if isinstance(work, Issued):
        work, left = work.work, left + (now - work.at)
    work.wait(timedelta(seconds=left))


def tensors_of(meta: bytes, parts: Iterator[torch.Tensor], device: torch.device) -> list:
    """The message's tensors from its byte ``parts`` (the non-empty ones, in order), with the
    sender's shapes, dtypes and ``requires_grad``."""
    tensors = []
    for shape, dtype, rg in tensor_specs(meta):
        if math.prod(shape) * dtype.itemsize:
            t = next(parts).to(device).view(dtype).reshape(shape)
        else:
            t = torch.empty(shape, dtype=dtype, device=device)
        if rg and (t.is_floating_point() or t.is_complex()):
            t.requires_grad_(True)
        tensors.append(t)
    return tensors


def _padded(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def packed_size(meta: bytes) -> int:
    """Bytes of the inline buffer of a value described by ``meta`` (trailer included)."""
    return sum(_padded(n) for n in sizes_of(meta)) + proto.TRAILER_BYTES


def pack(parts: list[torch.Tensor], trailer: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``buf`` (CPU ``uint8``) filled with the byte ``parts`` (none for a placeholder), each
    at an aligned offset, and ``trailer`` in its last bytes."""
    size = buf.numel()
    at = 0
    for b in parts:
        buf[at : at + b.numel()].copy_(b)
        at += _padded(b.numel())
    buf[size - proto.TRAILER_BYTES :].copy_(trailer)
    return buf


def unpack(buf: torch.Tensor, meta: bytes) -> list[torch.Tensor]:
    """The byte parts of an inline buffer whose value ``meta`` describes (views, no copy)."""
    parts, at = [], 0
    for n in sizes_of(meta):
        parts.append(buf[at : at + n])
        at += _padded(n)
    return parts


def sizes_of(meta: bytes) -> list[int]:
    """The byte sizes of the message's non-empty tensors."""
    sizes = [math.prod(shape) * dtype.itemsize for shape, dtype, _ in tensor_specs(meta)]
    return [n for n in sizes if n]
