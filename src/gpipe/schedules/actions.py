"""The units of a schedule: :class:`Action` (``F``, ``B`` or ``W`` of one micro-batch through
one stage), :class:`Overlap` (a forward and a backward issued together), the :class:`Event`
of one that ran, and :class:`ScheduleError`.

The invariant: an :class:`Action` or :class:`Overlap` that exists is well-formed (a known
kind, non-negative integer stage and micro-batch; an overlap pairs a forward with a backward).
Nothing here knows schedules as a whole (:mod:`gpipe.schedules.ir`) or their integer codes
(:mod:`gpipe.schedules.codes`), which both build on these types.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "KINDS",
    "KIND_WORDS",
    "Action",
    "Event",
    "Overlap",
    "ScheduleError",
    "Unit",
    "checked_int",
]

Kind = Literal["F", "B", "W"]
KINDS: tuple[str, ...] = ("F", "B", "W")
#: What each kind of unit does, in words (error messages and timelines).
KIND_WORDS: dict[str, str] = {
    "F": "forward",
    "B": "backward",
    "W": "weight-gradient",
    "FB": "overlapped forward and backward",
}


class ScheduleError(ValueError):
    """A schedule that cannot run: a missing or repeated action, or a deadlock."""


def checked_int(value: Any, name: str, minimum: int, error: type[Exception] = ValueError) -> int:
    """``value`` as an int >= ``minimum``; bools, floats and strings are refused by name."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise error(f"{name} must be >= {minimum}, got {value}")
    return int(value)


@dataclass(frozen=True, order=True)
class Action:
    """One unit of pipeline work: ``kind`` of micro-batch ``microbatch`` through ``stage``.

    ``stage`` is the virtual-stage index in ``[0, K·V)``; the device that runs it is the
    schedule's ``placement[stage]``.
    """

    kind: str
    stage: int
    microbatch: int

    def __post_init__(self) -> None:
        s, m = self.stage, self.microbatch
        if type(s) is int and type(m) is int and s >= 0 and m >= 0 and self.kind in KINDS:
            return  # the common case, kept cheap
        if not isinstance(self.kind, str) or self.kind not in KINDS:
            raise ValueError(f"Action kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("stage", "microbatch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(
                    f"Action {name} must be an int, got {type(value).__name__} {value!r}"
                )
            object.__setattr__(self, name, int(value))
        if self.stage < 0 or self.microbatch < 0:
            raise ValueError(f"Action indices must be >= 0, got {self}")

    @property
    def parts(self) -> tuple[Action]:
        """The actions this unit runs: itself (an :class:`Overlap` has two)."""
        return (self,)

    def __str__(self) -> str:
        return f"{self.kind}{self.microbatch}@s{self.stage}"


@dataclass(frozen=True)
class Overlap:
    """A forward and a backward of different micro-batches on one device, issued as one unit.

    DualPipe's overlapped chunk: a GPU runtime runs ``backward`` while ``forward``'s
    communication is in flight (and the other way round), so the pair costs less than the two
    one after the other. The validator treats it as both actions at once (it may start when
    both parts' dependencies are met); the simulator charges ``F + B − overlap·min(F, B)``;
    the executor runs ``forward`` then ``backward``.
    """

    forward: Action
    backward: Action

    def __post_init__(self) -> None:
        f, b = self.forward, self.backward
        if not isinstance(f, Action) or f.kind != "F":
            raise ValueError(f"Overlap.forward must be an F action, got {f!r}")
        if not isinstance(b, Action) or b.kind != "B":
            raise ValueError(f"Overlap.backward must be a B action, got {b!r}")
        if (f.stage, f.microbatch) == (b.stage, b.microbatch):
            raise ValueError(
                f"Overlap({f}, {b}): the backward of a micro-batch needs its own forward first; "
                "pair a forward with the backward of another micro-batch or stage"
            )

    @property
    def kind(self) -> str:
        """``"FB"``: a forward and a backward issued together."""
        return "FB"

    @property
    def parts(self) -> tuple[Action, Action]:
        """The forward, then the backward."""
        return (self.forward, self.backward)

    def __str__(self) -> str:
        return f"{self.forward}+{self.backward}"


Unit = Action | Overlap


@dataclass(frozen=True)
class Event:
    """An action that ran (or was simulated to run) on ``device`` from ``start`` to ``end``.

    Times are seconds for real runs and cost units for simulations. The timeline plotter in
    :mod:`gpipe.trace` draws both.
    """

    action: Action | Overlap
    device: int
    start: float
    end: float
