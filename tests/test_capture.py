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
from gpipe.capture import capture

pytest.importorskip("transformers")

SCHEDULES = schedules.available()
REMATS = ("always", "except_last", "never")
M = 4


class Case:
    def __init__(self, name: str, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
        self.model, self.inputs, self.targets, self.loss_fn = BUILDERS[name](dropout, dtype)
        self.model.train()
        self.layers = capture(self.model, self.inputs)

    def reference(self) -> tuple[float, list[torch.Tensor]]:
        self.model.zero_grad()
        loss = self.loss_fn(self.model(*self.inputs), self.targets)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in self.model.parameters()]

    def piped(self, k: int, schedule: str, remat: str, chunks: int = M):
        self.model.zero_grad()
        pipe = gpipe.Pipe(
            self.layers, stages=k, devices=["cpu"] * k, chunks=chunks, schedule=schedule,
            remat=remat,
        )
        try:
            from gpipe.capture import Sample

            loss = pipe.step(Sample(*self.inputs), self.targets, self.loss_fn)
        finally:
            pipe.close()
        return loss.item(), [p.grad.clone() for p in self.model.parameters()]


def _grid() -> list[tuple[int, str, str]]:
    return [(k, s, r) for k, s, r in itertools.product((2, 4), SCHEDULES, REMATS)]


@pytest.fixture(scope="module", params=["loop_lm", "gpt2"])
def case(request) -> Case:
    return Case(request.param)


def _close(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float, atol: float) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol)


def test_every_schedule_k_and_remat_equals_the_plain_model(case: Case) -> None:
    ref_loss, ref_grads = case.reference()
    for k, sched, remat in _grid():
        loss, grads = case.piped(k, sched, remat)
        assert loss == pytest.approx(ref_loss, rel=1e-5), (k, sched, remat)
        _close(grads, ref_grads, rtol=1e-5, atol=1e-6)
