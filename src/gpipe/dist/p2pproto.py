"""The point-to-point protocol of the distributed transport: which messages a step carries on
each channel, in which order, and the header that announces each one.

A *channel* is an ordered pair of pipeline devices ``a → b``. Its messages in one step are
known to both ends before the step starts: the values ``a``'s actions send to stages that
``b`` runs, in ``a``'s action order (:func:`channel_messages`), then one terminal message.
Each message is a fixed-size header on the CPU (gloo) header group, with the pytree's metadata
inline when it fits, and then its tensors:

- *direct*: on the point-to-point group of the channel's edge (sender → receiver), one
  transfer per tensor, when both ends expected exactly those byte sizes (the sizes this
  message had in the previous step: the steady state of training); the receiver posted these
  receives ahead of time;
- *bulk*: on the header group under tag :data:`BULK_TAG`, after the header (the first step,
  a shape change, end-of-step payloads); if the receiver expected other sizes, the sender
  also sends placeholder buffers of the expected sizes on the point-to-point group, so the
  receives posted ahead are always matched one for one.

With *inline control* (the default when tensors travel in host memory, i.e. gloo), a data
message both ends expect — the value's metadata equals the one this key carried in the
previous step — has no header at all: its tensors go packed into one buffer on the
point-to-point group, ended by a :data:`TRAILER_BYTES` trailer (:func:`pack_trailer`) that
repeats the key, step and M. A trailer marked :data:`OTHER` says the buffer is a placeholder
and the message follows as a header (a new shape or structure, ``SKIP``); the receiver
then receives that header. So the steady state costs one message per value, and the header
group carries only what the receiver cannot know. Under NCCL reading a trailer would be a
blocking device-to-host copy per message, so there every message has a header.

``SKIP`` fills a position its sender never reached (its step failed), ``END`` and ``ABORT``
end the channel's step. The invariant: both ends of a channel walk the same positions in
the same order every step, whatever fails, so the groups stay in order for the next step.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from gpipe.dist.failures import Failure

__all__ = [
    "ABORT",
    "BULK_TAG",
    "DATA",
    "END",
    "HEADER_BYTES",
    "INLINE",
    "OTHER",
    "SAME",
    "SKIP",
    "TRAILER_BYTES",
    "ChannelPlans",
    "Channels",
    "Header",
    "Trailer",
    "channel_messages",
    "channels",
    "failure_body",
    "failure_from",
    "pack_header",
    "pack_trailer",
    "remote_inputs",
    "unpack_header",
    "unpack_trailer",
]

MAGIC = 0x67706970  # "gpip"
DATA, SKIP, END, ABORT = 1, 2, 3, 4
DIRECT, BULK = 0, 1
HEAD_TAG, BULK_TAG = 0, 1
# header fields: magic, type, kind, stage, micro-batch, step, micro-batches, metadata bytes,
# mode (direct or bulk)
_FIELDS = 9
HEADER_BYTES = 512
INLINE = HEADER_BYTES - 8 * _FIELDS  # metadata up to this size travels inside the header
TRAILER_BYTES = 64  # inline control: magic, status, kind, stage, micro-batch, step, M, 0
SAME, OTHER = 0, 1  # the buffer holds the value / is a placeholder, a header follows
KIND_CODES = {"act": 0, "grad": 1}
KIND_NAMES = {v: k for k, v in KIND_CODES.items()}

Key = tuple[str, int, int]  # (kind, destination stage, micro-batch)


def channel_messages(
    per_device: Sequence[Sequence[Any]], owner: Callable[[int], int], num_stages: int
) -> dict[tuple[int, int], list[Key]]:
    """Every channel's data messages of one step, in the order their sender produces them.

    ``F`` on a stage but the last sends its activation to the next stage, ``B`` on a stage but
    the first sends its input gradient to the previous one; a value for a stage on the same
    device stays local and is no message.
    """
    out: dict[tuple[int, int], list[Key]] = {}
    for d, actions in enumerate(per_device):
        for way, key in _traffic(actions, d, owner, num_stages):
            if way == "out":
                out.setdefault((d, owner(key[1])), []).append(key)
    return out


class Channels(NamedTuple):
    """What one device sends and receives in a step: per peer its outgoing and incoming keys
    in order (``out``, ``into``), where each incoming key sits (``where``: peer, position),
    the device's remote inputs in its action order (``wants``), and per peer, for each
    incoming position, how many of this device's positions to that peer the peer had read
    before it sent it (``acks``: once it arrives, those sends are done)."""

    out: dict[int, list[Key]]
    into: dict[int, list[Key]]
    where: dict[Key, tuple[int, int]]
    wants: list[Key]
    acks: dict[int, list[int]]


def channels(
    per_device: Sequence[Sequence[Any]],
    device: int,
    peers: Sequence[int],
    owner: Callable[[int], int],
    num_stages: int,
) -> Channels:
    """``device``'s :class:`Channels` in a step whose actions are ``per_device``."""
    seqs = channel_messages(per_device, owner, num_stages)
    out = {p: seqs.get((device, p), []) for p in peers}
    into = {p: seqs.get((p, device), []) for p in peers}
    where = {k: (p, i) for p in peers for i, k in enumerate(into[p])}
    mine = per_device[device] if device < len(per_device) else []
    acks = {p: _acks(per_device, p, device, out[p], owner, num_stages) for p in peers}
    return Channels(out, into, where, remote_inputs(mine, device, owner, num_stages), acks)


def _acks(
    per_device: Sequence[Sequence[Any]],
    sender: int,
    device: int,
    back: list[Key],
    owner: Callable[[int], int],
    num_stages: int,
) -> list[int]:
    """For each message ``sender`` sends ``device`` in a step, how many of ``device``'s
    messages to it (``back``, in order) ``sender`` had read first: an action receives its
    input (reading its channel up to it) before it sends its output."""
    if sender >= len(per_device):
        return []
    pos = {k: i for i, k in enumerate(back)}
    read, acks = 0, []
    for way, key in _traffic(per_device[sender], sender, owner, num_stages):
        if way == "in":
            if key in pos:
                read = max(read, pos[key] + 1)
        elif owner(key[1]) == device:
            acks.append(read)
    return acks


def _traffic(
    actions: Sequence[Any], device: int, owner: Callable[[int], int], num_stages: int
) -> list[tuple[str, Key]]:
    """``device``'s remote inputs (``"in"``) and outputs to other devices (``"out"``), in
    the order its actions read and send them."""
    last = num_stages - 1
    out: list[tuple[str, Key]] = []
    for a in _flat(actions):
        if a.kind == "F":
            if a.stage != 0 and owner(a.stage - 1) != device:
                out.append(("in", ("act", a.stage, a.microbatch)))
            if a.stage != last and owner(a.stage + 1) != device:
                out.append(("out", ("act", a.stage + 1, a.microbatch)))
        elif a.kind == "B":
            if a.stage != last and owner(a.stage + 1) != device:
                out.append(("in", ("grad", a.stage, a.microbatch)))
            if a.stage != 0 and owner(a.stage - 1) != device:
                out.append(("out", ("grad", a.stage - 1, a.microbatch)))
    return out


class ChannelPlans:
    """One device's :func:`channels`, computed once per schedule: a pipe runs the same few
    schedules (one per M and grad mode, each a cached object) every step."""

    def __init__(
        self, device: int, peers: Sequence[int], owner: Callable[[int], int], num_stages: int
    ) -> None:
        self._args = (device, list(peers), owner, num_stages)
        self._plans: dict[int, tuple[Any, Channels]] = {}

    def of(self, per_device: Sequence[Sequence[Any]]) -> Channels:
        """The :class:`Channels` of a step whose actions are ``per_device``."""
        got = self._plans.get(id(per_device))
        if got is None or got[0] is not per_device:  # a new object (ids are reused)
            if len(self._plans) >= 16:
                self._plans.clear()
            got = self._plans[id(per_device)] = (per_device, channels(per_device, *self._args))
        return got[1]


def remote_inputs(
    actions: Sequence[Any], device: int, owner: Callable[[int], int], num_stages: int
) -> list[Key]:
    """The values ``device``'s actions receive from other devices, in its action order."""
    return [key for way, key in _traffic(actions, device, owner, num_stages) if way == "in"]


def _flat(actions: Sequence[Any]) -> list[Any]:
    """The actions in order, an overlapped unit (``Overlap``) as its parts."""
    return [a for u in actions for a in getattr(u, "parts", (u,))]


class Header:
    """A decoded header: the message type, its key, the sender's step, M, metadata, mode."""

    __slots__ = ("key", "meta", "meta_len", "mode", "mtype", "num_microbatches", "step")

    def __init__(self, fields: list[int], inline: bytes) -> None:
        magic, self.mtype, kind, stage, mb, self.step, self.num_microbatches, n, self.mode = fields
        if magic != MAGIC:
            raise RuntimeError(
                "corrupt message header (wrong magic number): the ranks' messages are out of "
                "order; build a new DistributedPipe on every rank"
            )
        self.key: Key = (KIND_NAMES.get(kind, "act"), stage, mb)
        self.meta_len = n
        self.meta: bytes | None = inline[:n] if n <= INLINE else None


def pack_header(
    mtype: int, key: Key | None, step: int, num_microbatches: int, meta: bytes, mode: int
) -> torch.Tensor:
    """The header as a CPU ``uint8`` tensor of :data:`HEADER_BYTES` (metadata inline if it
    fits; otherwise it follows as a bulk transfer)."""
    kind, stage, mb = key if key is not None else ("act", 0, 0)
    fields = [MAGIC, mtype, KIND_CODES[kind], stage, mb, step, num_microbatches, len(meta), mode]
    head = torch.zeros(HEADER_BYTES, dtype=torch.uint8)
    head[: 8 * _FIELDS] = torch.tensor(fields, dtype=torch.int64).view(torch.uint8)
    if len(meta) <= INLINE:
        head[8 * _FIELDS : 8 * _FIELDS + len(meta)] = torch.frombuffer(
            bytearray(meta), dtype=torch.uint8
        )
    return head


def unpack_header(head: torch.Tensor) -> Header:
    """Decode a header received into ``head`` (see :func:`pack_header`)."""
    raw = head.numpy().tobytes()
    fields = torch.frombuffer(bytearray(raw[: 8 * _FIELDS]), dtype=torch.int64).tolist()
    return Header(fields, raw[8 * _FIELDS :])


def failure_body(failure: Failure) -> bytes:
    """``failure`` as the metadata of a ``SKIP`` or ``ABORT`` message."""
    return json.dumps(
        {
            "rank": failure.rank,
            "device": failure.device,
            "stage": failure.stage,
            "microbatch": failure.microbatch,
            "error": failure.error,
        }
    ).encode()


def failure_from(meta: bytes) -> Failure:
    """The :class:`Failure` a ``SKIP`` or ``ABORT`` message carries."""
    return Failure(**json.loads(meta.decode()))


class Trailer:
    """A decoded trailer of an inline message: its status, key, the sender's step and M."""

    __slots__ = ("key", "num_microbatches", "status", "step")

    def __init__(self, fields: list[int]) -> None:
        magic, self.status, kind, stage, mb, self.step, self.num_microbatches, _ = fields
        if magic != MAGIC:
            raise RuntimeError(
                "corrupt message trailer (wrong magic number): the ranks' messages are out of "
                "order; build a new DistributedPipe on every rank"
            )
        self.key: Key = (KIND_NAMES.get(kind, "act"), stage, mb)


def pack_trailer(status: int, key: Key, step: int, num_microbatches: int) -> torch.Tensor:
    """The trailer of an inline message as a CPU ``uint8`` tensor of :data:`TRAILER_BYTES`."""
    kind, stage, mb = key
    fields = [MAGIC, status, KIND_CODES[kind], stage, mb, step, num_microbatches, 0]
    return torch.tensor(fields, dtype=torch.int64).view(torch.uint8)


def unpack_trailer(buf: torch.Tensor) -> Trailer:
    """Decode the trailer at the end of an inline buffer (CPU ``uint8``)."""
    return Trailer(buf[-TRAILER_BYTES:].view(torch.int64).tolist())
