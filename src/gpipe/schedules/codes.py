"""Schedules as flat lists of integers, and the one replay that walks them.

With ``n`` stages and ``M`` micro-batches (``N = n·M``) the action ``(kind, s, m)`` is the
integer ``kind·N + s·M + m`` (kind 0 = F, 1 = B, 2 = W), so a dependency is arithmetic:
``F(s-1, m)`` is ``code - M``, ``B(s+1, m)`` is ``code + M``, ``F(s, m)`` for ``B(s, m)`` and
``B(s, m)`` for ``W(s, m)`` are ``code - N``. An :class:`~gpipe.schedules.actions.Overlap` of
``F = f`` and ``B = N + b`` is ``3N + f·N + b``. The validator and the simulator both walk these
lists — no per-action objects, no dictionaries in the hot loops — so a schedule of a hundred
thousand actions is built, checked and replayed in a fraction of a second.

This module is the one home of that arithmetic: :class:`Codec` answers every question about a
code (its kind, stage, micro-batch, the ``W`` of a ``B``, an overlap's parts, which backwards a
list splits, how many activation sets a list keeps alive), and the schedule builders, the
validator, :class:`~gpipe.schedules.Schedule` and the simulator ask it rather than redo it.

The invariant: :func:`replay` returns the units in the same order as the readable replay
:func:`gpipe.schedules.validate.execution_order` (devices advance greedily in turn), or raises
on a deadlock naming every stuck device.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpipe.schedules.actions import KINDS, Action, Overlap, ScheduleError, Unit

__all__ = ["Codec", "decode_lists", "encode_lists", "in_order", "replay"]

_KIND_INDEX = {"F": 0, "B": 1, "W": 2}


class Codec:
    """Codes of one shape (``n`` stages, ``M`` micro-batches): what builders use to emit units."""

    __slots__ = ("M", "N", "first_w", "last_b", "n", "top")

    def __init__(self, num_stages: int, num_microbatches: int) -> None:
        self.n = num_stages
        self.M = num_microbatches
        self.N = num_stages * num_microbatches
        #: the first ``W`` code: ``F`` codes are below ``N``, ``B`` codes below this
        self.first_w = 2 * self.N
        #: the first overlap code: codes below it are single actions
        self.top = 3 * self.N
        #: the first ``B`` code of the last stage (no ``B(s+1, m)`` to wait for)
        self.last_b = 2 * self.N - num_microbatches

    def f(self, stage: int, mb: int) -> int:
        """Code of ``F(stage, mb)``."""
        return stage * self.M + mb

    def b(self, stage: int, mb: int) -> int:
        """Code of ``B(stage, mb)``."""
        return self.N + stage * self.M + mb

    def w(self, stage: int, mb: int) -> int:
        """Code of ``W(stage, mb)``."""
        return self.first_w + stage * self.M + mb

    def pair(self, f_stage: int, f_mb: int, b_stage: int, b_mb: int) -> int:
        """Code of ``Overlap(F(f_stage, f_mb), B(b_stage, b_mb))``."""
        return 3 * self.N + (f_stage * self.M + f_mb) * self.N + b_stage * self.M + b_mb

    def is_b(self, code: int) -> bool:
        """Whether ``code`` is a ``B`` action."""
        return self.N <= code < self.first_w

    def is_w(self, code: int) -> bool:
        """Whether ``code`` is a ``W`` action."""
        return self.first_w <= code < self.top

    def stage_of(self, code: int) -> int:
        """The stage of action ``code`` (``F``, ``B`` or ``W``)."""
        return (code % self.N) // self.M

    def w_of(self, b_code: int) -> int:
        """The code of the ``W`` of the same (stage, micro-batch) as ``B`` code ``b_code``."""
        return b_code + self.N

    def split_flags(self, lists: Sequence[Sequence[int]]) -> bytearray:
        """Per ``stage·M + micro-batch``: 1 when ``lists`` holds that backward's ``W`` (the
        backward is split into ``B`` and ``W``), else 0 (its ``B`` is the whole backward)."""
        first_w, top = self.first_w, self.top
        flags = bytearray(self.N)
        for lst in lists:
            for c in lst:
                if first_w <= c < top:
                    flags[c - first_w] = 1
        return flags

    def peak_live(self, lst: Sequence[int], flags: bytearray) -> int:
        """The most (stage, micro-batch) activation sets one device's list ``lst`` holds at
        once: from the ``F`` until the last backward action of it (``W`` when ``flags`` says
        the backward is split, else ``B``); an overlap counts its forward first, then its
        backward."""
        n_all, first_w, top = self.N, self.first_w, self.top
        live = peak = 0
        for c in lst:
            if c < n_all or c >= top:  # a forward, or an overlap's forward
                live += 1
                if live > peak:
                    peak = live
                # ... then its backward, the last of that micro-batch unless split
                if c >= top and not flags[(c - top) % n_all]:
                    live -= 1
            elif c >= first_w or not flags[c - n_all]:  # a W, or a whole B
                live -= 1
        return peak

    def actions_of(self, lst: list[int]) -> list[int]:
        """``lst`` with each overlap replaced by its two action codes (forwards first, then
        the pairs' forwards, then their backwards): the actions a list runs, in no order."""
        top, N = self.top, self.N
        if not lst or max(lst) < top:
            return lst
        prs = [c - top for c in lst if c >= top]
        return [c for c in lst if c < top] + [x // N for x in prs] + [N + x % N for x in prs]

    def recode(self, codes: Sequence[int], pad: Codec) -> list[int]:
        """``codes`` of ``pad``'s layout (the same stages, more micro-batches) re-coded for this
        codec, without the micro-batches past this codec's count (an overlap that lost one part
        keeps the other as a plain action)."""
        m = self.M
        out = []
        for code in codes:
            parts = [a for a in pad.unit(code).parts if a.microbatch < m]
            if len(parts) == 2:
                f, b = parts
                out.append(self.pair(f.stage, f.microbatch, b.stage, b.microbatch))
            elif parts:
                out.append(self.encode(parts[0]))
        return out

    def unit(self, code: int) -> Unit:
        """The :class:`Action` or :class:`Overlap` of ``code``."""
        N, M = self.N, self.M
        if code < 3 * N:
            kind, rest = divmod(code, N)
            s, m = divmod(rest, M)
            return Action(KINDS[kind], s, m)
        f, b = divmod(code - 3 * N, N)
        return Overlap(Action("F", *divmod(f, M)), Action("B", *divmod(b, M)))

    def encode(self, unit: Unit) -> int:
        """The code of a checked unit (stage and micro-batch in range)."""
        if isinstance(unit, Overlap):
            f, b = unit.forward, unit.backward
            return self.pair(f.stage, f.microbatch, b.stage, b.microbatch)
        return _KIND_INDEX[unit.kind] * self.N + unit.stage * self.M + unit.microbatch

    def parts(self, code: int) -> tuple[int, ...]:
        """The action codes a unit runs: itself, or an overlap's forward and backward."""
        N = self.N
        if code < 3 * N:
            return (code,)
        f, b = divmod(code - 3 * N, N)
        return (f, N + b)

    def missing(self, code: int, done: bytearray, split: bool) -> list[int]:
        """The dependencies of unit ``code`` not yet in ``done`` (action codes)."""
        out = []
        for c in self.parts(code):
            for dep in self.deps(c, split):
                if not done[dep]:
                    out.append(dep)
        return out

    def deps(self, c: int, split: bool) -> list[int]:
        """The action codes action ``c`` depends on (see
        :func:`gpipe.schedules.validate.dependencies`)."""
        N, M = self.N, self.M
        if c < N:
            return [c - M] if c >= M else []
        if c < 2 * N:
            return [c - N, c + M] if c - N < N - M else [c - N]
        return [c - N]


def encode_lists(lists: Sequence[Sequence[Unit]], codec: Codec) -> tuple[list[int], ...]:
    """Per device, the codes of checked units."""
    enc = codec.encode
    return tuple([enc(u) for u in acts] for acts in lists)


def decode_lists(
    codes: Sequence[Sequence[int]], num_stages: int, num_microbatches: int
) -> tuple[tuple[Unit, ...], ...]:
    """Per device, the units of ``codes``."""
    unit = Codec(num_stages, num_microbatches).unit
    return tuple(tuple(unit(c) for c in lst) for lst in codes)


def replay(
    codes: Sequence[Sequence[int]], codec: Codec, split: bool, name: str
) -> list[tuple[int, int, int]]:
    """Walk every device's codes in order, devices advancing greedily in turn, and return the
    order in which the units can run, each after its dependencies, as *runs*
    ``(device, start, stop)``: device ``d`` runs ``codes[d][start:stop]`` next.

    Raises :class:`ScheduleError` when no device can advance, naming each stuck device's unit
    and the dependencies it waits for.
    """
    N, M = codec.N, codec.M
    top = codec.top
    last_b = codec.last_b  # B codes at or above this are the last stage's (no B(s+1) to wait for)
    done = bytearray(top)
    k = len(codes)
    pos = [0] * k
    runs: list[tuple[int, int, int]] = []
    add_run = runs.append
    remaining = sum(len(lst) for lst in codes)
    while remaining:
        progressed = False
        for d in range(k):
            lst = codes[d]
            p = start = pos[d]
            end = len(lst)
            while p < end:
                c = lst[p]
                if c < N:
                    if c >= M and not done[c - M]:
                        break
                    done[c] = 1
                elif c < 2 * N:
                    if not done[c - N] or (c < last_b and not done[c + M]):
                        break
                    done[c] = 1
                elif c < top:
                    if not done[c - N]:
                        break
                    done[c] = 1
                else:
                    f, b = divmod(c - top, N)
                    b += N
                    if (f >= M and not done[f - M]) or not done[b - N]:
                        break
                    if b < last_b and not done[b + M]:
                        break
                    done[f] = done[b] = 1
                p += 1
            if p != start:
                add_run((d, start, p))
                pos[d] = p
                remaining -= p - start
                progressed = True
        if not progressed:
            stuck = []
            for d in range(k):
                if pos[d] < len(codes[d]):
                    c = codes[d][pos[d]]
                    missing = ", ".join(str(codec.unit(x)) for x in codec.missing(c, done, split))
                    stuck.append(f"device {d} stuck at {codec.unit(c)} waiting for {missing}")
            raise ScheduleError(f"schedule {name!r} deadlocks: " + "; ".join(stuck))
    return runs


def in_order(codes: Sequence[Sequence[int]], runs: Sequence[tuple[int, int, int]]):
    """``(device, unit code)`` pairs of ``runs``, one by one."""
    for d, start, stop in runs:
        for c in codes[d][start:stop]:
            yield d, c
