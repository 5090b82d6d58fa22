"""A model zoo as a differential test: thirteen ``transformers`` architectures, each from its
default config shrunk (dropout left at its default), wrapped the way users wrap them —
``gpipe.Pipe(model, sample=x, ...)`` — and run against the plain model through the habits of
ordinary training code:

- ``model.eval()`` before wrapping: ``pipe(x)`` equals ``model(x)``;
- training with the default dropout: the loss and gradients do not depend on K or the
  schedule, and equal :func:`gpipe.reference_step` (the plain model with the same keyed draws);
- three optimizer steps equal three plain steps, the trained parameters in the user's model;
- two ``step`` calls without ``zero_grad`` accumulate the plain model's two gradients;
- a step under ``torch.autocast("cpu", dtype=torch.bfloat16)`` equals the plain autocast loop;
- a batch of another sequence length (or image size) than the sample's.

The habits are spread over the schedule families rather than run for every model and every
schedule. Float64 where the model allows (the MoE experts' grouped product takes float32).
``make zoo`` runs all of it; the default run keeps one case of each habit.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch

import gpipe
from gpipe import schedules
from gpipe.capture import Sample, capture

pytest.importorskip("transformers")

from zoo_models import ZOO, call, first_tensor, has_dropout, loss  # noqa: E402

M = 4  # micro-batches of the four-row batches
DROPOUT = {"gpt2", "opt", "bert", "roberta", "distilbert", "t5", "bart"}

EVAL_IGNORED = "known bug: model.eval() before wrapping is ignored, the pipe trains (dropout on)"
OTHER_LENGTH = (
    "known bug: a batch of another sequence length is refused (only the batch may change)"
)
AUTOCAST_BACKWARD = "known bug: the pipe's backward runs under the caller's autocast"


def slow(*args: Any, marks: Any = ()) -> Any:
    return pytest.param(*args, marks=[pytest.mark.slow, *marks])


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """How close a pipelined result must be: float rounding of the micro-batch sums."""
    return {"rtol": 1e-9, "atol": 1e-11} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-6}


def pipe_of(model: torch.nn.Module, sample: Any, k: int, schedule: str, **options: Any):
    """``gpipe.Pipe(model, sample=sample, ...)`` on ``k`` CPU devices, two virtual stages per
    device for the schedules that take them."""
    v = 2 if schedule in schedules.interleaving() else None
    return gpipe.Pipe(
        model,
        sample=sample,
        stages=k,
        devices=["cpu"] * k,
        chunks=M,
        schedule=schedule,
        virtual_stages=v,
        **options,
    )


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same(got: dict, want: dict, **tol: float) -> None:
    assert got.keys() == want.keys() and got
    for name, g in got.items():
        if want[name] is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, want[name], **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_the_zoo_keeps_its_configs_dropout() -> None:
    """The zoo's defaults draw random numbers exactly where the config's defaults have a
    dropout (the cases below rely on it)."""
    drawing = set()
    for name, z in ZOO.items():
        model = z.build()
        if has_dropout(model, z.batch()[0]):
            drawing.add(name)
    assert drawing == DROPOUT
    assert {z.family for z in ZOO.values()} >= {
        "decoder",
        "encoder",
        "encoder-decoder",
        "vision",
        "moe",
    }


SCHEDULES = schedules.available()
EVAL = [
    pytest.param(
        name,
        SCHEDULES[i % len(SCHEDULES)],
        marks=[pytest.mark.xfail(strict=True, reason=EVAL_IGNORED)] if name in DROPOUT else [],
    )
    for i, name in enumerate(ZOO)
]


@pytest.mark.parametrize(("name", "schedule"), EVAL)
def test_eval_before_wrapping_forward_equals_the_model(name: str, schedule: str) -> None:
    z = ZOO[name]
    model = z.build()
    sample, _ = z.batch()
    model.eval()
    pipe = pipe_of(model, sample, 2, schedule)
    with torch.no_grad():
        want = call(model, sample)
        got = call(pipe, sample)
    torch.testing.assert_close(first_tensor(got), first_tensor(want), **tolerance(z.dtype))
