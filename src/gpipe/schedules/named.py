"""The registry of named schedules, and the classic ones: GPipe, 1F1B and interleaved 1F1B.

A registry entry is a builder ``fn(K, M, V)`` (per-device lists of actions, or of integer codes
for the built-in schedules, which are built and checked without per-action objects), whether it
takes a number of virtual stages, its placement ``fn(K, V) -> stage → device`` and, for
schedules with a fixed number of stages per device, that number.

The invariant: :func:`get` returns only validated schedules, and the placement it reports for
``(K, V)`` is the one its schedules are validated against, so a pipe may place its stages
before it knows the micro-batch count.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any, NamedTuple

from gpipe.schedules.actions import checked_int
from gpipe.schedules.codes import Codec
from gpipe.schedules.ir import Schedule, round_robin
from gpipe.schedules.validate import from_codes, validate

__all__ = ["available", "get", "interleaving", "placement_of", "register", "resolve_virtual"]

Builder = Callable[..., list[list[Any]]]
Placement = Callable[[int, int], tuple[int, ...]]


class Entry(NamedTuple):
    """One named schedule: how to build it and where its stages go."""

    builder: Builder
    virtual: bool  # takes virtual_stages= (default 2)
    placement: Placement = round_robin
    fixed_virtual: int | None = None  # a fixed number of stages per device (V-shaped schedules)
    compact: bool = False  # the builder emits integer codes (built-in schedules)


_REGISTRY: dict[str, Entry] = {}


def _unknown(name: object) -> ValueError:
    close = difflib.get_close_matches(str(name).strip().lower(), available(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"unknown schedule {name!r}{hint}; choose one of {available()}")


def _key(name: object) -> str:
    """A schedule name as the registry spells it: case, ``_`` and surrounding blanks ignored."""
    if not isinstance(name, str):
        raise TypeError(
            f"schedule must be a name (one of {available()}) or a Schedule, got "
            f"{type(name).__name__} {name!r}"
        )
    return name.strip().lower().replace("_", "-")


def register(
    name: str,
    *,
    virtual: bool = False,
    placement: Placement | None = None,
    virtual_stages: int | None = None,
    _compact: bool = False,
) -> Callable[[Builder], Builder]:
    """Register ``fn(K, M, V) -> list of per-device action lists`` under ``name``.

    The name is stored as :func:`get` looks it up (lower case, ``-`` for ``_``), so
    ``register("My_Sched")`` is found by ``get("My_Sched", ...)``. ``virtual=True``: the
    schedule takes ``virtual_stages`` (default 2). ``virtual_stages=V``: it always has V stages
    per device. ``placement(K, V)`` gives the device of each stage (default ``s % K``).
    """
    key = _key(name)
    if not key:
        raise ValueError("a schedule needs a non-empty name")
    if placement is not None and not callable(placement):
        raise TypeError(f"placement must be a function (K, V) -> tuple, got {placement!r:.40}")
    if virtual_stages is not None:
        virtual_stages = checked_int(virtual_stages, "virtual_stages", 1)

    def deco(fn: Builder) -> Builder:
        if not callable(fn):
            raise TypeError(f"register({name!r}) decorates a function, got {fn!r:.40}")
        _REGISTRY[key] = Entry(fn, virtual, placement or round_robin, virtual_stages, _compact)
        return fn

    return deco


def available() -> list[str]:
    """Names accepted by :func:`get`."""
    return sorted(_REGISTRY)


def interleaving() -> list[str]:
    """Names of the schedules that take ``virtual_stages`` (any V, default 2)."""
    return [name for name in available() if _REGISTRY[name].virtual]


def needs_interleaving() -> str:
    """``schedule='interleaved' or ...``: what an error names when V > 1 is asked of a schedule
    with one stage per device."""
    return "schedule=" + " or ".join(repr(n) for n in interleaving())


def unregister(name: str) -> None:
    """Remove the schedule registered under ``name`` (spelled as :func:`register` takes it); a
    name not registered is ignored. For code that registers a schedule for a while (tests)."""
    _REGISTRY.pop(_key(name), None)


def lookup(name: object) -> tuple[str, Entry]:
    """``(key, entry)`` of the registered schedule ``name`` (any spelling :func:`get` takes);
    an unknown name raises :class:`ValueError` naming the closest registered one."""
    key = _key(name)
    if key not in _REGISTRY:
        raise _unknown(name)
    return key, _REGISTRY[key]


def resolve_virtual(name: object, virtual_stages: int | None) -> int:
    """The number of stages per device schedule ``name`` uses when asked for
    ``virtual_stages`` (``None``: its default); a number it cannot take is refused."""
    _, entry = lookup(name)
    if virtual_stages is not None:
        virtual_stages = checked_int(virtual_stages, "virtual_stages", 1)
    if entry.fixed_virtual is not None:
        if virtual_stages not in (None, entry.fixed_virtual):
            raise ValueError(
                f"schedule {name!r} always has {entry.fixed_virtual} stages per device; drop "
                f"virtual_stages={virtual_stages} (or pass {entry.fixed_virtual})"
            )
        return entry.fixed_virtual
    if entry.virtual:
        return 2 if virtual_stages is None else virtual_stages
    if virtual_stages not in (None, 1):
        raise ValueError(
            f"schedule {name!r} has one stage per device; virtual_stages={virtual_stages} "
            f"needs {needs_interleaving()}"
        )
    return 1


def placement_of(name: str, num_devices: int, virtual_stages: int | None = None) -> tuple[int, ...]:
    """Stage → device of schedule ``name`` on ``num_devices`` devices, known before the
    micro-batch count (``virtual_stages`` as :func:`get` takes it)."""
    _, entry = lookup(name)
    k = checked_int(num_devices, "num_devices", 1)
    return tuple(entry.placement(k, resolve_virtual(name, virtual_stages)))


def get(
    name: str, num_devices: int, num_microbatches: int, *, virtual_stages: int | None = None
) -> Schedule:
    """The named schedule for ``num_devices`` devices and ``num_microbatches`` micro-batches.

    ``virtual_stages`` (V) applies to ``"interleaved"`` and ``"interleaved-zb"`` only (default
    2; :func:`interleaving`); ``zb-v`` and ``dualpipe-v`` always have two stages per device, the
    others one.
    """
    key, entry = lookup(name)
    num_devices = checked_int(num_devices, "num_devices", 1)
    num_microbatches = checked_int(num_microbatches, "num_microbatches", 1)
    v = resolve_virtual(name, virtual_stages)
    place = tuple(entry.placement(num_devices, v))
    lists = entry.builder(num_devices, num_microbatches, v)
    if entry.compact:
        return from_codes(tuple(lists), num_microbatches, v, key, place)
    return validate(lists, num_microbatches, v, name=key, placement=place)


@register("gpipe", _compact=True)
def _gpipe(k: int, m: int, v: int) -> list[list[int]]:
    """GPipe fill-drain: every forward, then every backward in reverse micro-batch order."""
    c = Codec(k, m)
    return [
        [c.f(d, i) for i in range(m)] + [c.b(d, i) for i in reversed(range(m))] for d in range(k)
    ]


@register("1f1b", _compact=True)
def _one_f_one_b(k: int, m: int, v: int) -> list[list[int]]:
    """PipeDream-flush: ``K-d-1`` warm-up forwards, then alternate one forward, one backward.

    Device ``d`` holds at most ``K - d`` micro-batches of activations at once.
    """
    c = Codec(k, m)
    out = []
    for d in range(k):
        warm = min(k - d - 1, m)
        acts = [c.f(d, i) for i in range(warm)]
        for i in range(m - warm):
            acts.append(c.f(d, warm + i))
            acts.append(c.b(d, i))
        acts += [c.b(d, i) for i in range(m - warm, m)]
        out.append(acts)
    return out


@register("interleaved", virtual=True, _compact=True)
def _interleaved(k: int, m: int, v: int) -> list[list[int]]:
    """Interleaved 1F1B (Megatron-LM): V model chunks per device, round-robin.

    Micro-batches go through the device's chunks in groups of ``K``; the forward order on a
    device is group-major (K micro-batches on chunk 0, the same K on chunk 1, ...), the backward
    order mirrors it from the last chunk. Warm-up is ``(K-d-1)·2 + (V-1)·K`` forwards, then one
    forward and one backward alternate. When ``M`` is not a multiple of ``K`` the last group is
    shorter, and with that warm-up some such ``M`` deadlock (e.g. K=4, M=5, V=3; K=5, M=7,
    V=2); there the warm-up is ``(K-d-1) + (V-1)·K`` instead (interleaved-zb's, which runs
    without deadlock for every ``M``), so every ``M ≥ 1`` works.
    """
    total = m * v
    out = []
    for d in range(k):
        fwd, bwd = interleaved_order(k, m, v, d)
        ramp = (k - d - 1) * (2 if m % k == 0 else 1)
        warm = min(ramp + (v - 1) * k, total)
        acts = fwd[:warm]
        for j in range(total - warm):
            acts.append(fwd[warm + j])
            acts.append(bwd[j])
        acts += bwd[total - warm :]
        out.append(acts)
    return out


def interleaved_order(k: int, m: int, v: int, d: int) -> tuple[list[int], list[int]]:
    """Device ``d``'s forward codes and backward codes in interleaved order (codes of a
    ``Codec(K·V, M)``): the forwards group-major — micro-batches in groups of ``K``, each group
    through the device's chunks ``0 .. V-1`` in turn — and the backwards in the same order
    from the last chunk down. Interleaved schedules differ only in how they merge the two."""
    c = Codec(k * v, m)
    fo: list[tuple[int, int]] = []
    for g0 in range(0, m, k):
        group = range(g0, min(g0 + k, m))
        for ch in range(v):
            fo += [(ch, i) for i in group]
    fwd = [c.f(ch * k + d, i) for ch, i in fo]
    bwd = [c.b((v - 1 - ch) * k + d, i) for ch, i in fo]
    return fwd, bwd
