"""Ranks that disagree, and bad input to DistributedPipe: every rank must raise, at once, naming
the option, each rank's value (or the rank that failed) and the fix — never train a different
model or hang.

All cases run in ONE spawned gloo group of 2 ranks: each rank loops over the cases, records
what each call raised and how long it took, and the parent checks the table. Every pipe has a
short timeout, and the group is joined with a deadline, so the file stays within ~40 s on two
busy cores. Each case is a row of docs/reliability.md ("Core functions and ranks that
disagree").
"""

from __future__ import annotations

import copy
import os
import pickle
import re
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from spawn_ranks import spawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

TIMEOUT = 8.0  # every pipe's bound; a case that waits for it has hung
FAST = 4.0  # a failure must be known well before the timeout
FIX = r"construct DistributedPipe identically on every rank"


def mlp(*, dtype: torch.dtype = torch.float64, act: type = nn.Tanh, bias4: bool = True, extra=0):
    torch.manual_seed(0)
    layers = [nn.Linear(8, 8), act(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8, bias=bias4)]
    layers += [nn.Identity() for _ in range(extra)]
    layers.append(nn.Linear(8, 3))
    return nn.Sequential(*layers).to(dtype)


def batch(rows: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(rows, 8, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 3, (rows,), generator=g)


class Opaque(nn.Module):
    """Hands a set (which cannot cross processes) to the next stage."""

    def forward(self, x: torch.Tensor) -> Any:
        return {"x": x, "tags": {1, 2}}


class Unwrap(nn.Module):
    def forward(self, d: Any) -> torch.Tensor:
        return d["x"]


def _custom(order: str) -> Any:
    from gpipe.schedules import custom

    if order == "gpipe":
        return custom(
            [["F0@s0", "F1@s0", "B1@s0", "B0@s0"], ["F0@s1", "F1@s1", "B1@s1", "B0@s1"]], 2
        )
    return custom([["F0@s0", "F1@s0", "B0@s0", "B1@s0"], ["F0@s1", "B0@s1", "F1@s1", "B1@s1"]], 2)


# ----------------------------------------------------------------------------- the cases
# Each case: rank -> pipe kwargs (and model), then what the step does. Expected outcomes per
# rank are regexes in EXPECT below.


def _construct(rank: int, model: nn.Module | None = None, **kw: Any) -> Any:
    from gpipe.dist.pipe import DistributedPipe

    kw.setdefault("timeout", TIMEOUT)
    if "chunks" not in kw and "micro_batch_size" not in kw:
        kw["chunks"] = 2
    return DistributedPipe(model if model is not None else mlp(), **kw)


def _build_and_step(rank: int, step: Callable[[Any, int], Any] | None = None, **kw: Any) -> Any:
    with _construct(rank, **kw) as pipe:
        x, y = batch()
        if step is not None:
            return step(pipe, rank)
        return float(pipe.step(x, y, F.cross_entropy))


def _per_rank(**by_key: tuple[Any, Any]) -> Callable[[int], Any]:
    """A case whose pipe kwargs differ by rank: ``key=(rank 0 value, rank 1 value)``."""

    def run(rank: int) -> Any:
        kw = {k: v[rank] for k, v in by_key.items()}
        model = kw.pop("model", None)
        return _construct(rank, model, **kw)

    return run


def _hidden_cause(rank: int) -> Any:
    x, y = batch(12)
    with _construct(rank, chunks=8) as pipe:  # balanced by FLOPs at the first step
        return pipe.step(x, y, F.cross_entropy)


def _hidden_cause_no_data_on_rank1(rank: int) -> Any:
    x, y = batch(12)
    with _construct(rank, chunks=8) as pipe:
        return pipe.step(x if rank == 0 else None, y if rank == 0 else None, F.cross_entropy)


def _hidden_cause_after_build(rank: int) -> Any:
    with _construct(rank, chunks=8, balance=[3, 3]) as pipe:
        pipe.step(*batch(16), F.cross_entropy)  # fine
        return pipe.step(*batch(12), F.cross_entropy)


def _targets_missing(rank: int) -> Any:
    x, _ = batch()
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(x, None, F.cross_entropy)


def _inputs_missing(rank: int) -> Any:
    _, y = batch()
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(None, y, F.cross_entropy)


def _empty_batch(rank: int) -> Any:
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(*batch(0), F.cross_entropy)


def _reduction(rank: int) -> Any:
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(*batch(), F.cross_entropy, reduction="avg")


def _reduction_on_rank0_only(rank: int) -> Any:
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(*batch(), F.cross_entropy, reduction="avg" if rank == 0 else "mean")


def _after_close(rank: int) -> Any:
    pipe = _construct(rank, balance=[3, 3])
    pipe.close()
    return pipe.step(*batch(), F.cross_entropy)


def _nan_loss_checked(rank: int) -> Any:
    with _construct(rank, balance=[3, 3], check_finite=True) as pipe:
        return pipe.step(*batch(), lambda o, t: F.cross_entropy(o, t) * float("nan"))


def _detached_loss(rank: int) -> Any:
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(*batch(), lambda o, t: F.cross_entropy(o, t).detach())


def _targets_of_another_size(rank: int) -> Any:
    x, _ = batch()
    _, y = batch(24)
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(x, y, F.cross_entropy)


def _loss_fn_swapped(rank: int) -> Any:
    x, y = batch()
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(x, F.cross_entropy, y)


def _fetch(rank: int) -> Any:
    """Each rank's ``fetched`` holds its own layers' activations, equal to the plain model's."""
    x, y = batch()
    names = ["1", "3"]  # the first tanh (rank 0's stage) and the second (rank 1's)
    with _construct(rank, balance=[3, 3], fetch=names) as pipe:
        pipe.step(x, y, F.cross_entropy)
        got = {n: t.clone() for n, t in pipe.fetched.items()}
    plain, want = mlp(), {}
    hooks = [plain[int(n)].register_forward_hook(_keep(want, n)) for n in names]
    plain(x)
    for h in hooks:
        h.remove()
    return sorted(got), max(float((got[n] - want[n]).abs().max()) for n in got)


def _keep(store: dict, name: str) -> Callable:
    def hook(module: nn.Module, args: Any, out: torch.Tensor) -> None:
        store[name] = out.detach()

    return hook


def _own_batches(rank: int) -> Any:
    """Each rank draws its own batch: rank 0's inputs would meet rank 1's targets."""
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(12, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (12,), generator=g)
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(x, y, F.cross_entropy)


def _smaller_batch_on_rank1(rank: int) -> Any:
    with _construct(rank, balance=[3, 3]) as pipe:
        return pipe.step(*batch(12 if rank == 0 else 8), F.cross_entropy)


def _eval_on_rank1(rank: int) -> Any:
    with _construct(rank, balance=[3, 3]) as pipe:
        pipe.train(rank == 0)
        return pipe.step(*batch(), F.cross_entropy)


def _layer_replaced_on_rank1(rank: int) -> Any:
    """Rank 1 replaces a layer of its model after construction: refused there by name, and
    the refusal reaches rank 0 instead of leaving it waiting."""
    model = mlp()
    with _construct(rank, model, balance=[3, 3]) as pipe:
        if rank == 1:
            model[5] = nn.Linear(8, 3).double()
        return pipe.step(*batch(), F.cross_entropy)


def _no_grad_on_rank1(rank: int) -> Any:
    with _construct(rank, balance=[3, 3]) as pipe, torch.set_grad_enabled(rank == 0):
        return pipe.step(*batch(), F.cross_entropy)


def _refused_then_agreeing(rank: int) -> Any:
    """A refused step changes nothing: the next, agreeing, step is the reference's."""
    from gpipe.core.reference import reference_step

    x, y = batch()
    with _construct(rank, balance=[3, 3]) as pipe:
        try:
            pipe.step(x * (1 + rank), y, F.cross_entropy)
            refused = "no"
        except ValueError as e:
            refused = str(e)
        loss = float(pipe.step(x, y, F.cross_entropy))
        step = pipe.rng_step
    ref = float(reference_step(mlp(), x, y, F.cross_entropy, chunks=2, seed=0, step=0))
    return refused, loss, ref, step


def _opaque(rank: int) -> Any:
    model = nn.Sequential(nn.Linear(8, 8), Opaque(), Unwrap(), nn.Linear(8, 3)).double()
    with _construct(rank, model, balance=[2, 2]) as pipe:
        return pipe.step(*batch(), F.cross_entropy)


def _agreeing(rank: int) -> Any:
    """Identical construction passes the check; the loss equals the reference's."""
    from gpipe.core.reference import reference_step

    x, y = batch()
    with _construct(rank, chunks=2, schedule="1f1b") as pipe:
        loss = float(pipe.step(x, y, F.cross_entropy))
        balance = pipe.balance
    ref = float(reference_step(mlp(), x, y, F.cross_entropy, chunks=2, seed=0, step=0))
    return (loss, ref, balance)


class Looped(nn.Module):
    """Not a sequence: each rank captures it on its sample."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.h = nn.ModuleList(nn.Linear(8, 8).double() for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.h:
            x = torch.tanh(layer(x))
        return x


def _captured_state(rank: int) -> Any:
    """A captured pipe's state_dict has the model's own keys, load_state_dict takes them and
    names what it misses with them, and the pipe refuses pickle and deepcopy."""
    model = Looped()
    own = model.state_dict()
    with _construct(rank, model, sample=batch()[0], split_points="h.2") as pipe:
        keys = list(pipe.state_dict())
        mine = {k: own[k].clone().zero_() for k in keys}
        loaded = pipe.load_state_dict(mine)
        zeroed = all(bool((p == 0).all()) for p in pipe.parameters())
        missing = pipe.load_state_dict({k: own[k] for k in keys[1:]}, strict=False).missing_keys
        refusals = []
        for habit in (copy.deepcopy, pickle.dumps):
            try:
                habit(pipe)
            except TypeError as e:
                refusals.append(str(e))
        return keys, list(own), (list(loaded.missing_keys), zeroed), missing, refusals


def _no_step(rank: int) -> Any:
    """Rank 1 builds its pipe and closes it without calling step; rank 0 steps."""
    with _construct(rank, balance=[3, 3], timeout=2.0) as pipe:
        if rank == 1:
            time.sleep(2.5)  # back at the next case about when rank 0 has given up
            return "no step"
        x, y = batch()
        return pipe.step(x, y, F.cross_entropy)


def _never_comes(rank: int) -> Any:
    """Rank 1 never constructs its pipe (last case: the group is not used afterwards)."""
    if rank == 1:
        time.sleep(3.0)
        return "stayed away"
    return _construct(rank, timeout=2.0)


CASES: dict[str, Callable[[int], Any]] = {
    # ranks that disagree (construction)
    "balance": _per_rank(balance=([3, 3], [2, 4])),
    "chunks": _per_rank(chunks=(2, 4)),
    "micro_batch_size": _per_rank(micro_batch_size=(2, 3)),
    "schedule": _per_rank(schedule=("gpipe", "1f1b")),
    "custom schedule": _per_rank(schedule=(_custom("gpipe"), _custom("1f1b"))),
    "virtual_stages": _per_rank(schedule=("interleaved", "interleaved"), virtual_stages=(2, 3)),
    "remat": _per_rank(remat=("always", "never")),
    "seed": _per_rank(seed=(0, 1)),
    "fsdp": _per_rank(data_parallel=(2, 2), fsdp=(False, True)),
    "batch_dim": _per_rank(batch_dim=(0, 1)),
    "data_parallel": _per_rank(data_parallel=(1, 2)),
    "tied": _per_rank(tied=([("0.weight", "2.weight")], [])),
    "layer shape": _per_rank(model=(mlp(), mlp(bias4=False))),
    "layer class": _per_rank(model=(mlp(), mlp(act=nn.ReLU))),
    "layer dtype": _per_rank(model=(mlp(), mlp(dtype=torch.float32))),
    "number of layers": _per_rank(model=(mlp(), mlp(extra=1))),
    "sample on one rank": _per_rank(sample=(batch()[0], None)),
    "sample shapes": _per_rank(sample=(batch(12)[0], batch(8)[0])),
    "captured model's state": _captured_state,
    "bad balance on rank 1 only": _per_rank(balance=([3, 3], [3, 4])),
    "agreeing": _agreeing,
    # bad input
    "hidden cause": _hidden_cause,
    "hidden cause, no data on rank 1": _hidden_cause_no_data_on_rank1,
    "hidden cause after build": _hidden_cause_after_build,
    "hidden cause in the sample": _per_rank(chunks=(8, 8), sample=(batch(12)[0], batch(12)[0])),
    "stages=3 on 2 ranks": _per_rank(stages=(3, 3)),
    "stages=True": _per_rank(stages=(True, True)),
    "data_parallel=0": _per_rank(data_parallel=(0, 0)),
    "data_parallel=3": _per_rank(data_parallel=(3, 3)),
    "chunks=True": _per_rank(chunks=(True, True)),
    "timeout=nan": _per_rank(timeout=(float("nan"), float("nan"))),
    "balance length": _per_rank(stages=(2, 2), balance=([2, 2, 2], [2, 2, 2])),
    "targets missing": _targets_missing,
    "inputs missing": _inputs_missing,
    "empty batch": _empty_batch,
    "reduction": _reduction,
    "reduction on rank 0 only": _reduction_on_rank0_only,
    "after close": _after_close,
    "pinned": _per_rank(pinned=(0, 1)),
    "NaN loss with check_finite": _nan_loss_checked,
    "detached loss": _detached_loss,
    "targets of another batch size": _targets_of_another_size,
    "loss_fn in the targets' place": _loss_fn_swapped,
    "fetch": _fetch,
    "fetch of an unknown module": _per_rank(fetch=(["9"], ["9"])),
    "non-tensor boundary value": _opaque,
    # ranks whose calls of step differ (each step's agreement)
    "each rank its own batch": _own_batches,
    "a smaller batch on rank 1": _smaller_batch_on_rank1,
    "eval() on rank 1": _eval_on_rank1,
    "no_grad on rank 1": _no_grad_on_rank1,
    "a layer replaced on rank 1": _layer_replaced_on_rank1,
    "refused, then agreeing": _refused_then_agreeing,
    "batch='shards'": _per_rank(batch=("shards", "shards")),
    "a rank that does not call step": _no_step,
    "a rank that never constructs": _never_comes,  # must stay last
}

# The same bad option given to both pipes must be refused with the same message (the shared
# checks of gpipe.base.options / gpipe.core.plan); the one-process Pipe's message is the expectation.
SHARED_BAD: dict[str, dict[str, Any]] = {
    "same: stages=2.0": {"stages": 2.0},
    "same: stages=True": {"stages": True},
    "same: chunks=2.5": {"chunks": 2.5},
    "same: chunks='4'": {"chunks": "4"},
    "same: micro_batch_size=0": {"micro_batch_size": 0},
    "same: balance=[1.5, 4.5]": {"balance": [1.5, 4.5]},
    "same: balance=4": {"balance": 4},
    "same: balance=[6, 0]": {"balance": [6, 0]},
    "same: balance=[2, 2]": {"balance": [2, 2]},
    "same: seed='a'": {"seed": "a"},
    "same: pinned=-1": {"pinned": -1},
    "same: pinned=9": {"pinned": 9},
    "same: pinned=6": {"pinned": 6},
    "same: timeout=0": {"timeout": 0},
    "same: timeout=nan": {"timeout": float("nan")},
    "same: batch_dim=True": {"batch_dim": True},
    "same: remat=None": {"remat": None},
    "same: schedule typo": {"schedule": "1f1c"},
    "same: stages=7": {"stages": 7},
}
_last = CASES.pop("a rank that never constructs")  # it must stay last
for _name, _kw in SHARED_BAD.items():
    CASES[_name] = _per_rank(**{k: (v, v) for k, v in _kw.items()})
CASES["a rank that never constructs"] = _last

DIS = r"ranks disagree on "
EXPECT: dict[str, tuple[str, str] | tuple[tuple[str, str], tuple[str, str]]] = {
    "balance": ("ValueError", DIS + r"balance: rank 0 has \[3, 3\], rank 1 has \[2, 4\]; " + FIX),
    "chunks": ("ValueError", DIS + r"chunks: rank 0 has 2, rank 1 has 4; " + FIX),
    "micro_batch_size": ("ValueError", DIS + r"micro_batch_size: rank 0 has 2, rank 1 has 3"),
    "schedule": ("ValueError", DIS + r"schedule: rank 0 has gpipe, rank 1 has 1f1b"),
    "custom schedule": ("ValueError", DIS + r"the custom schedule's actions: rank 0 has hash \w+"),
    "virtual_stages": ("ValueError", DIS + r"virtual_stages: rank 0 has 2, rank 1 has 3"),
    "remat": ("ValueError", DIS + r"remat: rank 0 has always, rank 1 has never"),
    "seed": ("ValueError", DIS + r"seed: rank 0 has 0, rank 1 has 1"),
    "fsdp": ("ValueError", DIS + r"fsdp: rank 0 has False, rank 1 has True"),
    "batch_dim": ("ValueError", DIS + r"batch_dim: rank 0 has 0, rank 1 has 1"),
    "data_parallel": (
        "ValueError",
        DIS
        + r"stages: rank 0 has 2, rank 1 has 1; "
        + DIS
        + r"data_parallel: rank 0 has 1, rank 1",
    ),
    "tied": (
        "ValueError",
        DIS + r"tied parameters: rank 0 has \[\['0.weight', '2.weight'\]\], rank 1 has \[\]",
    ),
    "layer shape": (
        "ValueError",
        DIS + r"layer 4: rank 0 has '4': Linear\(weight 8x8 float64, bias 8 float64\), rank 1 has "
        r"'4': Linear\(weight 8x8 float64\); " + FIX,
    ),
    "layer class": (
        "ValueError",
        DIS + r"layer 1: rank 0 has '1': Tanh\(\), rank 1 has '1': ReLU\(\)",
    ),
    "layer dtype": ("ValueError", DIS + r"layer 0: rank 0 has .*float64.*rank 1 has .*float32"),
    "number of layers": ("ValueError", DIS + r"the number of layers: rank 0 has 6, rank 1 has 7"),
    "sample on one rank": (
        "ValueError",
        DIS + r"sample: rank 0 has input\[0\]\[0\]: 12x8 float64, rank 1 has none",
    ),
    "sample shapes": (
        "ValueError",
        DIS + r"sample: rank 0 has input\[0\]\[0\]: 12x8 float64, rank 1 has input\[0\]\[0\]: "
        r"8x8 float64; " + FIX,
    ),
    "a rank that does not call step": (  # the step's agreement is the first to wait
        (
            "TimeoutError",
            r"rank 0 waited 2s for the other ranks to start the step and gave up .*every rank "
            r"must construct the same DistributedPipe and call step\(\) together",
        ),
        ("ok", r"no step"),
    ),
    "bad balance on rank 1 only": (
        (
            "ValueError",
            r"rank 1 could not construct its DistributedPipe: balance=\[3, 4\] sums to 7 but",
        ),
        ("ValueError", r"^balance=\[3, 4\] sums to 7 but the model has 6 layers"),
    ),
    "hidden cause": (
        "ValueError",
        r"^batch size 12 is not divisible by chunks=8; choose chunks that divide 12 or give "
        r"micro_batch_size$",
    ),
    "hidden cause, no data on rank 1": (
        ("ValueError", r"^batch size 12 is not divisible by chunks=8; choose chunks that divide"),
        (
            "ValueError",
            r"^rank 0 could not start the first step: batch size 12 is not divisible by chunks=8",
        ),
    ),
    "hidden cause after build": ("ValueError", r"^batch size 12 is not divisible by chunks=8"),
    "hidden cause in the sample": (
        "ValueError",
        r"^batch size 12 is not divisible by chunks=8; choose chunks that divide 12",
    ),
    "stages=3 on 2 ranks": (
        "ValueError",
        r"2 ranks cannot form pipelines of 3 devices.*pass stages= that divides 2",
    ),
    "stages=True": ("TypeError", r"stages must be an int >= 1, got bool True"),
    "data_parallel=0": ("ValueError", r"data_parallel must be >= 1, got 0"),
    "data_parallel=3": ("ValueError", r"data_parallel=3 does not divide the 2 ranks"),
    "chunks=True": ("TypeError", r"chunks must be an int >= 1, got bool True"),
    "timeout=nan": ("ValueError", r"timeout must be a finite number of seconds > 0, got nan"),
    "balance length": (
        "ValueError",
        r"balance has 3 entries but the pipeline has 2 stages; give one layer count per stage",
    ),
    "targets missing": (
        ("PeerError", r"rank 1 .*targets=None.*pass the targets to step"),
        ("StageError", r"targets=None.*pass the targets to step"),
    ),
    "inputs missing": (
        ("ValueError", r"rank 0 runs the first stage and needs the inputs; pass them to step"),
        ("PeerError", r"rank 0 .*needs the inputs"),
    ),
    "empty batch": (
        ("ValueError", r"the batch is empty \(0 rows along batch_dim=0\)"),
        ("ValueError", r"the batch is empty \(0 rows along batch_dim=0\)"),
    ),
    "reduction": ("ValueError", r"reduction must be 'mean', 'sum' or a callable.*got 'avg'"),
    "reduction on rank 0 only": (
        ("ValueError", r"reduction must be 'mean', 'sum' or a callable.*got 'avg'"),
        ("PeerError", r"rank 0 .*reduction must be 'mean', 'sum' or a callable.*got 'avg'"),
    ),
    "after close": ("RuntimeError", r"this DistributedPipe was closed.*construct a new one"),
    "pinned": ("ValueError", DIS + r"pinned: rank 0 has 0, rank 1 has 1; " + FIX),
    "fetch of an unknown module": ("ValueError", r"fetch names '9', which is not a module"),
    "NaN loss with check_finite": (
        ("PeerError", r"rank 1 .*loss of micro-batch 0 is nan"),
        ("StageError", r"FloatingPointError: loss of micro-batch 0 is nan"),
    ),
    "detached loss": (
        ("PeerError", r"rank 1 .*does not require grad"),
        ("StageError", r"loss_fn returned a loss that does not require grad for micro-batch"),
    ),
    "targets of another batch size": (
        "ValueError",
        r"targets have 24 rows along batch_dim=0 but the inputs have 12; pass one target",
    ),
    "loss_fn in the targets' place": (
        "TypeError",
        r"loss_fn must be callable as loss_fn\(output, target\), got Tensor",
    ),
    "non-tensor boundary value": (
        (
            "StageError",
            r"TypeError.*micro-batch 0 \(activation\): value\['tags'\] is a builtins.set",
        ),
        ("PeerError", r"rank 0 .*builtins.set"),
    ),
    "each rank its own batch": (
        "ValueError",
        r"^rank 1's batch differs from rank 0's \(inputs checksum \w+ vs \w+, targets checksum "
        r"\w+ vs \w+\): DistributedPipe needs the same mini-batch on every rank$",
    ),
    "a smaller batch on rank 1": (
        "ValueError",
        r"^rank 1's batch has 8 rows but rank 0's has 12: DistributedPipe needs the same",
    ),
    "eval() on rank 1": ("ValueError", r"^rank 1 is in eval\(\) while rank 0 is in train\(\)$"),
    "no_grad on rank 1": (
        "ValueError",
        r"^rank 1 runs without grad \(torch.no_grad\) while rank 0 runs with grad$",
    ),
    "a layer replaced on rank 1": (
        ("PeerError", r"rank 1 .*model\.5 is another Linear, but was a Linear when the pipe"),
        ("ModelChanged", r"^model\.5 is another Linear, .* built: this rank's pipe runs"),
    ),
    "batch='shards'": ("ValueError", r"batch must be 'same' .* or 'per_replica' .*got 'shards'"),
    "a rank that never constructs": (
        (
            "TimeoutError",
            r"rank 0 waited 2s for the other ranks to construct DistributedPipe and gave up",
        ),
        ("ok", r"stayed away"),
    ),
}


# ----------------------------------------------------------------------------- the group


def _scenario(rank: int, path: Path) -> None:
    out: dict[str, Any] = {}
    for name, case in CASES.items():
        t0 = time.monotonic()
        try:
            result = case(rank)
            if hasattr(result, "close"):
                result.close()
                result = "constructed"
            out[name] = ("ok", result, time.monotonic() - t0)
        except Exception as e:
            out[name] = (type(e).__name__, str(e), time.monotonic() - t0)
    torch.save(out, path / f"agree-{rank}.pt")


def _entry(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=30)
    )
    try:
        _scenario(rank, Path(out))
    except BaseException:
        (Path(out) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    os._exit(0)  # the last case left a collective unanswered: skip the teardown


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("agree")
    codes = spawn(_entry, lambda r: (r, 2, f"file://{tmp}/store", str(tmp)), world=2, limit=100)
    for r in range(2):
        err = tmp / f"error-{r}.txt"
        if err.exists():
            pytest.fail(f"rank {r} failed:\n{err.read_text()}")
    assert codes == [0, 0]
    return [torch.load(tmp / f"agree-{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", list(EXPECT))
def test_every_rank_raises_the_cause_at_once(results: list[dict[str, Any]], case: str) -> None:
    expect = EXPECT[case]
    per_rank = expect if isinstance(expect[0], tuple) else (expect, expect)
    for rank, (kind, pattern) in enumerate(per_rank):
        got_kind, message, elapsed = results[rank][case]
        assert got_kind == kind, f"rank {rank}: {got_kind}: {message}"
        assert re.search(pattern, message), f"rank {rank}: {message!r} !~ {pattern!r}"
        assert elapsed < FAST, f"rank {rank} took {elapsed:.1f}s (a timeout, not the cause)"


def test_identical_ranks_pass_the_check_and_train_the_reference(results: list) -> None:
    for rank in range(2):
        kind, (loss, ref, balance), _ = results[rank]["agreeing"]
        assert kind == "ok"
        assert abs(loss - ref) < 1e-10, (loss, ref)
        assert balance is not None and sum(balance) == 6


def test_a_refused_step_changes_nothing(results: list) -> None:
    for r in range(2):
        kind, (refused, loss, ref, step), _ = results[r]["refused, then agreeing"]
        assert kind == "ok"
        assert refused.startswith("rank 1's batch differs from rank 0's"), refused
        assert abs(loss - ref) < 1e-10 and step == 1  # the refused step drew no stream step


def test_fetch_gives_each_rank_its_own_layers_activations(results: list) -> None:
    for rank, names in enumerate((["1"], ["3"])):
        kind, (got, err), _ = results[rank]["fetch"]
        assert kind == "ok" and got == names, (rank, got)
        assert err < 1e-12, err


def test_a_captured_pipes_state_dict_has_the_models_own_keys(results: list) -> None:
    keys_of = []
    for rank in range(2):
        kind, (keys, own, loaded, missing, refusals), _ = results[rank]["captured model's state"]
        assert kind == "ok"
        assert keys and set(keys) <= set(own), keys  # no segment names in them
        assert loaded == ([], True)  # the model's own keys load, strictly
        assert missing == [keys[0]]  # a key the load misses is named as the model names it
        assert len(refusals) == 2
        assert all("DistributedPipe cannot be pickled or copied" in r for r in refusals)
        keys_of.append(set(keys))
    assert keys_of[0] | keys_of[1] == set(own) and not keys_of[0] & keys_of[1]


def test_every_case_is_checked() -> None:
    assert set(CASES) == set(EXPECT) | {
        "agreeing",
        "fetch",
        "refused, then agreeing",
        "captured model's state",
    } | set(SHARED_BAD)


@pytest.mark.parametrize("case", list(SHARED_BAD))
def test_both_pipes_refuse_a_bad_option_with_the_same_message(
    results: list[dict[str, Any]], case: str
) -> None:
    import gpipe

    kw = dict(SHARED_BAD[case])
    if "chunks" not in kw and "micro_batch_size" not in kw:
        kw["chunks"] = 2
    if "stages" not in kw and "balance" not in kw:
        kw["stages"] = 2
    with pytest.raises((TypeError, ValueError)) as info:
        gpipe.Pipe(mlp(), **kw)
    for rank in range(2):
        got_kind, message, _ = results[rank][case]
        assert (got_kind, message) == (type(info.value).__name__, str(info.value)), rank


def test_no_process_group_is_named() -> None:
    import torch.distributed as dist

    from gpipe.dist.pipe import DistributedPipe

    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match=r"call torch.distributed.init_process_group\(\.\.\.\)"):
        DistributedPipe(mlp(), chunks=2)
