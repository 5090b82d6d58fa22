"""The distributed transport: boundary pytrees between processes over ``torch.distributed`` P2P,
all of it issued from the one thread that runs this rank's executor loop.

:class:`P2PTransport` implements the executor's :class:`~gpipe.core.executor.Transport`
between the ranks of one pipeline. What each channel carries in a step, and how a message is
laid out, is :mod:`gpipe.dist.p2pproto`; how its operations are issued (op by op on gloo,
one coalesced batch per edge group under NCCL) is :mod:`gpipe.dist.p2pio`. As in
``torch.distributed.pipelining``, an action's sends go right after it together with the
receives the next remote input needs, posted ahead of its compute; a receive posts the next
remote input's too (on gloo a transfer starts only once its receive is posted, so a forward
that sends nothing still overlaps the next transfer), and the peer's terminal header is posted
once its channel's last value is read. An action waits only for its own value's transfers.
Headers travel on a CPU (gloo) group; every group exists from construction
(:func:`gpipe.dist.layout.create_groups`); every wait is bounded by ``timeout``. With tensors in
host memory a value both ends expect is one buffer and no header (*inline control*). What
went wrong on a channel is :mod:`gpipe.dist.p2phealth`.

Each step every rank ends every channel it sends on with one *terminal* message: ``END``
(carrying an optional payload, e.g. the loss from the last stage) or ``ABORT`` (rank, stage,
micro-batch and error text); positions a failed rank never reached are sent as ``SKIP``, so
both ends walk the whole channel and it is in order for the next step.

The invariant: after :meth:`P2PTransport.finish_step` returns, every message of the step was
received and every transfer completed, *or* the transport is marked broken (a peer died, or a
wait ran past the timeout) and refuses further steps; a failure anywhere reaches every rank of
the pipeline as :class:`PeerError` or the failing rank's own
:class:`~gpipe.core.executor.StageError`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from gpipe.core.executor import Aborted
from gpipe.core.mailbox import QueueTransport
from gpipe.dist import p2pproto as proto
from gpipe.dist.failures import Failure, PeerError
from gpipe.dist.p2phealth import Broken, ChannelHealth, first_line
from gpipe.dist.p2pio import Slot, Wire, packed_size, sizes_of, tensors_of, unpack, wait
from gpipe.dist.wire import decode, encode

__all__ = ["Failure", "P2PTransport", "PeerError", "decode", "encode"]


class P2PTransport(ChannelHealth):
    """Transport of one pipeline device (this rank) to the other devices of its pipeline.

    Args:
        device: this rank's pipeline device index ``d``.
        ranks: global rank of every pipeline device of this pipeline (``ranks[d]``).
        p2p_groups: the pipeline's point-to-point group of each directed edge ``(a, b)`` this
            device is on (the tensors that ``a`` sends to ``b``;
            :func:`gpipe.dist.layout.create_groups`).
        meta_group: the pipeline's gloo group (headers and bulk transfers).
        owner: ``owner(stage)`` is the pipeline device that runs ``stage``.
        num_stages: (virtual) stages of the pipeline.
        timeout: seconds any wait may last (a message, a send, the end of a step).
        comm_device: where tensors travel (``cpu`` for gloo, the rank's GPU for NCCL); values
            are moved there before sending and arrive there.
        inline: inline control (:mod:`gpipe.dist.p2pproto`): a value both ends expect goes
            as one buffer with no header. Default: when ``comm_device`` is the CPU.
    """

    def __init__(
        self,
        device: int,
        ranks: Sequence[int],
        p2p_groups: dict[tuple[int, int], Any],
        meta_group: Any,
        owner: Callable[[int], int],
        num_stages: int,
        *,
        timeout: float = 300.0,
        comm_device: torch.device | str = "cpu",
        inline: bool | None = None,
    ) -> None:
        self.device = device
        self.ranks = list(ranks)
        self.num_devices = len(self.ranks)
        self.rank = self.ranks[device]
        self.timeout = float(timeout)
        self.comm_device = torch.device(comm_device)
        self.inline = self.comm_device.type == "cpu" if inline is None else bool(inline)
        if self.inline and self.comm_device.type != "cpu":
            raise ValueError(
                f"inline control reads each message's trailer on the host, so it needs tensors "
                f"travelling in host memory, not on {self.comm_device}; pass inline=False"
            )
        self.peers = [p for p in range(self.num_devices) if p != device]
        self._owner, self._num_stages = owner, num_stages
        if self.peers:
            self._wire = Wire(
                device, self.ranks, self.peers, p2p_groups, meta_group, self.comm_device
            )
        self._box = QueueTransport(timeout)
        super().__init__()
        self._closed = False
        self._in_step = False
        self._step, self._m = 0, 1
        # per message key: the byte sizes and metadata it carried last (frozen at begin_step)
        self._expect_next: dict[proto.Key, tuple[list[int], bytes]] = {}
        self._expect: dict[proto.Key, tuple[list[int], bytes]] = {}
        self._plans = proto.ChannelPlans(device, self.peers, owner, num_stages)

    @property
    def coalesce(self) -> bool:
        """Whether each flush is one ``batch_isend_irecv`` per edge group (NCCL's way, the
        default on a GPU) rather than op by op (on the host). Set it between steps to run the
        GPU path's issuing on gloo."""
        return bool(self.peers) and self._wire.coalesce

    @coalesce.setter
    def coalesce(self, value: bool) -> None:
        if self.peers:
            self._wire.coalesce = bool(value)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Refuse further steps (idempotent); no thread or receive outlives a healthy step."""
        self._closed = True

    def begin_step(
        self, step: int, num_microbatches: int, per_device: Sequence[Sequence[Any]]
    ) -> None:
        """Start step number ``step`` of ``num_microbatches`` whose actions are ``per_device``
        (every device's, as every rank runs the same schedule): post every header receive of
        the step and the direct receives of this rank's first remote input."""
        if self._closed:
            raise RuntimeError("this transport was closed; build a new DistributedPipe")
        if self._broken is not None:
            raise RuntimeError(
                f"the pipeline's channels are broken ({self._broken}); the ranks can no longer "
                "exchange messages in order. Build a new DistributedPipe (and, if a rank died, "
                "a new process group)"
            )
        if self._in_step:
            raise RuntimeError("begin_step called twice without finish_step")
        self._box.reset()
        self._failure = None
        self._step, self._m = step, num_microbatches
        self._in_step = True
        self._expect = dict(self._expect_next)
        self._out, self._in, self._where, self._wants, self._acks = self._plans.of(per_device)
        self._sent = dict.fromkeys(self.peers, 0)
        self._decoded = dict.fromkeys(self.peers, 0)
        self._data_posted = dict.fromkeys(self.peers, 0)
        self._next_want = 0
        self._payloads: dict[int, Any] = {}
        # every position's receives, and the terminal's, in order: headers posted now, or
        # (inline control) once the receiver knows that one follows
        post = (lambda p: Slot(None, None)) if self.inline else self._wire.post_header
        self._slots: dict[int, list[Slot]] = {
            p: [post(p) for _ in range(len(self._in[p]) + 1)] for p in self.peers
        }
        for p in self.peers:
            self._terminal_ahead(p)
        self._prefetch()
        self._flush()

    def _terminal_ahead(self, peer: int) -> None:
        """Inline control: post ``peer``'s terminal header receive once every earlier position
        is read (not before: it could match another's header), ahead of :meth:`finish_step`."""
        n = len(self._in[peer])
        slot = self._slots[peer][n]
        if self.inline and self._decoded[peer] == n and slot.head_work is None:
            self._wire.post_header_now(slot, peer)

    # ------------------------------------------------------------------ Transport protocol

    def send(self, kind: str, stage: int, microbatch: int, value: Any) -> None:
        """Send ``value`` to the device that runs ``stage``: its transfers start now, batched
        with the receives of this rank's next remote input; completion is awaited at
        :meth:`finish_step`."""
        dst = self._owner(stage)
        if dst == self.device:
            self._box.send(kind, stage, microbatch, _detach_tree(value))
            return
        what = "activation" if kind == "act" else "gradient"
        meta, tensors = encode(value, f"stage {stage}, micro-batch {microbatch} ({what})")
        key = (kind, stage, microbatch)
        n = self._sent[dst]
        if dst in self._lost:
            return
        if n >= len(self._out[dst]) or self._out[dst][n] != key:
            raise RuntimeError(
                f"rank {self.rank} sends {what} {key} to rank {self.ranks[dst]} out of the "
                "schedule's order; the executor and the transport disagree on the schedule"
            )
        self._emit(dst, proto.DATA, key, meta, tensors, n)
        self._sent[dst] = n + 1
        self._prefetch()
        self._flush()

    def recv(self, kind: str, stage: int, microbatch: int) -> Any:
        """Wait (bounded) for the ``kind`` value of ``microbatch`` addressed to ``stage``."""
        key = (kind, stage, microbatch)
        where = self._where.get(key)
        if where is not None:
            if key in self._wants[self._next_want :]:
                self._next_want = self._wants.index(key, self._next_want) + 1
            peer, pos = where
            self._check_failed()
            try:
                self._post_data(peer, pos)
                # and the next remote input's, so its transfer runs under this action's
                # compute even when this action sends nothing (a last stage's forward)
                self._prefetch()
                self._flush()
                while self._decoded[peer] <= pos:
                    self._decode_next(peer, time.monotonic() + self.timeout)
            except Broken:
                pass
            self._check_failed()
        try:
            return self._box.recv(kind, stage, microbatch)
        except Aborted:
            self._check_failed()
            raise

    def _check_failed(self) -> None:
        f = self._failure
        if f is not None:
            raise Aborted(f.describe())

    def abort(self, failure: Failure) -> None:
        """Record ``failure`` (first one wins) and wake a waiting local :meth:`recv`."""
        super().abort(failure)
        self._box.abort()

    # ------------------------------------------------------------------ end of step

    def finish_step(self, failure: Failure | None = None, payload: Any = None) -> dict[int, Any]:
        """End this rank's step: fill the positions it never sent (``SKIP``), send its
        terminal message to every peer, read every peer's channel to its terminal message and
        wait for its own transfers, all within the timeout.

        ``failure`` (this rank's own, if its loop raised) is sent as ``ABORT``; otherwise
        ``END`` carries ``payload``. Returns each peer's ``END`` payload by device. The first
        failure of the step (local or remote) is then in :attr:`failure`; the caller raises.
        """
        if not self._in_step:
            raise RuntimeError("finish_step called without begin_step")
        if failure is not None:
            self.abort(failure)
        # Once the step failed, peers answer at once unless one is hung: do not wait the full
        # timeout again for them (the whole failure stays within 2x the timeout).
        deadline = time.monotonic() + (self.timeout if self._failure is None else self.timeout / 2)
        if failure is not None:
            terminal, body, tensors = proto.ABORT, proto.failure_body(failure), []
        else:
            terminal = proto.END
            body, tensors = encode(payload, "end-of-step payload")
        for p in self.peers:
            if p in self._lost:  # a peer that timed out still gets them: it may wake up
                continue
            why = self._failure or Failure(self.rank, self.device, None, None, "step abandoned")
            skip = proto.failure_body(why)
            for pos in range(self._sent[p], len(self._out[p])):
                self._emit(p, proto.SKIP, self._out[p][pos], skip, [], pos)
            self._sent[p] = len(self._out[p])
            self._emit(p, terminal, None, body, tensors, len(self._out[p]))
        self._flush()
        for p in self.peers:
            if p in self._dead:
                continue
            try:
                self._post_data(p, len(self._in[p]) - 1)
                self._flush()
                while self._decoded[p] <= len(self._in[p]):
                    self._decode_next(p, deadline)
            except Broken:
                continue
        self._wait_sends(deadline)
        self._in_step = False
        return dict(self._payloads)

    def _wait_sends(self, deadline: float) -> None:
        if not self.peers:
            return
        e = self._wire.wait_sends(deadline)
        if e is not None:
            self._broken = self._broken or f"a send did not complete: {first_line(e)}"
            if self._failure is None:
                self.abort(Failure(self.rank, self.device, None, None, f"a send failed: {e}"))

    # ------------------------------------------------------------------ sending

    def _emit(
        self, peer: int, mtype: int, key: proto.Key | None, meta: bytes, tensors: list, pos: int
    ) -> None:
        """Send position ``pos`` of the step's channel to ``peer``."""
        head = (mtype, key, self._step, self._m)
        known = self._expect.get(key) if key is not None else None
        try:
            if known is not None and self.inline:  # the receiver posted one buffer for it
                if self._wire.send_inline(peer, head, meta, tensors, known[1], pos):
                    return
                known = None  # it was a placeholder: the whole message follows with its header
            sizes = self._wire.send(peer, head, meta, tensors, known and known[0], pos)
        except Exception as e:  # e.g. gloo closed the pair after a wait on it timed out
            self._mark_broken(peer, e)
            return
        if mtype == proto.DATA and key is not None:
            self._expect_next[key] = (sizes, meta)

    def _flush(self) -> None:
        if not self.peers:  # one pipeline device: no channel
            return
        try:
            self._wire.flush()
        except Exception as e:
            self._mark_broken(None, e)

    # ------------------------------------------------------------------ receiving

    def _prefetch(self) -> None:
        """Post the direct receives of this rank's next remote input (up to its position on
        its channel) into the current batch."""
        if self._next_want < len(self._wants):
            peer, pos = self._where[self._wants[self._next_want]]
            self._post_data(peer, pos)

    def _post_data(self, peer: int, upto: int) -> None:
        """Post, into the current batch, the direct receives of ``peer``'s positions up to
        ``upto`` whose sizes this rank expects."""
        while self._data_posted[peer] <= upto:
            pos = self._data_posted[peer]
            self._data_posted[peer] = pos + 1
            known = self._expect.get(self._in[peer][pos])
            sizes = [packed_size(known[1])] if known and self.inline else known and known[0]
            if sizes:
                self._wire.post_data(self._slots[peer][pos], peer, sizes, self.inline)

    def _bulk(self, peer: int, n: int, deadline: float) -> torch.Tensor:
        try:
            return self._wire.bulk(peer, n, deadline)
        except Exception as e:
            self._lost_peer(peer, e)

    def _decode_next(self, peer: int, deadline: float) -> None:
        """Read ``peer``'s next position: a value into the mailbox, a failure into
        :attr:`failure`, or the terminal message's payload."""
        pos = self._decoded[peer]
        slot = self._slots[peer][pos]
        if slot.head_work is None and slot.data is not None:  # an inline message
            for w in slot.data_works:
                self._wait(w, deadline, peer, pos)
            key, t = self._in[peer][pos], proto.unpack_trailer(slot.data[0])
            if t.status == proto.SAME:
                if (t.key, t.step, t.num_microbatches) != (key, self._step, self._m):
                    self._out_of_order(peer, t.key, t.step, t.num_microbatches)
                self._decoded[peer] = pos + 1
                self._terminal_ahead(peer)
                meta = self._expect[key][1]
                parts = iter(unpack(slot.data[0], meta))
                self._box.send(*key, decode(meta, tensors_of(meta, parts, self.comm_device)))
                self._handed_over(peer, pos, slot, deadline)
                return
            self._wire.buffers.give(slot.data)  # a placeholder: the header follows
            slot.data, slot.data_works = None, []
        if slot.head_work is None:
            self._wire.post_header_now(slot, peer)
        self._wait(slot.head_work, deadline, peer, pos)
        h = proto.unpack_header(slot.head)
        meta = h.meta
        if meta is None:
            meta = self._bulk(peer, h.meta_len, deadline).numpy().tobytes()
        terminal = pos == len(self._in[peer])
        if terminal:
            wrong = h.mtype not in (proto.END, proto.ABORT)
        else:
            want = (self._in[peer][pos], self._step, self._m)
            wrong = h.mtype == proto.DATA and (h.key, h.step, h.num_microbatches) != want
            wrong = wrong or h.mtype not in (proto.DATA, proto.SKIP)
        if wrong:
            self._out_of_order(peer, h.key, h.step, h.num_microbatches)
        for w in slot.data_works:  # direct data, or the placeholders of a bulk message
            self._wait(w, deadline, peer, pos)
        self._decoded[peer] = pos + 1
        if not terminal:
            self._terminal_ahead(peer)
        if h.mtype in (proto.SKIP, proto.ABORT):
            self.abort(proto.failure_from(meta))
            return
        sizes = sizes_of(meta)
        if h.mode == proto.DIRECT:
            parts = slot.data or []
        else:
            parts = [self._bulk(peer, n, deadline) for n in sizes]
        value = decode(meta, tensors_of(meta, iter(parts), self.comm_device))
        if terminal:
            self._payloads[peer] = value
            return
        self._expect_next[h.key] = (sizes, meta)
        self._box.send(*h.key, value)
        self._handed_over(peer, pos, slot, deadline)

    def _handed_over(self, peer: int, pos: int, slot: Slot, deadline: float) -> None:
        """``peer``'s value at ``pos`` is in the mailbox: its receive buffers are no longer
        held here (inline ones go back to the pool once no tensor views them), and the sends
        ``peer`` read before it sent this value are done (their buffers freed): this rank
        holds only what is in flight, not every value of the step."""
        if self.inline and slot.data:
            self._wire.buffers.lend(slot.data)
        slot.data, slot.data_works = None, []
        self._wire.release(peer, self._acks[peer][pos], deadline)

    def _wait(self, work: Any, deadline: float, peer: int, pos: int) -> None:
        """Wait for ``peer``'s ``work`` (its message at position ``pos`` of the step) until
        ``deadline``; a timeout or a lost peer breaks the channel (:class:`Broken`)."""
        try:
            wait(work, deadline)
        except Exception as e:
            self._lost_peer(peer, e, self._in[peer][pos] if pos < len(self._in[peer]) else None)


def _detach_tree(value: Any) -> Any:
    meta, tensors = encode(value, "value")
    return decode(meta, tensors)
