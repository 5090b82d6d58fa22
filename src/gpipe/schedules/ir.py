"""The schedule IR: actions, overlapped pairs, placements, and the validated :class:`Schedule`.

A schedule says, for every device of the pipeline, the ordered list of units it runs in one
training step. A unit is an :class:`Action` — ``F`` (forward of one micro-batch through one
stage), ``B`` (backward; the full backward, or only the input gradient when the schedule also
has ``W`` actions) or ``W`` (the weight-gradient half of a split backward) — or an
:class:`Overlap`, a forward and a backward of different micro-batches issued together so that a
GPU runtime can overlap one's compute with the other's communication (DualPipe).

Stages are *virtual*: the model is cut into ``K·V`` stages and a *placement* (a tuple,
stage → device) says which device holds each one. The default is round-robin (``s % K``, as in
interleaved 1F1B); V-shaped schedules (ZB-V, DualPipeV) put stages ``d`` and ``2K-1-d`` on
device ``d``.

The invariant kept here: a :class:`Schedule` that exists has been validated (see
:mod:`gpipe.schedules.validate`) — every (kind, stage, micro-batch) occurs exactly once, on
the device its placement names, and the lists can run in order without deadlock.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

__all__ = [
    "KINDS",
    "KIND_WORDS",
    "Action",
    "Event",
    "Overlap",
    "Schedule",
    "ScheduleError",
    "device_of",
    "round_robin",
    "v_shape",
]

from gpipe.schedules.actions import (
    KIND_WORDS,
    KINDS,
    Action,
    Event,
    Overlap,
    ScheduleError,
    Unit,
)
from gpipe.schedules.codes import Codec, decode_lists


def device_of(stage: int, num_devices: int) -> int:
    """The device of (virtual) ``stage`` under the default round-robin placement (``s % K``):
    with V virtual stages device ``d`` holds ``d, d + K, ..., d + (V-1)·K``. A schedule's own
    placement is :attr:`Schedule.placement`."""
    return stage % num_devices


def round_robin(num_devices: int, virtual_stages: int) -> tuple[int, ...]:
    """The default placement: stage ``s`` on device ``s % K`` (interleaved 1F1B's)."""
    return tuple(s % num_devices for s in range(num_devices * virtual_stages))


def v_shape(num_devices: int, virtual_stages: int = 2) -> tuple[int, ...]:
    """A zig-zag placement: chunk ``c`` of ``K`` stages goes down the devices when ``c`` is even
    and back up when it is odd, so with V = 2 device ``d`` holds stages ``d`` and ``2K-1-d``
    (ZB-V, DualPipeV) and stages ``K-1`` and ``K`` share device ``K-1``."""
    k = num_devices
    return tuple(
        (s % k) if (s // k) % 2 == 0 else k - 1 - (s % k) for s in range(k * virtual_stages)
    )


class Schedule:
    """A validated schedule: ``actions[d]`` is device ``d``'s ordered list of units.

    Build one with :func:`gpipe.schedules.get` (a named schedule) or
    :func:`gpipe.schedules.custom` (your own lists); both validate. ``split_backward`` is true
    when some backward is split into ``B`` (input gradient) and ``W`` (weight gradient);
    :meth:`splits` says which: a (stage, micro-batch) whose ``B`` has no ``W`` runs its whole
    backward in ``B``. ``placement[s]`` is the device that holds stage ``s``.

    The lists are also kept as integer codes (:attr:`codes`, laid out by :attr:`codec`; see
    :mod:`gpipe.schedules.codes`), with the order the validation proved they can run in
    (:attr:`replay_order`), so the validator and the simulator walk flat lists of ints;
    ``actions`` is made from them on first use.
    """

    __slots__ = (
        "_actions",
        "_codes",
        "_order",
        "_peaks",
        "_split",
        "name",
        "num_devices",
        "num_microbatches",
        "placement",
        "split_backward",
        "virtual_stages",
    )

    def __init__(
        self,
        name: str,
        num_devices: int,
        num_microbatches: int,
        virtual_stages: int,
        codes: tuple[list[int], ...],
        split_backward: bool,
        placement: tuple[int, ...],
        order: list[tuple[int, int, int]],
        actions: tuple[tuple[Unit, ...], ...] | None = None,
    ) -> None:
        self.name = name
        self.num_devices = num_devices
        self.num_microbatches = num_microbatches
        self.virtual_stages = virtual_stages
        self.split_backward = split_backward
        self.placement = placement
        self._codes = codes
        self._order = order
        self._actions = actions
        self._peaks: tuple[int, ...] | None = None
        self._split: bytearray | None = None

    @property
    def codes(self) -> tuple[list[int], ...]:
        """Per device, the ordered units as integer codes of :attr:`codec` (read only)."""
        return self._codes

    @property
    def codec(self) -> Codec:
        """The :class:`~gpipe.schedules.codes.Codec` of this schedule's shape."""
        return Codec(self.num_stages, self.num_microbatches)

    @property
    def replay_order(self) -> list[tuple[int, int, int]]:
        """The order the validation proved the units can run in, as runs ``(device, start,
        stop)``: device ``d`` runs ``codes[d][start:stop]`` next (read only; see
        :func:`gpipe.schedules.codes.replay`)."""
        return self._order

    @property
    def actions(self) -> tuple[tuple[Unit, ...], ...]:
        """Per device, the ordered units (:class:`Action` or :class:`Overlap`)."""
        if self._actions is None:
            self._actions = decode_lists(self._codes, self.num_stages, self.num_microbatches)
        return self._actions

    def split_flags(self) -> bytearray:
        """Per ``stage·M + micro-batch``: 1 when that backward is split (it has a ``W``).
        The schedule's own; do not change it."""
        if self._split is None:
            self._split = self.codec.split_flags(self._codes if self.split_backward else ())
        return self._split

    def splits(self, stage: int, microbatch: int) -> bool:
        """Whether the backward of (``stage``, ``microbatch``) is split into ``B`` and ``W``
        (a ``W`` of it is in the schedule); otherwise its ``B`` is the whole backward."""
        return bool(self.split_flags()[stage * self.num_microbatches + microbatch])

    @property
    def num_split(self) -> int:
        """How many (stage, micro-batch) backwards are split."""
        return sum(self.split_flags())

    @property
    def peak_activations(self) -> tuple[int, ...]:
        """Per device, the most (stage, micro-batch) activation sets held at once, whatever
        the costs: from the ``F`` until the last backward action of it (``W`` when the backward
        is split, else ``B``); an overlap counts its forward first, then its backward."""
        if self._peaks is None:
            codec, flags = self.codec, self.split_flags()
            self._peaks = tuple(codec.peak_live(codes, flags) for codes in self._codes)
        return self._peaks

    @property
    def num_stages(self) -> int:
        """Number of (virtual) stages the model is cut into: ``K · V``."""
        return self.num_devices * self.virtual_stages

    def device_of(self, stage: int) -> int:
        """Device that runs virtual stage ``stage`` (``placement[stage]``)."""
        return self.placement[stage]

    def stages_of(self, device: int) -> list[int]:
        """Virtual stages held by ``device``, in model order."""
        return [s for s, d in enumerate(self.placement) if d == device]

    @property
    def has_overlaps(self) -> bool:
        """Whether any device runs an :class:`Overlap` unit."""
        return any(isinstance(u, Overlap) for acts in self.actions for u in acts)

    @property
    def forward_backward_separable(self) -> bool:
        """True when every device runs all its ``F`` actions before any backward action.

        Only such schedules can run as ``pipe(x)`` followed by ``loss.backward()``; the others
        need the loss inside the pipeline (``Pipe.step``).
        """
        for acts in self.actions:
            seen_backward = False
            for u in acts:
                if u.kind == "FB" or (u.kind == "F" and seen_backward):
                    return False
                seen_backward |= u.kind != "F"
        return True

    def forward_part(self) -> tuple[tuple[Action, ...], ...]:
        """The ``F`` actions of each device's list, in order (an overlap gives its forward)."""
        return tuple(
            tuple(a for u in acts for a in u.parts if a.kind == "F") for acts in self.actions
        )

    def backward_part(self) -> tuple[tuple[Action, ...], ...]:
        """Each device's backward actions (``B`` and ``W``) in order."""
        return tuple(
            tuple(a for u in acts for a in u.parts if a.kind != "F") for acts in self.actions
        )

    def _key(self) -> tuple:
        return (
            self.name,
            self.num_devices,
            self.num_microbatches,
            self.virtual_stages,
            self.split_backward,
            self.placement,
            tuple(tuple(c) for c in self._codes),
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schedule) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"Schedule(name={self.name!r}, num_devices={self.num_devices}, "
            f"num_microbatches={self.num_microbatches}, virtual_stages={self.virtual_stages}, "
            f"split_backward={self.split_backward}, placement={self.placement})"
        )

    def __str__(self) -> str:
        lines = [
            f"{self.name}: K={self.num_devices} M={self.num_microbatches} V={self.virtual_stages}"
        ]
        for d, acts in enumerate(self.actions):
            lines.append(f"  device {d}: " + " ".join(str(a) for a in acts))
        return "\n".join(lines)


def check_placement(placement: Sequence[int], num_devices: int, num_stages: int) -> tuple[int, ...]:
    """``placement`` as a tuple of ``num_stages`` device indices in ``[0, K)``, every device
    holding at least one stage; a mistake is named."""
    if isinstance(placement, (str, bytes)) or not isinstance(placement, Sequence):
        raise ScheduleError(
            f"placement must be a sequence of device indices, one per stage, got "
            f"{type(placement).__name__} {placement!r:.60}"
        )
    out = []
    for s, d in enumerate(placement):
        if isinstance(d, bool) or not isinstance(d, numbers.Integral) or not 0 <= d < num_devices:
            raise ScheduleError(
                f"placement[{s}] is {d!r}; it must be a device index in [0, {num_devices})"
            )
        out.append(int(d))
    if len(out) != num_stages:
        raise ScheduleError(
            f"placement has {len(out)} entries but the schedule has {num_stages} stages; give "
            "one device per stage"
        )
    empty = sorted(set(range(num_devices)) - set(out))
    if empty:
        raise ScheduleError(f"placement leaves device {empty[0]} without a stage: {tuple(out)}")
    return tuple(out)
