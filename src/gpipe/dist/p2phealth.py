"""What one rank knows about the health of its pipeline's channels: the step's first failure,
the peers whose channels are out of order or gone, and why the channels are broken.

:class:`ChannelHealth` is the part of :class:`gpipe.dist.transport.P2PTransport` that turns
what went wrong on a channel (a timeout, a lost connection, a message out of order) into a
:class:`~gpipe.dist.failures.Failure` naming the rank, stage and micro-batch concerned.

The invariant: once a channel is out of order (:attr:`ChannelHealth.broken` set) it stays so,
and every such event records a failure for the step (the first one wins) and wakes a waiting
local receive, so no rank waits on a channel that can no longer deliver.
"""

from __future__ import annotations

from typing import Any

from gpipe.dist.failures import Failure

__all__ = ["Broken", "ChannelHealth", "first_line"]


class Broken(Exception):
    """A channel can no longer be used (raised inside the transport only)."""


class ChannelHealth:
    """Failure bookkeeping of one rank (``rank``, pipeline device ``device``) towards the
    peers of its pipeline (``ranks[peer]`` is a peer's global rank)."""

    rank: int
    device: int
    ranks: list[int]
    timeout: float

    def __init__(self) -> None:
        self._failure: Failure | None = None
        self._broken: str | None = None
        self._dead: set[int] = set()  # peers whose channels are out of order for good
        self._lost: set[int] = set()  # peers that died or closed their connection

    @property
    def broken(self) -> str | None:
        """Why the channels can no longer be used, or ``None`` while they are healthy."""
        return self._broken

    @property
    def failure(self) -> Failure | None:
        """The first failure seen in this step (local or from a peer)."""
        return self._failure

    def abort(self, failure: Failure) -> None:
        """Record ``failure`` (first one wins); subclasses also wake a waiting receive."""
        if self._failure is None:
            self._failure = failure

    def _out_of_order(self, peer: int, key: tuple[str, int, int], step: int, m: int) -> None:
        """``peer`` sent ``key`` of ``step`` with ``m`` micro-batches where this rank expected
        another message: the channel is out of order for good (:class:`Broken`)."""
        self._dead.add(peer)
        self._broken = self._broken or f"messages from rank {self.ranks[peer]} out of order"
        mine = getattr(self, "_step", None), getattr(self, "_m", None)
        self.abort(
            Failure(
                self.ranks[peer],
                peer,
                key[1],
                key[2],
                f"ran step {step} with {m} micro-batches while rank {self.rank} ran step "
                f"{mine[0]} with {mine[1]}; every rank must call step() with the same batch "
                "and chunks",
            )
        )
        raise Broken()

    def _lost_peer(
        self, peer: int, e: BaseException, key: tuple[str, int, int] | None = None
    ) -> Any:
        """A wait on ``peer`` for its message ``key`` (``None``: the end of its step) failed
        with ``e``: a timeout (a peer that closed, never called ``step``, crashed, hung or is
        slow) or a lost connection. Raises :class:`Broken`."""
        if "timed out" in str(e).lower() or isinstance(e, TimeoutError):
            self._dead.add(peer)
            self._broken = self._broken or f"no message from rank {self.ranks[peer]}"
            stage = mb = None
            awaited = "the end of its step"
            if key is not None:  # a value for stage key[1], from the stage before or after
                kind, to, mb = key
                stage = to - 1 if kind == "act" else to + 1
                what = "activation" if kind == "act" else "gradient"
                awaited = f"its {what} of micro-batch {mb} for stage {to}"
            self.abort(
                Failure(
                    self.ranks[peer],
                    peer,
                    stage,
                    mb,
                    f"did not answer within {self.timeout:g}s (rank {self.rank} waited for "
                    f"{awaited}): it closed its pipe, did not call step() (every rank calls it "
                    "each step, with the same batch), crashed or hung, or is too slow "
                    "(then raise timeout=)",
                )
            )
        else:
            self._mark_broken(peer, e)
        raise Broken() from None

    def _mark_broken(self, peer: int | None, error: BaseException) -> None:
        """A transfer with ``peer`` (``None``: a batch of several) raised ``error``."""
        who = "a peer" if peer is None else f"rank {self.ranks[peer]} (pipeline device {peer})"
        self._broken = self._broken or (
            f"lost the connection to {who}: {type(error).__name__}: {first_line(error)}"
        )
        if peer is not None:
            self._dead.add(peer)
            self._lost.add(peer)
            self.abort(Failure(self.ranks[peer], peer, None, None, "died or closed its connection"))
        else:
            self.abort(Failure(self.rank, self.device, None, None, f"transfer failed: {error}"))


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, at most 300 characters."""
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""
