"""What a failed distributed step tells every rank: where it failed, and the error others see.

The invariant: a :class:`Failure` names the rank, its pipeline device and, when the failure
is tied to one action, the stage and micro-batch; :class:`PeerError` carries it to the ranks
that did not fail, so every rank's error names the same place.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Failure", "PeerError"]


@dataclass(frozen=True)
class Failure:
    """Where a step failed: the rank (and its pipeline device), stage, micro-batch and why.

    ``stage``/``microbatch`` are ``None`` when the failure is not tied to one action (a peer
    that died, or a wait that ran past the timeout).
    """

    rank: int
    device: int
    stage: int | None
    microbatch: int | None
    error: str

    def describe(self) -> str:
        """One line naming the rank, device, stage and micro-batch."""
        where = f"rank {self.rank} (pipeline device {self.device}"
        if self.stage is not None:
            where += f", stage {self.stage}"
        if self.microbatch is not None:
            where += f", micro-batch {self.microbatch}"
        return f"{where}): {self.error}"


class PeerError(RuntimeError):
    """Raised on a rank whose step stopped because another rank failed (or died)."""

    def __init__(self, failure: Failure, rank: int) -> None:
        self.failure = failure
        self.rank = failure.rank
        self.stage = failure.stage
        self.microbatch = failure.microbatch
        super().__init__(
            f"pipeline step failed on {failure.describe()}; rank {rank} stopped its step"
        )
