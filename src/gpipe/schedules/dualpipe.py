"""DualPipeV: DeepSeek-V3's bidirectional DualPipe (arXiv 2412.19437) in its V form, as
``torch.distributed.pipelining.ScheduleDualPipeV`` runs it.

Two stages per device in a V (device ``d`` holds stages ``d`` and ``2K-1-d``). In the steady
state every device issues a forward on one of its stages together with a full backward
(``B`` then ``W``) on the other, of another micro-batch, as one :class:`Overlap` unit: a GPU
runtime overlaps the pair's compute with each other's communication, so the pair costs less
than the two in turn (the simulator's ``overlap``). Warm-up and cool-down split the backward
(``B`` now, ``W`` later) to fill the ramps.

The invariant: the builder emits one ``F``, ``B`` and ``W`` per (stage, micro-batch), every
``W`` after its ``B`` on the same device. The pattern needs ``2K`` micro-batches to fill (the
steady state has ``M - 2K + d + 1`` rounds on device ``d``); with fewer it is laid out for
``2K`` and the micro-batches past ``M`` are dropped, as ``zb-v`` does.
"""

from __future__ import annotations

from gpipe.schedules.codes import Codec
from gpipe.schedules.ir import v_shape
from gpipe.schedules.named import register

__all__: list[str] = []


@register("dualpipe-v", placement=v_shape, virtual_stages=2, _compact=True)
def _dualpipe_v(k: int, m: int, v: int) -> list[list[int]]:
    """Device ``d`` (stages ``s0 = d``, ``s1 = 2K-1-d``):

    1. ``2(K-d-1)`` forwards on ``s0``;
    2. ``d+1`` pairs ``F s0, F s1``;
    3. ``K-d-1`` rounds ``B s1`` (its ``W`` deferred), one deferred ``W``, ``F s1``;
    4. ``M-2K+d+1`` rounds of two overlapped units, ``F s0 + B s1`` and ``F s1 + B s0``, each
       backward full (its ``W`` right after); the last device runs its first pair in turn;
    5. ``K-d-1`` rounds: full backward on ``s1``, then ``F s1 + B s0``;
    6. ``d+1`` rounds of backward on ``s1`` then ``s0``, switching to split backward half way;
    7. ``K-d-1`` rounds: one deferred ``W``, backward on ``s0``;
    8. the remaining deferred ``W``'s (``d+1`` of them).
    """
    c = Codec(2 * k, m)
    n = max(m, 2 * k)  # laid out for at least 2K micro-batches; those past M are dropped
    return [_encode(_device(k, n, d), c) for d in range(k)]


def _device(k: int, n: int, d: int) -> list[tuple[int, ...]]:
    """Device ``d``'s units for ``n`` micro-batches: ``(kind, stage, mb)`` with kind 0/1/2 for
    F/B/W, or ``(F stage, F mb, B stage, B mb)`` for an overlap."""
    s0, s1 = d, 2 * k - 1 - d
    acts: list[tuple[int, ...]] = []
    nf = {s0: 0, s1: 0}
    nb = {s0: 0, s1: 0}
    owed: list[tuple[int, int]] = []  # (stage, micro-batch) whose W is deferred

    def fwd(s: int) -> None:
        acts.append((0, s, nf[s]))
        nf[s] += 1

    def bwd(s: int, full: bool) -> None:
        acts.append((1, s, nb[s]))
        if full:
            acts.append((2, s, nb[s]))
        else:
            owed.append((s, nb[s]))
        nb[s] += 1

    def pair(sf: int, sb: int) -> None:
        acts.append((sf, nf[sf], sb, nb[sb]))
        acts.append((2, sb, nb[sb]))
        nf[sf] += 1
        nb[sb] += 1

    def weight() -> None:
        if owed:
            acts.append((2, *owed.pop(0)))

    for _ in range(2 * (k - d - 1)):
        fwd(s0)
    for _ in range(d + 1):
        fwd(s0)
        fwd(s1)
    for _ in range(k - d - 1):
        bwd(s1, full=False)
        weight()
        fwd(s1)
    for i in range(n - 2 * k + d + 1):
        if i == 0 and d == k - 1:
            fwd(s0)
            bwd(s1, full=True)
        else:
            pair(s0, s1)
        pair(s1, s0)
    for _ in range(k - d - 1):
        bwd(s1, full=True)
        pair(s1, s0)
    split = False
    for i in range(d + 1):
        if i == (d + 1) // 2 and d % 2 == 1:
            split = True
        bwd(s1, full=not split)
        if i == (d + 1) // 2 and d % 2 == 0:
            split = True
        bwd(s0, full=not split)
    for _ in range(k - d - 1):
        weight()
        bwd(s0, full=not split)
    while owed:
        weight()
    return acts


def _encode(units: list[tuple[int, ...]], c: Codec) -> list[int]:
    """Codes of the units whose micro-batches exist (an overlap that lost one part to the
    padding keeps the other as a plain action)."""
    enc = (c.f, c.b, c.w)
    m = c.M
    out = []
    for u in units:
        if len(u) == 3:
            if u[2] < m:
                out.append(enc[u[0]](u[1], u[2]))
            continue
        sf, fi, sb, bi = u
        if fi < m and bi < m:
            out.append(c.pair(sf, fi, sb, bi))
        elif fi < m:
            out.append(c.f(sf, fi))
        elif bi < m:
            out.append(c.b(sb, bi))
    return out
