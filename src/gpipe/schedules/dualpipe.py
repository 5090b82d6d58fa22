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
    n = max(m, 2 * k)  # laid out for at least 2K micro-batches; those past M are dropped
    pad = Codec(2 * k, n)
    out = [_device(k, n, d, pad) for d in range(k)]
    if n > m:
        out = [Codec(2 * k, m).recode(lst, pad) for lst in out]
    return out


def _device(k: int, n: int, d: int, c: Codec) -> list[int]:
    """Device ``d``'s codes for ``n`` micro-batches (``c`` is the codec of that count).

    Index 0 is the device's first stage ``d``, index 1 its second ``2K-1-d``; a code is the
    base of its (kind, stage) plus the micro-batch."""
    stages = (d, 2 * k - 1 - d)
    fb = [c.f(s, 0) for s in stages]
    bb = [c.b(s, 0) for s in stages]
    wb = [c.w(s, 0) for s in stages]
    pb = [[c.pair(sf, 0, sb, 0) for sb in stages] for sf in stages]  # pb[f][b] + f_mb·N + b_mb
    big = c.N
    acts: list[int] = []
    add = acts.append
    nf = [0, 0]
    nb = [0, 0]
    owed: list[int] = []  # codes of the deferred W's, oldest first

    def fwd(i: int) -> None:
        add(fb[i] + nf[i])
        nf[i] += 1

    def bwd(i: int, full: bool) -> None:
        add(bb[i] + nb[i])
        (add if full else owed.append)(wb[i] + nb[i])
        nb[i] += 1

    def pair(i: int, j: int) -> None:
        add(pb[i][j] + nf[i] * big + nb[j])
        add(wb[j] + nb[j])
        nf[i] += 1
        nb[j] += 1

    def weight() -> None:
        if owed:
            add(owed.pop(0))

    for _ in range(2 * (k - d - 1)):
        fwd(0)
    for _ in range(d + 1):
        fwd(0)
        fwd(1)
    for _ in range(k - d - 1):
        bwd(1, full=False)
        weight()
        fwd(1)
    for r in range(n - 2 * k + d + 1):
        if r == 0 and d == k - 1:
            fwd(0)
            bwd(1, full=True)
        else:
            pair(0, 1)
        pair(1, 0)
    for _ in range(k - d - 1):
        bwd(1, full=True)
        pair(1, 0)
    split = False
    for r in range(d + 1):
        if r == (d + 1) // 2 and d % 2 == 1:
            split = True
        bwd(1, full=not split)
        if r == (d + 1) // 2 and d % 2 == 0:
            split = True
        bwd(0, full=not split)
    for _ in range(k - d - 1):
        weight()
        bwd(0, full=not split)
    while owed:
        weight()
    return acts
