"""Mistakes that used to surface as another layer's error, or as a message about something
else: each now gets one message saying what is wrong and what to do, raised before any work.

One table of calls that must raise (the exception type and a regex its message must match),
then the cases a table cannot hold. Each row is a case of docs/reliability.md.
"""

from __future__ import annotations

import copy
import io
import pickle
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import gpipe
from gpipe.planner.autoplan import autoplan


def mlp(n: int = 4) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(4, 4) for _ in range(n)])


X = torch.randn(8, 4)


def plan(**kw: Any) -> Callable[[], Any]:
    return lambda: autoplan(mlp(), X, **kw)


class Tower(nn.Module):
    """Not a sequence: captured on a sample, cut where split_points say."""

    def __init__(self) -> None:
        super().__init__()
        self.h = nn.ModuleList(nn.Linear(4, 4) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.h:
            x = torch.tanh(layer(x))
        return x


def tower(**kw: Any) -> Callable[[], Any]:
    return lambda: gpipe.Pipe(Tower(), sample=X, devices=["cpu"] * 2, **kw)


# (id, call, exception type, message regex)
RAISES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    (
        "autoplan-nan-limit",
        plan(memory_limit=float("nan")),
        ValueError,
        r"memory size must be a finite number of bytes, got nan; for no limit pass memory_limit=None",
    ),
    (
        "autoplan-huge-limit-string",
        plan(memory_limit="1e400"),
        ValueError,
        r"finite number of bytes, got '1e400'",
    ),
    (
        "autoplan-devices-digit-string",
        plan(devices="2"),
        TypeError,
        r"devices must be a count K or a list of K devices, got '2'; write devices=2",
    ),
    (
        "autoplan-devices-cpu-string",
        plan(devices="cpu"),
        TypeError,
        r"got 'cpu'; .*\['cpu', 'cpu'\]",
    ),
    (
        "autoplan-cuda-index-without-cuda",
        plan(devices=[0, 1]),
        ValueError,
        r"devices holds 0, but this machine has 0 CUDA device\(s\)",
    ),
    (
        "autoplan-more-devices-than-layers",
        plan(devices=5),
        ValueError,
        r"autoplan got 5 devices but the model has 4 layers.*at most 4 devices",
    ),
    ("autoplan-batch-size-zero", plan(batch_size=0), ValueError, r"batch_size must be >= 1, got 0"),
    (
        "autoplan-batch-size-negative",
        plan(batch_size=-3),
        ValueError,
        r"batch_size must be >= 1, got -3",
    ),
    (
        "autoplan-empty-sample-batch",
        lambda: autoplan(mlp(), X[:0]),
        ValueError,
        r"sample has a batch of 0 rows",
    ),
    (
        "autoplan-unknown-schedule",
        plan(schedules=["1f1c"]),
        ValueError,
        r"unknown schedule '1f1c' \(did you mean '1f1b'\?\)",
    ),
    ("autoplan-max-chunks-zero", plan(max_chunks=0), ValueError, r"max_chunks must be >= 1, got 0"),
    (
        "autoplan-unknown-remat-mode",
        plan(remat_modes=["sometimes"]),
        ValueError,
        r"unknown remat mode 'sometimes'; choose one of always, except_last, never",
    ),
    (
        "autoplan-headroom-checked-first",
        plan(headroom=1.5, devices="2"),
        ValueError,
        r"headroom must be a fraction in \[0, 1\), got 1.5",
    ),
    (
        "auto-unknown-option",
        lambda: gpipe.Auto(colour="red"),
        TypeError,
        r"Auto got unknown option\(s\) \['colour'\]; it takes memory_limit",
    ),
    (
        "auto-misspelt-option",
        lambda: gpipe.Auto(max_chunk=4),
        TypeError,
        r"'max_chunk': did you mean 'max_chunks'\?",
    ),
    (
        "auto-nan-limit",
        lambda: gpipe.Auto(memory_limit=float("nan")),
        ValueError,
        r"finite number of bytes, got nan",
    ),
    (
        "auto-bad-remat-mode",
        lambda: gpipe.Auto(remat_modes=["sometimes"]),
        ValueError,
        r"unknown remat mode 'sometimes'",
    ),
    (
        "split-points-disagree-with-stages",
        tower(split_points="h.2", stages=3),
        ValueError,
        r"split_points cut the model into 2 stages, but stages=3 asks for 3; drop stages=",
    ),
    (
        "split-points-with-auto",
        tower(split_points=["h.2"], schedule="auto"),
        ValueError,
        r"split_points cut the model into 2 stages, but schedule='auto' chooses the cut itself",
    ),
    (
        "split-points-not-shared-by-virtual-stages",
        tower(split_points=["h.1", "h.2"], schedule="interleaved"),
        ValueError,
        r"split_points cut the model into 3 stages, which 2 virtual stages per device cannot share",
    ),
    (
        "pipe-devices-digit-string",
        lambda: gpipe.Pipe(mlp(), devices="2"),
        ValueError,
        r"devices holds '2', which is not a device.*for 2 stages write stages=2",
    ),
]


@pytest.mark.parametrize(
    ("call", "exc", "match"), [r[1:] for r in RAISES], ids=[r[0] for r in RAISES]
)
def test_bad_input_is_named(call: Callable[[], Any], exc: type[BaseException], match: str) -> None:
    with pytest.raises(exc, match=match):
        call()


# ------------------------------------------------------------------ the planner


SMALL = {"max_chunks": 2, "schedules": ["gpipe", "1f1b"], "remat_modes": ["never"]}


def _key(ranked: list) -> list[tuple]:
    return [(c.schedule, c.virtual_stages, c.chunks, c.balance, c.remat) for c in ranked]


def test_an_infinite_memory_limit_means_no_limit() -> None:
    model = mlp()
    assert _key(autoplan(model, X, memory_limit=float("inf"), **SMALL)) == _key(
        autoplan(model, X, memory_limit=None, **SMALL)
    )
    assert gpipe.Auto(memory_limit=float("inf")).memory_limit == float("inf")


def test_more_devices_than_layers_is_refused_before_any_profiling(monkeypatch) -> None:
    import sys

    ap = sys.modules["gpipe.planner.autoplan"]  # the module; gpipe.autoplan is the function

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("profiled a model that cannot be cut")

    monkeypatch.setattr(ap, "profile", never)
    with pytest.raises(ValueError, match=r"autoplan got 1000 devices but the model has 4 layers"):
        autoplan(mlp(), X, devices=1000)


class Residual(nn.Module):
    """Not a sequence: ``autoplan`` captures it on its sample, as ``Pipe(sample=...)`` does."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.c(self.b(h) + h)


def test_autoplan_captures_a_model_that_is_not_a_sequence() -> None:
    model = Residual()
    ranked = autoplan(model, X, devices=2, **SMALL)
    captured = gpipe.capture.capture(model, X)
    assert _key(ranked) == _key(autoplan(captured, X, devices=2, **SMALL))
    assert all(sum(c.balance) == len(captured) for c in ranked)


def test_gpipe_plan_auto_with_an_endless_memory_limit_is_one_usage_error(capsys) -> None:
    from gpipe.cli.main import main

    argv = ["plan", "--auto", "--model-preset", "tiny", "--batch-size", "8"]
    assert main([*argv, "--memory-limit", "1e400"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--memory-limit: a memory size must be a finite number" in err[0]


# ------------------------------------------------------------------ capture's split points


def test_one_split_point_may_be_given_as_a_string() -> None:
    one = tower(split_points="h.2", chunks=2)()
    listed = tower(split_points=["h.2"], chunks=2)()
    assert one.balance == listed.balance and len(one.balance) == 2
    assert one.partitions[1].layers[0].startswith("h/2")


# ------------------------------------------------------------------ Python's copy and pickle


def _two_stage_pipe() -> gpipe.Pipe:
    return gpipe.Pipe(mlp(2), devices=["cpu"] * 2, balance=[1, 1], chunks=2)


@pytest.mark.parametrize(
    "habit",
    [copy.copy, copy.deepcopy, pickle.dumps, lambda p: torch.save(p, io.BytesIO())],
    ids=["copy", "deepcopy", "pickle", "torch.save"],
)
def test_copying_or_pickling_a_pipe_points_to_its_state_dict(habit: Callable) -> None:
    pipe = _two_stage_pipe()
    with pytest.raises(
        TypeError, match=r"a Pipe cannot be pickled or copied .*pipe\.state_dict\(\)"
    ):
        habit(pipe)
    assert pipe(X).shape == (8, 4)  # the pipe still works


# ------------------------------------------------------------------ reduction


def test_a_count_of_no_items_in_the_whole_batch_is_refused_naming_the_count() -> None:
    def no_items(targets: torch.Tensor) -> int:
        return 0

    pipe = _two_stage_pipe()
    with pytest.raises(
        ValueError, match=r"reduction=.*no_items counted 0 items in every one of the 2"
    ):
        pipe.step(X, X, nn.functional.mse_loss, reduction=no_items)
    assert all(p.grad is None for p in pipe.parameters()) and pipe.rng_step == 0
    pipe.step(X, X, nn.functional.mse_loss, reduction=len)  # a count of rows trains
    assert all(p.grad is not None for p in pipe.parameters())


# ------------------------------------------------------------------ state dicts


def test_a_captured_pipes_load_names_keys_as_the_model_does() -> None:
    model = Tower()
    pipe = gpipe.Pipe(model, sample=X, devices=["cpu"] * 2, chunks=2)
    state = {f"layers.{k}": v for k, v in model.state_dict().items() if k != "h.0.bias"}
    state["layers.extra.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as info:
        pipe.load_state_dict(state)
    assert 'Missing key(s) in state_dict: "layers.h.0.bias"' in str(info.value)
    assert 'Unexpected key(s) in state_dict: "layers.extra.weight"' in str(info.value)
    got = pipe.load_state_dict(state, strict=False)
    assert (got.missing_keys, got.unexpected_keys) == (["layers.h.0.bias"], ["layers.extra.weight"])
    own = pipe.layers.load_state_dict(model.state_dict(), strict=False)
    assert (own.missing_keys, own.unexpected_keys) == ([], [])
