"""Zero-bubble schedules (Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241):
backward split into ``B`` (input gradient, on the critical path) and ``W`` (weight gradient,
deferred to fill the slots where 1F1B idles).

* ``zb-h1`` — 1F1B's memory (at most ``K`` micro-batches per device); idle time per device
  ``(K-1)·(F + B - W)``, a third of 1F1B's with ``F = B = W``.
* ``zb-h2`` — more warm-up forwards (``2(K-d-1)`` on device ``d``) and more ``W`` deferred:
  ``2K-1`` micro-batches per device, about twice 1F1B's; idle time per device
  ``(K-1)·(F + B - 2W)``, or the unavoidable ramp ``(K-1)·F`` of one step when that is more.
* ``zb-v`` — two stages per device in a V (device ``d`` holds stages ``d`` and ``2K-1-d``):
  1F1B's memory, counted in whole-device units (``2K`` half-size stage activations), and, with
  ``F = W``, idle time ``(K-1)·(F + B - 2W)`` per device (costs per device), or the one-step
  ramp ``(K-1)·F/2`` when that is more: zero bubble beyond the ramp when ``F = B = W``.
* ``interleaved-zb`` — ZB-H1 on interleaved 1F1B's order (V chunks per device, round-robin):
  ZB-H1's memory (``K`` whole-device units) and, with ``W ≤ B``, ``1/V`` of its idle time.

The invariant: every builder here emits, for every (stage, micro-batch), one ``F``, one ``B``
and one ``W`` on the device its placement names (the validator proves it, and that the lists
run without deadlock, for every ``K`` and ``M``).
"""

from __future__ import annotations

from gpipe.schedules.codes import Codec
from gpipe.schedules.ir import v_shape
from gpipe.schedules.named import interleaved_order, register

__all__: list[str] = []


@register("zb-h1", _compact=True)
def _zb_h1(k: int, m: int, v: int) -> list[list[int]]:
    """Zero-bubble H1: 1F1B with backward split into B and W.

    Device ``d`` runs ``K-d-1`` warm-up forwards, then pairs ``F B`` and, once ``d`` W's are
    owed, ``F B W``; the cool-down interleaves the remaining ``B`` with deferred ``W`` so that
    ``W`` fills the slots where 1F1B would idle. Every device holds at most ``K`` micro-batches
    of activations (1F1B's peak on device 0).
    """
    return [_one_stage(k, m, d, warm=min(k - d - 1, m), owed=d) for d in range(k)]


@register("zb-h2", _compact=True)
def _zb_h2(k: int, m: int, v: int) -> list[list[int]]:
    """Zero-bubble H2: ZB-H1 with ``K-d-1`` more warm-up forwards on device ``d`` (they fill
    the wait for the first ``B``) and ``2d`` weight gradients owed instead of ``d`` (they fill
    the waits between ``B`` actions coming back up the pipeline). Every device holds at most
    ``2K-1`` micro-batches (the paper's ``(2p-1)·M_B``, about twice 1F1B's ``K``)."""
    return [_one_stage(k, m, d, warm=min(2 * (k - d - 1), m), owed=2 * d) for d in range(k)]


@register("interleaved-zb", virtual=True, _compact=True)
def _interleaved_zb(k: int, m: int, v: int) -> list[list[int]]:
    """Interleaved zero bubble (ZB-H1 on interleaved 1F1B's order; the paper's ZB-1p with V
    chunks per device, torch's ``ScheduleInterleavedZeroBubble``): round-robin placement, the
    forward and backward orders of ``interleaved``, backward split into B and W.

    Device ``d`` warms up with ``(V-1)·K + K-d-1`` forwards (``K-d-1`` fewer than interleaved
    1F1B: the W's fill that wait instead), then runs ``F B`` pairs with ``W`` once ``d`` weight
    gradients are owed, oldest first, as ZB-H1 does. Every device holds at most ``V·K``
    (stage, micro-batch) activation sets of ``1/V``-size chunks — ``K`` whole-device units,
    1F1B's and ZB-H1's peak, below interleaved 1F1B's ``(V-1)·K + 2K-1`` sets. With ``M`` a
    multiple of ``K`` and per-stage costs F, B, W, each device idles ``(K-1)·max(F, F+B-W)``
    (ZB-H1's ``(K-1)·(F+B-W)``, at ``1/V`` of the stage cost). Valid for every ``M ≥ 1``.
    """
    total = m * v
    big = k * v * m  # a B code plus this is the W of the same (stage, micro-batch)
    out = []
    for d in range(k):
        fwd, bwd = interleaved_order(k, m, v, d)
        wgt = [b + big for b in bwd]
        out.append(_merge(fwd, bwd, wgt, warm=min((v - 1) * k + k - d - 1, total), owed=d))
    return out


def _one_stage(k: int, m: int, d: int, warm: int, owed: int) -> list[int]:
    """Device ``d``'s list of a one-stage-per-device zero-bubble schedule (see :func:`_merge`)."""
    c = Codec(k, m)
    fwd = [c.f(d, i) for i in range(m)]
    return _merge(fwd, [c.b(d, i) for i in range(m)], [c.w(d, i) for i in range(m)], warm, owed)


def _merge(fwd: list[int], bwd: list[int], wgt: list[int], warm: int, owed: int) -> list[int]:
    """One device's list from its forwards, backwards and weight gradients, each in order:
    ``warm`` forwards, then ``F B`` (and ``W`` once more than ``owed`` weight gradients wait),
    the remaining ``B`` likewise, the remaining ``W``."""
    acts = fwd[:warm]
    f, b, w = warm, 0, 0
    n = len(bwd)
    while b < n:
        if f < n:
            acts.append(fwd[f])
            f += 1
        acts.append(bwd[b])
        b += 1
        if b - w > owed:
            acts.append(wgt[w])
            w += 1
    acts += wgt[w:]
    return acts


@register("zb-v", placement=v_shape, virtual_stages=2, _compact=True)
def _zb_v(k: int, m: int, v: int) -> list[list[int]]:
    """Zero-bubble V (arXiv 2401.10241, section 6): two stages per device, ``d`` and
    ``2K-1-d``, so a micro-batch goes down the devices and back up (the last device runs
    stages ``K-1`` and ``K`` back to back).

    Device ``d`` warms up with ``2(K-d)-1`` forwards on its first stage, ``d`` pairs of
    forwards (second stage, first stage), ``K-d`` rounds of ``F B W`` on its second stage; the
    steady state alternates ``F B W`` on the two stages; the cool-down runs the remaining
    ``B``'s (both stages, then the first with its ``W``) and the deferred ``W``'s. The pattern
    is laid out for ``max(M, 2K-1)`` micro-batches and the ones past ``M`` are dropped.
    """
    n = max(m, 2 * k - 1)  # laid out for n micro-batches, codes of a Codec(2K, n)
    big = 2 * k * n  # F = s·n + i, B = big + s·n + i, W = 2·big + s·n + i
    out = []
    for d in range(k):
        s0, s1 = d * n, (2 * k - 1 - d) * n
        F0, B0, W0 = s0, big + s0, 2 * big + s0
        F1, B1, W1 = s1, big + s1, 2 * big + s1
        seq: list[int] = []
        add = seq.append
        f0 = f1 = b0 = b1 = 0
        for _ in range(2 * (k - d) - 1):
            add(F0 + f0)
            f0 += 1
        for _ in range(d):
            seq += [F1 + f1, F0 + f0]
            f1 += 1
            f0 += 1
        for _ in range(k - d):
            seq += [F1 + f1, B1 + b1, W1 + b1]
            f1 += 1
            b1 += 1
        while f1 < f0 or f0 < n:
            if f0 < n:
                add(F0 + f0)
                f0 += 1
            seq += [B0 + b0, W0 + b0, F1 + f1, B1 + b1, W1 + b1]
            b0 += 1
            f1 += 1
            b1 += 1
        w0, w1 = b0, b1
        for _ in range(d):
            seq += [B0 + b0, B1 + b1]
            b0 += 1
            b1 += 1
        for _ in range(k - d):
            seq += [B0 + b0, W0 + w0]
            b0 += 1
            w0 += 1
        seq += [W1 + i for i in range(w1, b1)]
        seq += [W0 + i for i in range(w0, b0)]
        if n > m:  # drop the padding micro-batches and re-code for M = m
            kept = []
            for c in seq:
                kind, rest = divmod(c, big)
                st, i = divmod(rest, n)
                if i < m:
                    kept.append(kind * 2 * k * m + st * m + i)
            seq = kept
        out.append(seq)
    return out
