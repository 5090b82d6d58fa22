"""Any nn.Module in: a captured-and-cut model trains exactly as the plain model.

For each model (our Transformer cells in a looping forward, GPT-2, a Llama, a BERT encoder, a
ViT), for K in {2, 4}, every schedule and every re-materialization mode, ``pipe.step`` gives
the plain model's loss and gradients; with dropout on, the result does not depend on K or the
schedule. Each model is captured once per module (capturing is the slow part).
"""

from __future__ import annotations

import itertools

import pytest
import torch

import gpipe
from capture_models import BUILDERS
from gpipe import schedules
from gpipe.capture import Sample, capture

pytest.importorskip("transformers")

SCHEDULES = schedules.available()
REMATS = ("always", "except_last", "never")
M = 4


class Case:
    def __init__(self, name: str, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
        self.model, self.inputs, self.targets, self.loss_fn = BUILDERS[name](dropout, dtype)
        self.model.train()
        self.layers = capture(self.model, self.inputs)
        self.balances: dict[tuple[int, int], list[int]] = {}  # profiled once per (K, V)

    def reference(self) -> tuple[float, list[torch.Tensor]]:
        self.model.zero_grad()
        loss = self.loss_fn(self.model(*self.inputs), self.targets)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in self.model.parameters()]

    def piped(self, k: int, schedule: str, remat: str, chunks: int = M):
        self.model.zero_grad()
        shape = (k, len(schedules.ScheduleSpec(schedule, None).placement(k)))  # K·V stages
        pipe = gpipe.Pipe(
            self.layers,
            stages=k,
            devices=["cpu"] * k,
            chunks=chunks,
            schedule=schedule,
            remat=remat,
            balance=self.balances.get(shape),
        )
        try:
            loss = pipe.step(Sample(*self.inputs), self.targets, self.loss_fn)
            self.balances[shape] = pipe.balance
        finally:
            pipe.close()
        return loss.item(), [p.grad.clone() for p in self.model.parameters()]


def _every_schedule_and_k() -> list[tuple[int, str, str]]:
    """Every schedule at K=2 and K=4, the remat modes taken in turn."""
    pairs = list(itertools.product((2, 4), SCHEDULES))
    return [(k, s, REMATS[i % len(REMATS)]) for i, (k, s) in enumerate(pairs)]


@pytest.fixture(scope="module", params=list(BUILDERS))
def case(request) -> Case:
    return Case(request.param)


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float, atol: float) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_captured_layers_hold_the_models_state_dict_keys(case: Case) -> None:
    # BERT's embeddings hold a non-persistent buffer (position_ids) next to their submodules
    layers = case.layers.state_dict()
    model = case.model.state_dict()
    assert layers.keys() == model.keys()
    assert all(layers[k] is model[k] or torch.equal(layers[k], model[k]) for k in model)


def _check(case: Case, grid: list[tuple[int, str, str]]) -> None:
    ref_loss, ref_grads = case.reference()
    for k, sched, remat in grid:
        loss, grads = case.piped(k, sched, remat)
        assert loss == pytest.approx(ref_loss, rel=1e-5), (k, sched, remat)
        _close(grads, ref_grads, rtol=1e-5, atol=1e-6)


def test_every_schedule_and_k_equals_the_plain_model(case: Case) -> None:
    _check(case, _every_schedule_and_k())


@pytest.mark.slow
def test_every_schedule_k_and_remat_equals_the_plain_model(case: Case) -> None:
    _check(case, list(itertools.product((2, 4), SCHEDULES, REMATS)))


@pytest.fixture(scope="module", params=["loop_lm", "gpt2"])
def dropout_case(request) -> Case:
    return Case(request.param, dropout=0.2)


def test_with_dropout_the_result_does_not_depend_on_k_or_the_schedule(dropout_case) -> None:
    c = dropout_case
    first = c.piped(1, "gpipe", "never")
    ref_loss, _ = c.reference()  # the plain model draws other masks
    assert first[0] != pytest.approx(ref_loss, rel=1e-6)  # so dropout is really on
    one_per_schedule = [
        (4 if i % 2 else 2, s, REMATS[i % len(REMATS)]) for i, s in enumerate(SCHEDULES)
    ]
    for k, sched, remat in one_per_schedule:
        c.layers.train()
        loss, grads = c.piped(k, sched, remat)
        assert loss == pytest.approx(first[0], rel=1e-5), (k, sched, remat)
        _close(grads, first[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["gpt2", pytest.param("loop_lm", marks=pytest.mark.slow)])
def test_float64_agrees_to_1e_10(name: str) -> None:
    c = Case(name, dtype=torch.float64)
    ref_loss, ref_grads = c.reference()
    for k, sched, remat in [(2, "1f1b", "always"), (4, "zb-h1", "except_last")]:
        loss, grads = c.piped(k, sched, remat)
        assert abs(loss - ref_loss) <= 1e-10 * abs(ref_loss)
        _close(grads, ref_grads, rtol=1e-10, atol=1e-12)
