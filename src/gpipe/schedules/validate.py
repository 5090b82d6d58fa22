"""Validation: the proof that a schedule can run, and the one replay order.

The invariant kept here: :func:`validate` returns a :class:`~gpipe.schedules.ir.Schedule` only
when every ``F`` and ``B`` of every (stage, micro-batch) occurs exactly once, and a ``W`` at
most once (a ``B`` without one is that micro-batch's whole backward), each on the device its
placement names, and executing each device's list in order never deadlocks. Its replay order
is stored in the schedule, so the simulator times exactly the order proven here.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any

from gpipe.schedules.actions import Action, Overlap, ScheduleError, Unit, checked_int
from gpipe.schedules.codes import Codec, encode_lists, in_order, replay
from gpipe.schedules.ir import Schedule, check_placement, round_robin

__all__ = ["custom", "dependencies", "execution_order", "from_codes", "validate"]


def dependencies(action: Unit, num_stages: int, split_backward: bool) -> list[Action]:
    """The actions that must finish before ``action`` may start.

    ``F(s, m)`` needs ``F(s-1, m)``; ``B(s, m)`` needs ``F(s, m)`` and ``B(s+1, m)``;
    ``W(s, m)`` needs ``B(s, m)``. The last stage computes the loss inside its ``F``, so its
    ``B`` needs only its own ``F``. An :class:`Overlap` needs what both its parts need.
    """
    if isinstance(action, Overlap):
        return [d for a in action.parts for d in dependencies(a, num_stages, split_backward)]
    s, m = action.stage, action.microbatch
    if action.kind == "F":
        return [Action("F", s - 1, m)] if s > 0 else []
    if action.kind == "B":
        deps = [Action("F", s, m)]
        if s < num_stages - 1:
            deps.append(Action("B", s + 1, m))
        return deps
    if not split_backward:
        raise ScheduleError(f"{action}: a W action needs a schedule with split backward")
    return [Action("B", s, m)]


def _check_units(
    lists: tuple[tuple[Any, ...], ...], num_microbatches: int, num_stages: int, placement: tuple
) -> bool:
    """Every unit well-formed, in range, on its device, once; every action present. Returns
    whether the backward is split; raises :class:`ScheduleError` naming the first mistake."""
    k = len(lists)
    v = num_stages // k
    split = False
    seen: dict[Action, int] = {}
    for d, acts in enumerate(lists):
        for u in acts:
            if not isinstance(u, (Action, Overlap)):
                raise ScheduleError(
                    f"device {d}: expected an Action, got {type(u).__name__} {u!r}; write "
                    "Action('F', stage, microbatch) or use custom() with strings like 'F0@s1'"
                )
            for a in u.parts:
                split = split or a.kind == "W"
                if a.stage >= num_stages:
                    raise ScheduleError(
                        f"device {d}: {a} names stage {a.stage}, but the schedule has only "
                        f"{num_stages} stages (K={k} devices x V={v})"
                    )
                if a.microbatch >= num_microbatches:
                    raise ScheduleError(
                        f"device {d}: {a} names micro-batch {a.microbatch}, but there are only "
                        f"{num_microbatches}"
                    )
                if placement[a.stage] != d:
                    rule = (
                        "stage s runs on device s % K"
                        if placement == round_robin(k, v)
                        else f"the placement puts stage {a.stage} there"
                    )
                    raise ScheduleError(
                        f"device {d}: {a} belongs on device {placement[a.stage]} ({rule})"
                    )
                if a in seen:
                    raise ScheduleError(f"device {d}: {a} occurs twice")
                seen[a] = d
    for kind in ("F", "B"):  # a W is optional: without one, B is the whole backward
        for s in range(num_stages):
            for m in range(num_microbatches):
                if Action(kind, s, m) not in seen:
                    raise ScheduleError(
                        f"action {Action(kind, s, m)} is missing (device {placement[s]} must "
                        "run it)"
                    )
    return split


def validate(
    actions: Sequence[Sequence[Unit]],
    num_microbatches: int,
    virtual_stages: int = 1,
    name: str = "custom",
    placement: Sequence[int] | None = None,
) -> Schedule:
    """Check ``actions`` and return it as a :class:`Schedule`.

    Proves that every ``F`` and ``B`` of every (stage, micro-batch) occurs exactly once, and
    a ``W`` at most once, on the device that holds the stage (``placement[stage]``, default
    ``stage % K``), and that executing each device's list in order never deadlocks. A ``B``
    with no ``W`` of its (stage, micro-batch) computes the whole backward; with one, only the
    input gradient, the ``W`` forming the weight gradients later. Raises
    :class:`ScheduleError` naming the offending action, or, for a deadlock, the action each
    stuck device waits at and the dependency it waits for.
    """
    _check_lists(actions, "actions")
    k = len(actions)
    if k < 1:
        raise ScheduleError("a schedule needs at least one device")
    num_microbatches = checked_int(num_microbatches, "num_microbatches", 1, ScheduleError)
    virtual_stages = checked_int(virtual_stages, "virtual_stages", 1, ScheduleError)
    n = k * virtual_stages
    place = (
        round_robin(k, virtual_stages) if placement is None else (check_placement(placement, k, n))
    )
    lists = tuple(tuple(acts) for acts in actions)
    split = _check_units(lists, num_microbatches, n, place)
    codec = Codec(n, num_microbatches)
    codes = encode_lists(lists, codec)
    order = replay(codes, codec, split, name)
    return Schedule(name, k, num_microbatches, virtual_stages, codes, split, place, order, lists)


def from_codes(
    codes: tuple[list[int], ...],
    num_microbatches: int,
    virtual_stages: int,
    name: str,
    placement: tuple[int, ...],
) -> Schedule:
    """A schedule from a builder's integer codes (see :class:`~gpipe.schedules.codes.Codec`),
    validated on the codes themselves; a mistake is reported as :func:`validate` words it."""
    k = len(codes)
    n = k * virtual_stages
    codec = Codec(n, num_microbatches)
    top, N, first_w = codec.top, codec.N, codec.first_w
    # the checks run in builtins and comprehensions (min, max, set, itemgetter), without a
    # Python-level step per action; an overlap is checked as its two parts
    per_device = [codec.actions_of(lst) for lst in codes]
    flat = list(itertools.chain.from_iterable(per_device))
    split = bool(flat) and max(flat) >= first_w
    ok = (
        bool(flat)
        and min(flat) >= 0
        and max(flat) < top
        and len(set(flat)) == len(flat)
        # every F and B; a W at most once (the rest are W codes, distinct)
        and len(flat) - sum(map(first_w.__le__, flat)) == 2 * N
    )
    if ok:
        per_stage = ([d] * num_microbatches for d in placement)
        stage_dev = list(itertools.chain.from_iterable(per_stage)) * 3
        for d, lst in enumerate(per_device):
            devs = (
                operator.itemgetter(*lst)(stage_dev)
                if len(lst) > 1
                else [stage_dev[c] for c in lst]
            )
            if devs.count(d) != len(devs):
                ok = False
                break
    if not ok:  # the readable check names the mistake
        lists = tuple(tuple(codec.unit(c) for c in lst) for lst in codes)
        _check_units(lists, num_microbatches, n, placement)
        raise ScheduleError(f"schedule {name!r} is malformed")  # pragma: no cover
    order = replay(codes, codec, split, name)
    return Schedule(name, k, num_microbatches, virtual_stages, codes, split, placement, order)


def execution_order(
    actions: Sequence[Sequence[Unit]], num_stages: int, split_backward: bool, name: str = "custom"
) -> list[tuple[int, Unit]]:
    """Replay every device's list in order and return ``(device, unit)`` pairs in an order in
    which each unit comes after all its dependencies (devices advance greedily in turn).

    Raises :class:`ScheduleError` when no device can advance: the schedule deadlocks. The
    message names, per stuck device, the action it waits at and the dependencies it waits for.
    """
    lists = [list(acts) for acts in actions]
    m = 1 + max((a.microbatch for acts in lists for u in acts for a in u.parts), default=0)
    codec = Codec(num_stages, m)
    if not split_backward and any(a.kind == "W" for acts in lists for u in acts for a in u.parts):
        w = next(a for acts in lists for u in acts for a in u.parts if a.kind == "W")
        dependencies(w, num_stages, split_backward)  # raises, naming the W
    codes = encode_lists(lists, codec)
    runs = replay(codes, codec, split_backward, name)
    return [(d, codec.unit(c)) for d, c in in_order(codes, runs)]


def _check_lists(actions: Any, what: str) -> None:
    """``actions`` must be one list of actions per device (a flat list is a common slip)."""
    example = "e.g. [['F0@s0', 'B0@s0'], ['F0@s1', 'B0@s1']]"
    if isinstance(actions, (str, bytes)) or not isinstance(actions, Sequence):
        raise ScheduleError(
            f"{what} must be a list with one list of actions per device ({example}), got "
            f"{type(actions).__name__} {actions!r:.60}"
        )
    for d, acts in enumerate(actions):
        if isinstance(acts, (str, bytes, Action, Overlap)) or not isinstance(acts, Sequence):
            raise ScheduleError(
                f"{what}[{d}] is {type(acts).__name__} {acts!r:.40}, not a list of actions: give "
                f"one list per device ({example})"
            )


def custom(
    actions: Sequence[Sequence[Unit | str]],
    num_microbatches: int,
    virtual_stages: int = 1,
    *,
    placement: Sequence[int] | None = None,
) -> Schedule:
    """A user's own schedule, validated. Units may be :class:`Action`, :class:`Overlap` or
    strings like ``"F3@s1"`` (an overlap: ``"F3@s1+B0@s6"``); a ``B`` without its ``W`` is a
    whole backward. ``placement[s]`` is the device of stage ``s`` (default ``s % K``)."""
    _check_lists(actions, "actions")
    parsed = [[_parse(a) if isinstance(a, str) else a for a in acts] for acts in actions]
    return validate(parsed, num_microbatches, virtual_stages, name="custom", placement=placement)


def _parse(text: str) -> Unit:
    if "+" in text:
        f, _, b = text.partition("+")
        fa, ba = _parse(f), _parse(b)
        try:
            return Overlap(fa, ba)  # type: ignore[arg-type]
        except ValueError as e:
            raise ScheduleError(f"cannot parse overlap {text!r}: {e}") from None
    try:
        head, stage = text.strip().split("@s")
        return Action(head[0], int(stage), int(head[1:]))
    except (ValueError, IndexError, TypeError):
        raise ScheduleError(
            f"cannot parse action {text!r}; write it as <kind><micro-batch>@s<stage> with kind "
            "F, B or W, e.g. 'F3@s1' (an overlapped pair: 'F3@s1+B0@s6')"
        ) from None
