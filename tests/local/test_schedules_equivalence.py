"""The schedules with their own placements and units, run through ``gpipe.Pipe``: gradients
equal the independent reference (float64, ≤ 1e-10), the measured peak of live micro-batches
equals the simulated one, and a handoff between two stages of one device never touches the
transport.

Cases: ``zb-h2``, ``zb-v``, ``dualpipe-v`` and ``interleaved-zb`` for K ∈ {2, 3, 4}, M ∈ {K, 2K, 4K} and every
re-materialization mode, with dropout, on tiny layers (the helpers of tests/local/test_pipe.py).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from test_pipe import N_LAYERS, D, grads, loss_fn, make_model, max_diff

import gpipe
import reference_impl
from gpipe.planner.balance import balance as balance_costs
from gpipe.planner.simulate import simulate

BATCH = 48  # divisible by every M below
NEW = ["zb-h2", "zb-v", "dualpipe-v", "interleaved-zb"]
REMATS = ["always", "except_last", "never"]
CASES = [
    (s, k, k * mult, r) for s, k, mult, r in itertools.product(NEW, [2, 3, 4], [1, 2, 4], REMATS)
]
_REF: dict = {}


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(BATCH, D, generator=g, dtype=torch.float64)
    return x, torch.randn(BATCH, D, generator=g, dtype=torch.float64)


def _reference(m: int) -> tuple[float, list[torch.Tensor]]:
    if m not in _REF:
        model = make_model(0.3)
        x, y = _data()
        loss = reference_impl.step(model, x, y, loss_fn, chunks=m, seed=7)
        _REF[m] = (loss.item(), grads(model))
    return _REF[m]


@pytest.mark.parametrize(("schedule", "k", "m", "remat"), CASES)
def test_new_schedules_equal_reference_and_simulated_peaks(
    schedule: str, k: int, m: int, remat: str
) -> None:
    model = make_model(0.3)
    v = 1 if schedule == "zb-h2" else 2
    pipe = gpipe.Pipe(
        model,
        balance=balance_costs([1.0] * N_LAYERS, k * v),
        chunks=m,
        schedule=schedule,
        remat=remat,
        seed=7,
    )
    x, y = _data()
    loss = pipe.step(x, y, loss_fn)
    ref_loss, ref_grads = _reference(m)
    assert abs(loss.item() - ref_loss) <= 1e-12
    assert max_diff(grads(model), ref_grads) <= 1e-10
    sched = pipe._schedule(m)
    assert pipe.peak_live == list(simulate(sched).peak_activations)
    if v == 2:
        assert [p.device for p in pipe.partitions] == [pipe.devices[d] for d in sched.placement]
    if schedule == "interleaved-zb":  # round-robin, s % K
        assert sched.placement == tuple(list(range(k)) * 2)
    elif v == 2:  # stages d and 2K-1-d on device d
        assert sched.placement == tuple(list(range(k)) + list(reversed(range(k))))
    pipe.close()


@pytest.mark.parametrize("schedule", ["zb-v", "dualpipe-v"])
def test_same_device_handoffs_bypass_the_transport(schedule: str) -> None:
    """Device K-1 holds stages K-1 and K: their activations and gradients stay on it."""
    k, m = 3, 6
    pipe = gpipe.Pipe(make_model(), balance=[2, 2, 2, 2, 2, 2], chunks=m, schedule=schedule)
    sent: list[tuple[str, int]] = []
    transport = pipe._runner.transport  # the one-process mailboxes
    real = transport.send

    def spy(kind: str, stage: int, microbatch: int, value: object) -> None:
        sent.append((kind, stage))
        real(kind, stage, microbatch, value)

    transport.send = spy  # type: ignore[method-assign]
    x, y = _data()
    pipe.step(x, y, loss_fn)
    assert ("act", k) not in sent and ("grad", k - 1) not in sent
    # every other boundary crosses devices: one activation and one gradient per micro-batch
    assert len(sent) == 2 * m * (2 * k - 2)
    pipe.close()
