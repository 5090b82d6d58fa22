"""The distributed transport: boundary pytrees between processes over ``torch.distributed`` P2P.

:class:`P2PTransport` implements the executor's :class:`~gpipe.runtime.executor.Transport`
between the ranks of one pipeline (one rank per pipeline device). Values travel as *messages*
on *channels*; a channel is a two-rank process group used in one direction only (``a → b``),
with exactly one sending thread (``a``'s sender thread for ``b``, fed in program order by the
executor, which therefore never waits on the wire) and one receiving thread (``b``'s receiver
thread for ``a``). Messages are matched by their order on the channel, never by tag. One
direction per group is what makes the design right for NCCL as well as gloo: NCCL matches
point-to-point messages by their order per communicator, and runs a communicator's sends and
receives on one stream, so a receive posted ahead of time on a shared two-way communicator
could block the opposite send. (Under NCCL the sender thread first makes its stream wait for
the executor's current stream, so a value is sent only once computed.)

A message is, in this order:

1. a header, ``uint8[512]``: int64 fields (magic, message type — data, end of step or
   abort —, kind — activation or gradient —, destination stage, micro-batch, step counter,
   number of micro-batches, byte lengths of the metadata and of the whole message, and whether
   the message is combined), followed by the metadata itself when it fits in the remaining
   432 bytes (one tensor's metadata takes about 80);
2. otherwise the metadata, ``uint8[n]``: JSON of the pytree with tensors replaced by
   placeholders (shape, dtype, requires_grad), so shapes may change from one step to the next;
3. each tensor of the pytree (as raw bytes), in the order of the placeholders.

Both ends of a channel remember the length of its last data message; a message of that length
travels as *one* transfer holding all three parts (the steady state of training: every
micro-batch has the same shapes), any other as a header transfer of the expected length
followed by the parts (a shape change, or the end of a step). Messages over 4 MiB always travel
in parts, without the copy into one buffer.

Each step every rank ends every channel it sends on with exactly one *terminal* message:
``END`` (carrying an optional payload, e.g. the loss from the last stage) when its loop
finished, or ``ABORT`` (rank, stage, micro-batch and error text) when it failed. A receiver
thread is armed by :meth:`P2PTransport.begin_step` and reads its channel in order up to the
terminal message, dropping data into a mailbox (:class:`~gpipe.runtime.local.QueueTransport`);
between steps no receive is posted, so an idle pipeline never times out.

The invariant: after :meth:`P2PTransport.finish_step` returns, every message sent during the
step has been received and every channel is idle, *or* the transport is marked broken (a peer
died, or a wait ran past the timeout) and refuses further steps. Every wait is bounded by
``timeout``; a failure anywhere reaches every rank of the pipeline as :class:`PeerError` or the
failing rank's own :class:`~gpipe.runtime.executor.StageError`.
"""

from __future__ import annotations

import math
import queue
import threading
import time
import weakref
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gpipe.runtime.executor import Aborted
from gpipe.runtime.failures import Failure, PeerError
from gpipe.runtime.local import QueueTransport
from gpipe.runtime.wire import as_bytes, decode, encode, tensor_specs

__all__ = [
    "Failure",
    "P2PTransport",
    "PeerError",
    "decode",
    "encode",
    "make_channels",
]

_MAGIC = 0x67706970  # "gpip"
# header fields: magic, type, kind, stage, micro-batch, step, micro-batches, metadata bytes,
# message bytes, combined (1 if the whole message is in this transfer)
_FIELDS = 10
_HEADER_BYTES = 512  # the fields, then the metadata itself when it fits (the common case)
_INLINE = _HEADER_BYTES - 8 * _FIELDS
_ALIGN = 64
_COMBINE_LIMIT = 4 << 20  # larger messages always travel as separate, copy-free transfers
_DATA, _END, _ABORT = 1, 2, 3
_KIND_CODES = {"act": 0, "grad": 1}
_KIND_NAMES = {v: k for k, v in _KIND_CODES.items()}


# ----------------------------------------------------------------------------- channels


def make_channels(
    replicas: Sequence[Sequence[int]], rank: int, timeout: float, backend: str | None = None
) -> dict[int, tuple[Any, Any]]:
    """Create one two-rank group per ordered pair of pipeline devices in every replica.

    ``replicas[j][d]`` is the global rank of pipeline device ``d`` in replica ``j``. Every rank
    of the job must call this with the same arguments (``new_group`` is collective and groups
    must be created in the same order everywhere). Returns, for the calling ``rank``, a map
    ``peer device -> (send group, receive group)``: the group for messages to the peer and the
    one for messages from it.
    """
    out: dict[int, tuple[Any, Any]] = {}
    td = timedelta(seconds=timeout)
    for ranks in replicas:
        k = len(ranks)
        groups: dict[tuple[int, int], Any] = {}
        for a in range(k):
            for b in range(k):
                if a != b:
                    groups[(a, b)] = dist.new_group(
                        [ranks[a], ranks[b]], timeout=td, backend=backend
                    )
        if rank in ranks:
            me = list(ranks).index(rank)
            for peer in range(k):
                if peer != me:
                    out[peer] = (groups[(me, peer)], groups[(peer, me)])
    return out


# ----------------------------------------------------------------------------- transport


class P2PTransport:
    """Transport of one pipeline device (this rank) to the other devices of its pipeline.

    Args:
        device: this rank's pipeline device index ``d`` (it runs stages ``s`` with
            ``s % num_devices == d``).
        num_devices: pipeline devices K.
        ranks: global rank of every pipeline device of this pipeline (``ranks[d]``).
        channels: ``peer device -> (send group, receive group)`` from :func:`make_channels`.
        timeout: seconds any wait may last (a message, a send, the end of a step).
        comm_device: where tensors travel (``cpu`` for gloo, the rank's GPU for NCCL); values
            are moved there before sending and arrive there.
    """

    def __init__(
        self,
        device: int,
        num_devices: int,
        ranks: Sequence[int],
        channels: dict[int, tuple[Any, Any]],
        *,
        timeout: float = 300.0,
        comm_device: torch.device | str = "cpu",
    ) -> None:
        self.device = device
        self.num_devices = num_devices
        self.placement: Sequence[int] | None = None  # stage -> device (None: s % num_devices)
        self.ranks = list(ranks)
        self.rank = self.ranks[device]
        self.timeout = float(timeout)
        self.comm_device = torch.device(comm_device)
        self.peers = sorted(channels)
        self._send_group = {p: channels[p][0] for p in self.peers}
        self._recv_group = {p: channels[p][1] for p in self.peers}
        self._send_rank = {
            p: dist.get_group_rank(self._send_group[p], self.ranks[p]) for p in self.peers
        }
        self._recv_rank = {
            p: dist.get_group_rank(self._recv_group[p], self.ranks[p]) for p in self.peers
        }
        self._box = QueueTransport(timeout)
        self._lock = threading.Condition()
        self._failure: Failure | None = None
        self._terminals: dict[int, Any] = {}
        self._broken: str | None = None
        self._dead: set[int] = set()  # peers whose channels failed
        self._pending: dict[int, list[tuple[Any, torch.Tensor]]] = {p: [] for p in self.peers}
        self._expect_send = dict.fromkeys(self.peers, _HEADER_BYTES)
        self._expect_recv = dict.fromkeys(self.peers, _HEADER_BYTES)
        self._step = 0
        self._num_microbatches = 1
        self._in_step = False
        self._starts: dict[int, queue.Queue] = {p: queue.Queue() for p in self.peers}
        self._outbox: dict[int, queue.Queue] = {p: queue.Queue() for p in self.peers}
        self._threads = []
        for p in self.peers:
            for loop, what in ((self._receive_loop, "recv"), (self._send_loop, "send")):
                self._threads.append(
                    threading.Thread(
                        target=loop,
                        args=(p,),
                        name=f"gpipe-{what}-{self.rank}-{self.ranks[p]}",
                        daemon=True,
                    )
                )
        for t in self._threads:
            t.start()
        self._finalizer = weakref.finalize(
            self,
            P2PTransport._stop,
            [*self._starts.values(), *self._outbox.values()],
            self._threads,
        )

    # ------------------------------------------------------------------ lifecycle

    @staticmethod
    def _stop(queues: list[queue.Queue], threads: list[threading.Thread]) -> None:
        for q in queues:
            q.put(None)
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=1.0)

    def close(self) -> None:
        """Stop the receiver and sender threads (idempotent). A thread stuck in a receive of a
        broken channel is a daemon and ends with the process or when the process group is
        destroyed."""
        self._finalizer()

    @property
    def broken(self) -> str | None:
        """Why the channels can no longer be used, or ``None`` while they are healthy."""
        return self._broken

    def begin_step(self, step: int, num_microbatches: int) -> None:
        """Arm the receiver threads for step number ``step`` with ``num_microbatches``."""
        if not self._finalizer.alive:
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
        with self._lock:
            self._failure = None
            self._terminals = {}
            self._step = step
            self._num_microbatches = num_microbatches
            self._in_step = True
        for p in self.peers:
            self._starts[p].put(step)

    # ------------------------------------------------------------------ Transport protocol

    def send(self, kind: str, stage: int, microbatch: int, value: Any) -> None:
        """Send ``value`` to the device that runs ``stage`` (non-blocking; see finish_step)."""
        dst = stage % self.num_devices if self.placement is None else self.placement[stage]
        if dst == self.device:
            self._box.send(kind, stage, microbatch, _detach_tree(value))
            return
        what = "activation" if kind == "act" else "gradient"
        meta, tensors = encode(value, f"stage {stage}, micro-batch {microbatch} ({what})")
        self._queue(dst, (_DATA, _KIND_CODES[kind], stage, microbatch, meta, tensors))

    def _queue(self, peer: int, message: tuple) -> None:
        """Hand ``message`` to ``peer``'s sender thread, with the stream that computed it."""
        stream = None
        if self.comm_device.type == "cuda":
            stream = torch.cuda.current_stream(self.comm_device)
        self._outbox[peer].put((message, stream))

    def recv(self, kind: str, stage: int, microbatch: int) -> Any:
        """Wait for the ``kind`` value of ``microbatch`` addressed to ``stage``."""
        try:
            return self._box.recv(kind, stage, microbatch)
        except Aborted:
            f = self._failure
            raise Aborted(f.describe() if f is not None else "the step was aborted") from None

    def abort(self, failure: Failure) -> None:
        """Record ``failure`` (first one wins) and wake every waiting :meth:`recv`."""
        with self._lock:
            if self._failure is None:
                self._failure = failure
            self._lock.notify_all()
        self._box.abort()

    @property
    def failure(self) -> Failure | None:
        """The first failure seen in this step (local or from a peer)."""
        return self._failure

    # ------------------------------------------------------------------ end of step

    def finish_step(self, failure: Failure | None = None, payload: Any = None) -> dict[int, Any]:
        """End this rank's step: send the terminal message to every peer, wait until this
        rank's sends completed and every peer's terminal message arrived.

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
        wait = self.timeout if self._failure is None else self.timeout / 2
        deadline = time.monotonic() + wait
        if failure is not None:
            body = {
                "rank": failure.rank,
                "device": failure.device,
                "stage": failure.stage,
                "microbatch": failure.microbatch,
                "error": failure.error,
            }
            meta, tensors = encode(body, "abort message")
            terminal = (_ABORT, 0, 0, 0, meta, tensors)
        else:
            meta, tensors = encode(payload, "end-of-step payload")
            terminal = (_END, 0, 0, 0, meta, tensors)
        flushed = []
        for p in self.peers:
            self._queue(p, terminal)
            flushed.append(threading.Event())
            self._outbox[p].put(flushed[-1])
        for p, done in zip(self.peers, flushed):
            if not done.wait(max(0.0, deadline - time.monotonic())):
                self._broken = self._broken or f"sends to rank {self.ranks[p]} did not complete"
                self.abort(Failure(self.rank, self.device, None, None, "a send did not complete"))
        self._wait_sends(deadline)
        with self._lock:
            while len(self._terminals) < len(self.peers):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [self.ranks[p] for p in self.peers if p not in self._terminals]
                    reason = (
                        f"rank(s) {missing} did not finish step {self._step} within "
                        f"{self.timeout:.0f}s"
                    )
                    self._broken = self._broken or reason
                    if self._failure is None:
                        self._failure = Failure(
                            missing[0], self.ranks.index(missing[0]), None, None, reason
                        )
                    break
                self._lock.wait(left)
            payloads = dict(self._terminals)
            self._in_step = False
        return {p: v for p, v in payloads.items() if not isinstance(v, Failure)}

    def _wait_sends(self, deadline: float) -> None:
        pending = []
        for p in self.peers:  # the sender threads are idle now (flushed, or given up on)
            pending += self._pending[p]
            self._pending[p] = []
        for work, _keep in pending:
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError(f"a send did not complete within {self.timeout:.0f}s")
                work.wait(timedelta(seconds=left))
            except Exception as e:
                self._broken = self._broken or f"a send failed: {e}"
                if self._failure is None:
                    self.abort(Failure(self.rank, self.device, None, None, f"send failed: {e}"))

    def _mark_broken(self, peer: int, error: BaseException) -> None:
        text = (
            f"lost the connection to rank {self.ranks[peer]} (pipeline device {peer}): "
            f"{type(error).__name__}: {_first_line(error)}"
        )
        self._broken = self._broken or text
        self._dead.add(peer)
        self.abort(Failure(self.ranks[peer], peer, None, None, "died or closed its connection"))

    # ------------------------------------------------------------------ wire
    #
    # A message travels in one transfer when the receiver can size its buffer in advance:
    # both ends of a channel remember the length of the last data message (its layout:
    # header, metadata if not inline, then each tensor at a 64-byte aligned offset). When the
    # next message has that length it goes as one buffer ("combined"); otherwise the receiver
    # gets a buffer of the expected length holding only the header ("split": its metadata and
    # tensors follow as separate transfers) and both ends expect the new length from then on.
    # End-of-step and abort messages never change the expectation, so a steady training loop
    # sends one transfer per boundary value.

    @staticmethod
    def _layout(meta_len: int, sizes: list[int]) -> tuple[list[int], int]:
        """Offsets of the tensors (byte sizes ``sizes``) in a combined message, and its length."""
        off = _HEADER_BYTES if meta_len <= _INLINE else _align(_HEADER_BYTES + meta_len)
        offsets = []
        for n in sizes:
            offsets.append(off)
            off = _align(off + n)
        return offsets, off

    def _send_message(
        self,
        peer: int,
        mtype: int,
        kind: int,
        stage: int,
        microbatch: int,
        meta: bytes,
        tensors: list[torch.Tensor],
    ) -> None:
        group, dst = self._send_group[peer], self._send_rank[peer]
        parts = [as_bytes(t.to(self.comm_device)) for t in tensors if t.numel()]
        offsets, total = self._layout(len(meta), [b.numel() for b in parts])
        expect = self._expect_send[peer]
        combined = mtype == _DATA and total == expect
        fields = [_MAGIC, mtype, kind, stage, microbatch, self._step, self._num_microbatches]
        fields += [len(meta), total, int(combined)]
        head = bytearray(_HEADER_BYTES)
        head[: 8 * _FIELDS] = torch.tensor(fields, dtype=torch.int64).numpy().tobytes()
        inline = len(meta) <= _INLINE
        if inline:
            head[8 * _FIELDS : 8 * _FIELDS + len(meta)] = meta
        if combined:
            buf = torch.empty(total, dtype=torch.uint8, device=self.comm_device)
            buf[:_HEADER_BYTES].copy_(torch.frombuffer(head, dtype=torch.uint8))
            if not inline:
                buf[_HEADER_BYTES : _HEADER_BYTES + len(meta)].copy_(
                    torch.frombuffer(bytearray(meta), dtype=torch.uint8)
                )
            for off, b in zip(offsets, parts):
                buf[off : off + b.numel()].copy_(b)
            bufs = [buf]
        else:
            first = torch.zeros(expect, dtype=torch.uint8)
            first[:_HEADER_BYTES] = torch.frombuffer(head, dtype=torch.uint8)
            bufs = [first.to(self.comm_device)]
            if not inline:
                meta_t = torch.frombuffer(bytearray(meta), dtype=torch.uint8)
                bufs.append(meta_t.to(self.comm_device))
            bufs += parts
            if mtype == _DATA:
                self._expect_send[peer] = total if total <= _COMBINE_LIMIT else _HEADER_BYTES
        pending = self._pending[peer]
        while pending and pending[0][0].is_completed():  # forget completed sends' buffers
            pending.pop(0)
        for b in bufs:
            pending.append((dist.isend(b, group=group, group_dst=dst), b))

    def _send_loop(self, peer: int) -> None:
        """Send this peer's messages in the order they were queued (one thread per peer, so
        the executor never waits on the wire; the order per channel is the program order)."""
        while True:
            item = self._outbox[peer].get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            if peer in self._dead:
                continue  # this channel is out of order for good: drop the message
            message, stream = item
            try:
                if stream is not None:
                    torch.cuda.current_stream(self.comm_device).wait_stream(stream)
                self._send_message(peer, *message)
            except Exception as e:  # the peer died: its receiver thread reports it too
                self._mark_broken(peer, e)

    def _recv_into(self, peer: int, t: torch.Tensor) -> None:
        work = dist.irecv(t, group=self._recv_group[peer], group_src=self._recv_rank[peer])
        work.wait()  # bounded by the group's timeout

    def _recv_message(self, peer: int) -> tuple[int, int, int, int, Any, tuple[int, int]]:
        buf = torch.empty(self._expect_recv[peer], dtype=torch.uint8, device=self.comm_device)
        self._recv_into(peer, buf)
        raw = buf[:_HEADER_BYTES].cpu().numpy().tobytes()
        fields = torch.frombuffer(bytearray(raw[: 8 * _FIELDS]), dtype=torch.int64).tolist()
        magic, mtype, kind, stage, mb, step, m, meta_len, total, combined = fields
        if magic != _MAGIC:
            raise RuntimeError(f"corrupt message header from rank {self.ranks[peer]}")
        if meta_len <= _INLINE:
            meta = raw[8 * _FIELDS : 8 * _FIELDS + meta_len]
        elif combined:
            meta = buf[_HEADER_BYTES : _HEADER_BYTES + meta_len].cpu().numpy().tobytes()
        else:
            meta_t = torch.empty(meta_len, dtype=torch.uint8, device=self.comm_device)
            self._recv_into(peer, meta_t)
            meta = meta_t.cpu().numpy().tobytes()
        specs = tensor_specs(meta)
        sizes = [math.prod(shape) * dtype.itemsize for shape, dtype, _ in specs]
        it = iter(self._layout(meta_len, [n for n in sizes if n])[0])
        tensors = []
        for (shape, dtype, rg), n in zip(specs, sizes):
            if not n:
                t = torch.empty(shape, dtype=dtype, device=self.comm_device)
            elif combined:
                off = next(it)
                t = buf[off : off + n].view(dtype).reshape(shape)
            else:
                t = torch.empty(shape, dtype=dtype, device=self.comm_device)
                self._recv_into(peer, t.view(-1).view(torch.uint8))
            if rg and (t.is_floating_point() or t.is_complex()):
                t.requires_grad_(True)
            tensors.append(t)
        if mtype == _DATA and not combined:
            self._expect_recv[peer] = total if total <= _COMBINE_LIMIT else _HEADER_BYTES
        return mtype, kind, stage, mb, decode(meta, tensors), (step, m)

    def _receive_loop(self, peer: int) -> None:
        peer_rank = self.ranks[peer]
        while True:
            step = self._starts[peer].get()
            if step is None:
                return
            try:
                while True:
                    mtype, kind, stage, mb, value, (pstep, pm) = self._recv_message(peer)
                    if mtype == _DATA and (pstep != step or pm != self._num_microbatches):
                        self.abort(
                            Failure(
                                peer_rank,
                                peer,
                                stage,
                                mb,
                                f"ran step {pstep} with {pm} micro-batches while rank "
                                f"{self.rank} ran step {step} with {self._num_microbatches}; "
                                "every rank must call step() with the same batch and chunks",
                            )
                        )
                    if mtype == _DATA:
                        self._box.send(_KIND_NAMES[kind], stage, mb, value)
                        continue
                    if mtype == _ABORT:
                        self.abort(Failure(**value))
                        terminal: Any = Failure(**value)
                    else:
                        terminal = value
                    with self._lock:
                        self._terminals[peer] = terminal
                        self._lock.notify_all()
                    break
            except Exception as e:
                # The peer died or a receive ran past the timeout: this channel is out of
                # order for good. Report it and stop listening.
                if "Timed out" in str(e) or isinstance(e, TimeoutError):
                    f = Failure(
                        peer_rank,
                        peer,
                        None,
                        None,
                        f"sent nothing for {self.timeout:.0f}s (hung or too slow; raise timeout=)",
                    )
                    self._broken = self._broken or f"no message from rank {peer_rank}"
                    self._dead.add(peer)
                    self.abort(f)
                else:
                    self._mark_broken(peer, e)
                with self._lock:
                    self._terminals[peer] = self._failure
                    self._lock.notify_all()
                return


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _detach_tree(value: Any) -> Any:
    meta, tensors = encode(value, "value")
    return decode(meta, tensors)
