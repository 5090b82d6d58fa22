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

Splitting is not free: ``W`` reads back every output gradient ``B`` kept for it (5–15% of a
backward on a CPU). So each builder splits only the backwards whose split changes the step —
those where the pipeline fills and drains (:func:`_worth_splitting`) — and leaves the steady
state's backwards whole (a ``B`` with no ``W``). The bubbles above are those of splitting
every backward, and so are these schedules' with a free split; ``every=True`` builds the
every-backward-split lists of the papers (and torch.distributed.pipelining) for comparison.

The invariant: every builder here emits, for every (stage, micro-batch), one ``F``, one ``B``
and at most one ``W`` on the device its placement names (the validator proves it, and that
the lists run without deadlock, for every ``K`` and ``M``); with a free split its simulated
step equals the every-backward-split one (``tests/schedules/test_zero_bubble.py``).
"""

from __future__ import annotations

from gpipe.schedules.codes import Codec
from gpipe.schedules.ir import Schedule, v_shape
from gpipe.schedules.named import interleaved_order, register

__all__ = ["every_split"]


@register("zb-h1", _compact=True)
def _zb_h1(k: int, m: int, v: int, every: bool = False) -> list[list[int]]:
    """Zero-bubble H1: 1F1B with backward split into B and W.

    Device ``d`` runs ``K-d-1`` warm-up forwards, then pairs ``F B`` and, once ``d`` W's are
    owed, ``F B W``; the cool-down interleaves the remaining ``B`` with deferred ``W`` so that
    ``W`` fills the slots where 1F1B would idle. Every device holds at most ``K`` micro-batches
    of activations (1F1B's peak on device 0).
    """
    return [_one_stage(k, m, d, min(k - d - 1, m), d, k - d, every) for d in range(k)]


@register("zb-h2", _compact=True)
def _zb_h2(k: int, m: int, v: int, every: bool = False) -> list[list[int]]:
    """Zero-bubble H2: ZB-H1 with ``K-d-1`` more warm-up forwards on device ``d`` (they fill
    the wait for the first ``B``) and ``2d`` weight gradients owed instead of ``d`` (they fill
    the waits between ``B`` actions coming back up the pipeline). Every device holds at most
    ``2K-1`` micro-batches (the paper's ``(2p-1)·M_B``, about twice 1F1B's ``K``)."""
    warm = [min(2 * (k - d - 1), m) for d in range(k)]
    return [_one_stage(k, m, d, warm[d], 2 * d, 2 * (k - d), every) for d in range(k)]


@register("interleaved-zb", virtual=True, _compact=True)
def _interleaved_zb(k: int, m: int, v: int, every: bool = False) -> list[list[int]]:
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
    c = Codec(k * v, m)
    out = []
    for d in range(k):
        fwd, bwd = interleaved_order(k, m, v, d)
        wgt = [c.w_of(b) for b in bwd]
        split = None if every else _worth_splitting([c.stage_of(b) for b in bwd], d, v * k - d)
        out.append(_merge(fwd, bwd, wgt, min((v - 1) * k + k - d - 1, total), owed=d, split=split))
    return out


def _one_stage(k: int, m: int, d: int, warm: int, owed: int, tail: int, every: bool) -> list[int]:
    """Device ``d``'s list of a one-stage-per-device zero-bubble schedule (see :func:`_merge`):
    every backward split when ``every``, else those :func:`_worth_splitting` picks."""
    c = Codec(k, m)
    fwd = [c.f(d, i) for i in range(m)]
    bwd, wgt = [c.b(d, i) for i in range(m)], [c.w(d, i) for i in range(m)]
    split = None if every else _worth_splitting([d] * m, owed, tail)
    return _merge(fwd, bwd, wgt, warm, owed, split)


def _worth_splitting(stages: list[int], owed: int, tail: int) -> list[bool]:
    """Which of a device's backwards (their stages, in the device's order) to split: the first
    ``owed`` (their ``B`` sends the first wave of gradients up the pipeline without waiting
    for ``W``, and their ``W`` waits for the cool-down) and the last ``tail`` (their ``W``
    fills the cool-down's waits: one more than the device's warm-up forwards for ZB-H1 and
    interleaved-zb, ``K-d`` and ``VK-d``; two more for ZB-H2, ``2(K-d)``, which owes twice
    the ``W``), never stage 0's, which has no earlier stage to send to.
    The others run their whole backward in ``B``: in the steady state a split fills no idle
    time and costs what it costs (``W`` reading every kept output gradient back: 5–15% of a
    backward on a CPU, BENCHMARKS.md). With the split free this gives the same step as
    splitting every backward; with any split cost it is faster (both checked by simulation in
    ``tests/schedules/test_zero_bubble.py``)."""
    n = len(stages)
    return [s != 0 and (i < owed or i >= n - tail) for i, s in enumerate(stages)]


def _merge(
    fwd: list[int],
    bwd: list[int],
    wgt: list[int],
    warm: int,
    owed: int,
    split: list[bool] | None = None,
) -> list[int]:
    """One device's list from its forwards, backwards and weight gradients, each in order:
    ``warm`` forwards, then ``F B`` (and the oldest ``W`` once more than ``owed`` weight
    gradients wait), the remaining ``B`` likewise, the remaining ``W``. ``split[i]`` false:
    backward ``i`` is whole, it has no ``W`` (default: every backward is split)."""
    acts = fwd[:warm]
    f = warm
    n = len(bwd)
    waiting: list[int] = []  # the W codes owed, oldest first
    w = 0
    for b in range(n):
        if f < n:
            acts.append(fwd[f])
            f += 1
        acts.append(bwd[b])
        if split is None or split[b]:
            waiting.append(wgt[b])
        if len(waiting) - w > owed:
            acts.append(waiting[w])
            w += 1
    acts += waiting[w:]
    return acts


@register("zb-v", placement=v_shape, virtual_stages=2, _compact=True)
def _zb_v(k: int, m: int, v: int, every: bool = False) -> list[list[int]]:
    """Zero-bubble V (arXiv 2401.10241, section 6): two stages per device, ``d`` and
    ``2K-1-d``, so a micro-batch goes down the devices and back up (the last device runs
    stages ``K-1`` and ``K`` back to back).

    Device ``d`` warms up with ``2(K-d)-1`` forwards on its first stage, ``d`` pairs of
    forwards (second stage, first stage), ``K-d`` rounds of ``F B W`` on its second stage; the
    steady state alternates ``F B W`` on the two stages; the cool-down runs the remaining
    ``B``'s (both stages, then the first with its ``W``) and the deferred ``W``'s. The pattern
    is laid out for ``max(M, 2K-1)`` micro-batches and the ones past ``M`` are dropped. Of the
    steady state's ``B W`` pairs only the device's first ``K-1`` and last ``3K-2`` backwards
    stay split (:func:`_keep_split`).
    """
    n = max(m, 2 * k - 1)  # laid out for n micro-batches
    pad, codec = Codec(2 * k, n), Codec(2 * k, m)
    out = []
    for d in range(k):
        s0, s1 = d, 2 * k - 1 - d
        F0, B0, W0 = pad.f(s0, 0), pad.b(s0, 0), pad.w(s0, 0)
        F1, B1, W1 = pad.f(s1, 0), pad.b(s1, 0), pad.w(s1, 0)
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
            seq = codec.recode(seq, pad)
        out.append(seq if every else _keep_split(seq, codec, k - 1, 3 * k - 2))
    return out


def _keep_split(seq: list[int], c: Codec, head: int, tail: int) -> list[int]:
    """``seq`` with the ``W`` of each backward dropped (its ``B`` becoming the whole backward)
    except the device's first ``head`` and last ``tail`` backwards, never stage 0's (see
    :func:`_worth_splitting`). ZB-V's steady state runs each ``W`` right after its ``B``, so
    a split there only sends the input gradient ``W`` earlier; the simulator finds that this
    matters only where the pipeline fills and drains: with the split free, dropping the others
    gives the same step, with any split cost a shorter one (``head = K-1`` and ``tail = 3K-2``
    are the fewest that keep the step for K ≤ 6, M ≤ 5K and five F:B:W ratios)."""
    bwd = [x for x in seq if c.is_b(x)]
    split = _worth_splitting([c.stage_of(x) for x in bwd], head, tail)
    keep = {c.w_of(x) for x, on in zip(bwd, split) if on}
    return [x for x in seq if not c.is_w(x) or x in keep]


def every_split(name: str, k: int, m: int, v: int | None = None) -> Schedule:
    """The zero-bubble schedule ``name`` as its paper (and torch.distributed.pipelining) lay it
    out: every backward split, stage 0's too — for comparing against the named schedule, which
    splits only where a split changes the step."""
    from gpipe.schedules.named import placement_of, resolve_virtual
    from gpipe.schedules.validate import from_codes

    builders = {"zb-h1": _zb_h1, "zb-h2": _zb_h2, "interleaved-zb": _interleaved_zb, "zb-v": _zb_v}
    if name not in builders:
        raise ValueError(f"every_split builds {sorted(builders)}, got {name!r}")
    v = resolve_virtual(name, v)
    codes = tuple(builders[name](k, m, v, every=True))
    return from_codes(codes, m, v, name, placement_of(name, k, v))
