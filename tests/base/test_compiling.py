"""``torch.compile`` and a pipe: compiling the layers works, compiling the pipe is refused.

``torch.compile(pipe)(x)`` used to kill the process (a segmentation fault inside the FLOPs
profiling the pipe runs on its first call, traced by dynamo). It is now one
:class:`gpipe.base.compiling.CompileError` saying to compile the layers instead, raised before the
pipe does anything, so the same pipe then runs uncompiled. The refusal runs in a subprocess, so
a crash fails the test instead of killing pytest. Expected values come from the plain model.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import gpipe

REFUSED = r"""
import torch
from torch import nn
import gpipe
from gpipe.base.compiling import CompileError
from gpipe.planner.cost import profile

torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(4)]).double()
x = torch.randn(4, 6, dtype=torch.float64)
y = torch.randn(4, 6, dtype=torch.float64)


def mse(out, target):
    return ((out - target) ** 2).mean()


def refused(fn, *args):
    try:
        fn(*args)
    except CompileError as e:
        return str(e)
    raise AssertionError(f"{fn} ran under torch.compile")


pipe = gpipe.Pipe(model, stages=2, chunks=2)  # balances on its first call
print("forward:", refused(torch.compile(pipe), x))
print("step:", refused(torch.compile(lambda a, b: pipe.step(a, b, mse)), x, y))
print("profile:", refused(torch.compile(lambda a: profile(model, a)), x))
assert pipe.balance is None, "the refused calls must not have partitioned the pipe"
assert torch.equal(pipe(x), model(x))  # the same pipe, uncompiled
print("uncompiled: ok")
"""


@pytest.mark.slow
def test_compiling_the_pipe_is_refused_with_the_way_out_not_a_crash() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", REFUSED], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = {line.split(":", 1)[0]: line for line in proc.stdout.splitlines()}
    calls = {"forward": "pipe(x)", "step": "pipe.step", "profile": "gpipe.planner.cost.profile"}
    for call, name in calls.items():
        assert f"cannot trace {name}" in lines[call]
        assert "Compile the layers instead" in lines[call] and "torch.compile(layer)" in lines[call]
    assert lines["uncompiled"] == "uncompiled: ok"


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_compiled_layers_inside_a_pipe_train_like_the_plain_model(schedule: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(3) for m in (nn.Linear(6, 6), nn.Tanh())]).double()
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.randn(8, 6, dtype=torch.float64)
    ((model(x) - y) ** 2).mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    compiled = nn.Sequential(*(torch.compile(layer) for layer in model))
    pipe = gpipe.Pipe(compiled, stages=2, chunks=4, schedule=schedule)  # balanced by FLOPs
    loss = pipe.step(x, y, lambda out, t: ((out - t) ** 2).mean())
    assert pipe.balance is not None and sum(pipe.balance) == len(model)
    assert torch.isclose(loss, ((model(x) - y) ** 2).mean(), rtol=0, atol=1e-12)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-12)
