"""The invariant every other test defends: pipelined training equals un-pipelined training.

Parametrized over schedule x stages K x micro-batches M x re-materialization x dropout, on
float64, for both ``pipe.step`` and ``loss_fn(pipe(x), y).backward()``. The reference is
tests/reference_impl.py, which shares no code with gpipe (its own key derivation, random-op
routing, split and merge), so a bug in the library's random streams or micro-batching cannot
cancel out; ``gpipe.core.reference`` is checked against it once.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import gpipe
import reference_impl
from gpipe.planner.balance import balance as balance_costs

D = 6
N_LAYERS = 12
BATCH = 8


class Block(nn.Module):
    def __init__(self, p: float) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D)
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.tanh(self.fc(x))) + 0.5 * x


def make_model(p: float = 0.0, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(*[Block(p) for _ in range(N_LAYERS)]).to(dtype)


def data(dtype: torch.dtype = torch.float64, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, D, generator=g, dtype=dtype), torch.randn(
        BATCH, D, generator=g, dtype=dtype
    )


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) > 0, (len(a), len(b))
    return max((x - y).abs().max().item() for x, y in zip(a, b))


_REF_CACHE: dict = {}


def reference(
    p: float, m: int, step: int = 0, batch: int = 1
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The independent reference's loss and gradients (seed 7) on ``data(seed=batch)``."""
    key = (p, m, step, batch)
    if key not in _REF_CACHE:
        model = make_model(p)
        x, y = data(seed=batch)
        loss = reference_impl.step(model, x, y, loss_fn, chunks=m, seed=7, step=step)
        _REF_CACHE[key] = (loss, grads(model))
    return _REF_CACHE[key]


def skewed(n: int) -> list[int]:
    """An uneven cut of the 12 layers into ``n`` stages: one heavy stage, the others thin."""
    bal = [1] * n
    bal[n // 2] += N_LAYERS - n
    return bal


SCHEDULES = [("gpipe", 1), ("1f1b", 1), ("zb-h1", 1), ("interleaved", 2), ("interleaved", 3)]
REMATS = ["always", "except_last", "never"]


def _distinct(schedule: str, m: int, remat: str) -> bool:
    """At M=1 the 1F1B schedule is GPipe's (F0 then B0 on every device) and ``except_last``
    is ``never`` (the one micro-batch is the last): such cases would only repeat others."""
    return m > 1 or (schedule != "1f1b" and remat != "except_last")


# The default run keeps a spread of the matrix that has every schedule, remat mode, K and both
# cuts (the 20 cases tools/mutants.py runs, PIPE_SUBSET); the rest is slow.
SPREAD = {(4, 8, "always", 0.3), (2, 8, "except_last", 0.0), (3, 8, "never", 0.3)}


def _spread(case: tuple, default: bool) -> object:
    return case if default else pytest.param(*case, marks=pytest.mark.slow)


MATRIX = [
    (s, v, k, m, r, p, "even")
    for (s, v), k, m, r, p in itertools.product(
        SCHEDULES, [1, 2, 3, 4], [1, 2, 4, 8], REMATS, [0.0, 0.3]
    )
    if _distinct(s, m, r)
] + [  # in their place: uneven stages (one heavy, the rest one layer each), with dropout
    (s, v, k, m, r, 0.3, "skewed")
    for (s, v), k in itertools.product(SCHEDULES, [2, 3, 4])
    for m, r in [(2, "except_last"), (4, "never"), (8, "always")]
    if k * v < N_LAYERS  # 12 stages of 12 layers cannot be uneven
]


@pytest.mark.parametrize(
    ("schedule", "v", "k", "m", "remat", "p", "cut"),
    [_spread(case, case[2:6] in SPREAD) for case in MATRIX],
)
def test_step_equals_reference(
    schedule: str, v: int, k: int, m: int, remat: str, p: float, cut: str
) -> None:
    model = make_model(p)
    bal = balance_costs([1.0] * N_LAYERS, k * v) if cut == "even" else skewed(k * v)
    pipe = gpipe.Pipe(
        model,
        balance=bal,
        chunks=m,
        schedule=schedule,
        virtual_stages=v if schedule == "interleaved" else None,
        remat=remat,
        seed=7,
    )
    x, y = data()
    loss = pipe.step(x, y, loss_fn)
    ref_loss, ref_grads = reference(p, m)
    assert abs(loss.item() - ref_loss.item()) <= 1e-12
    assert max_diff(grads(model), ref_grads) <= 1e-10
    pipe.close()


AUTOGRAD_MATRIX = [
    (k, m, r, p, "even")
    for k, m, r, p in itertools.product([1, 2, 3, 4], [1, 2, 4, 8], REMATS, [0.0, 0.3])
    if _distinct("gpipe", m, r)
] + [  # in place of the M=1 repeats: uneven stages with dropout
    (k, m, r, 0.3, "skewed")
    for k, m, r in [
        (2, 2, "always"),
        (2, 8, "except_last"),
        (3, 2, "never"),
        (3, 4, "except_last"),
        (3, 8, "always"),
        (4, 2, "except_last"),
        (4, 4, "always"),
        (4, 8, "never"),
    ]
]


@pytest.mark.parametrize(  # the default run: M = 8 at every K, remat mode and cut
    ("k", "m", "remat", "p", "cut"), [_spread(case, case[1] == 8) for case in AUTOGRAD_MATRIX]
)
def test_autograd_forward_equals_reference(k: int, m: int, remat: str, p: float, cut: str) -> None:
    model = make_model(p)
    bal = balance_costs([1.0] * N_LAYERS, k) if cut == "even" else skewed(k)
    pipe = gpipe.Pipe(model, balance=bal, chunks=m, remat=remat, seed=7)
    x, y = data()
    xr = x.clone().requires_grad_()
    loss = loss_fn(pipe(xr), y)
    loss.backward()
    ref = make_model(p)
    xr2 = x.clone().requires_grad_()
    ref_loss = loss_fn(reference_impl.forward(ref, xr2, chunks=m, seed=7), y)
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) <= 1e-12
    assert max_diff(grads(model), grads(ref)) <= 1e-10
    assert (xr.grad - xr2.grad).abs().max().item() <= 1e-10
    pipe.close()


def test_library_reference_agrees_with_independent_reference() -> None:
    """``gpipe.core.reference`` (public API) draws what tests/reference_impl.py draws."""
    x, y = data(seed=3)
    model, ref = make_model(0.3), make_model(0.3)
    loss = gpipe.reference_step(model, x, y, loss_fn, chunks=4, seed=7, step=2)
    ref_loss = reference_impl.step(ref, x, y, loss_fn, chunks=4, seed=7, step=2)
    assert abs(loss.item() - ref_loss.item()) <= 1e-12
    assert max_diff(grads(model), grads(ref)) <= 1e-10
    with torch.no_grad():
        out = gpipe.reference_forward(model, x, chunks=2, seed=5, step=1)
        assert torch.equal(out, reference_impl.forward(ref, x, chunks=2, seed=5, step=1))


def test_independent_reference_is_plain_training_without_dropout() -> None:
    """The reference's own mechanics: with nothing random it is full-batch training, and with
    dropout it does draw (other masks per micro-batch than one full-batch stream)."""
    plain, model = make_model(), make_model()
    x, y = data()
    loss_fn(plain(x), y).backward()
    loss = reference_impl.step(model, x, y, loss_fn, chunks=4)
    assert abs(loss.item() - loss_fn(plain(x), y).item()) <= 1e-12
    assert max_diff(grads(model), grads(plain)) <= 1e-10
    with torch.no_grad():
        drop = make_model(0.3)
        assert not torch.equal(
            reference_impl.forward(drop, x, chunks=4), reference_impl.forward(drop, x, chunks=1)
        )


def test_without_dropout_equals_plain_full_batch_training() -> None:
    """No keyed streams involved: the plain model on the whole batch is the reference."""
    plain = make_model()
    x, y = data()
    loss_fn(plain(x), y).backward()
    for schedule in ("gpipe", "1f1b", "zb-h1", "interleaved"):
        model = make_model()
        pipe = gpipe.Pipe(
            model,
            stages=3,
            balance=None if schedule != "interleaved" else [2] * 6,
            chunks=4,
            schedule=schedule,
        )
        pipe.step(x, y, loss_fn)
        assert max_diff(grads(model), grads(plain)) <= 1e-10, schedule
        pipe.close()


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "interleaved"])
def test_float32_within_relative_tolerance(schedule: str) -> None:
    plain = make_model(dtype=torch.float32)
    x, y = data(torch.float32)
    loss_fn(plain(x), y).backward()
    model = make_model(dtype=torch.float32)
    pipe = gpipe.Pipe(
        model,
        balance=[3] * 4,
        chunks=4,
        schedule=schedule,
        virtual_stages=2 if schedule == "interleaved" else None,
    )
    pipe.step(x, y, loss_fn)
    got, want = grads(model), grads(plain)
    assert len(got) == len(want) == 2 * N_LAYERS
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    pipe.close()


def test_several_steps_keep_matching_with_dropout() -> None:
    """The keyed step counter advances per training call, like the reference's ``step``; each
    step sees a new batch, so nothing of an earlier step can pass for this one's result."""
    model = make_model(0.3)
    pipe = gpipe.Pipe(model, balance=[4, 4, 4], chunks=4, seed=7, schedule="1f1b")
    for step in range(3):
        model.zero_grad()
        x, y = data(seed=10 + step)
        loss = pipe.step(x, y, loss_fn)
        ref_loss, ref_grads = reference(0.3, 4, step, batch=10 + step)
        assert abs(loss.item() - ref_loss.item()) <= 1e-12
        assert max_diff(grads(model), ref_grads) <= 1e-10
    pipe.close()


def test_dropout_masks_differ_between_microbatches_and_steps() -> None:
    model = nn.Sequential(nn.Dropout(0.5))
    pipe = gpipe.Pipe(model, chunks=2, seed=3)
    ones = torch.ones(2, 64)
    a = pipe(ones)
    b = pipe(ones)
    assert not torch.equal(a[0], a[1])  # micro-batch 0 and 1 draw different masks
    assert not torch.equal(a, b)  # and so do consecutive steps
    pipe.close()


def test_no_grad_forward_keeps_nothing() -> None:
    model = make_model()
    pipe = gpipe.Pipe(model, balance=[6, 6], chunks=4)
    x, _ = data()
    with torch.no_grad():
        out = pipe(x)
    assert not out.requires_grad
    assert all(not st.pending for st in pipe._stages)
    assert torch.allclose(out, model(x))
    pipe.eval()
    with torch.no_grad():
        loss = pipe.step(x, torch.zeros_like(x), loss_fn)
    assert all(p.grad is None for p in model.parameters())
    assert loss.item() == pytest.approx(loss_fn(model(x), torch.zeros_like(x)).item())
    pipe.close()


def test_sequence_protocol_and_partitions() -> None:
    model = make_model()
    pipe = gpipe.Pipe(model, balance=[5, 7], chunks=2)
    assert len(pipe) == N_LAYERS
    assert pipe[0] is model[0]
    assert list(pipe) == list(model)
    parts = pipe.partitions
    assert [len(p.layers) for p in parts] == [5, 7]
    assert parts[1].layers[0] == "5"
    assert parts[0].num_parameters == 5 * (D * D + D)
    pipe.close()


def test_balance_by_flops_on_first_call() -> None:
    layers = [nn.Linear(32, 32) for _ in range(3)] + [nn.Linear(32, 512), nn.Linear(512, 32)]
    pipe = gpipe.Pipe(nn.Sequential(*layers), stages=2, chunks=2)
    with pytest.raises(RuntimeError, match="not partitioned yet"):
        _ = pipe.partitions
    pipe(torch.randn(4, 32))
    assert pipe.balance == [4, 1]  # the two wide layers weigh 16x a narrow one
    # forward FLOPs of one micro-batch (2 rows): 2 * rows * in * out per Linear
    assert [p.flops for p in pipe.partitions] == [
        2 * 2 * (3 * 32 * 32 + 32 * 512),
        2 * 2 * 512 * 32,
    ]
    pipe.close()


def test_extra_outputs_are_fetched_and_merged() -> None:
    model = make_model()
    pipe = gpipe.Pipe(model, balance=[4, 4, 4], chunks=4, fetch=["2", "9.fc"])
    x, y = data()
    out, fetched = pipe(x)
    with torch.no_grad():
        h = x
        acts = {}
        for i, layer in enumerate(model):
            if i == 9:
                acts["9.fc"] = layer.fc(h)
            h = layer(h)
            if i == 2:
                acts["2"] = h
    assert set(fetched) == {"2", "9.fc"}
    for name in fetched:
        assert fetched[name].shape == acts[name].shape
        assert torch.allclose(fetched[name], acts[name])
    loss_fn(out, y).backward()  # fetching does not disturb the backward (remat recomputes)
    plain = make_model()
    loss_fn(plain(x), y).backward()
    assert max_diff(grads(model), grads(plain)) <= 1e-10
    with pytest.raises(ValueError, match="not a module of the model"):
        gpipe.Pipe(model, balance=[12], fetch=["nope"])
    pipe.close()


class DictIn(nn.Module):
    def forward(self, batch: dict) -> dict:
        return {"h": batch["x"] * 2, "mask": None, "tag": "t", "aux": (batch["x"].sum(-1),)}


class DictOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(D, D).double()

    def forward(self, state: dict) -> torch.Tensor:
        assert state["mask"] is None and state["tag"] == "t"
        return self.fc(state["h"]) + state["aux"][0].unsqueeze(-1)


def test_pytree_boundaries_and_dict_input() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(DictIn(), DictOut())
    x, y = data()
    plain_loss = loss_fn(model({"x": x}), y)
    plain_loss.backward()
    ref = grads(model)
    model.zero_grad()
    pipe = gpipe.Pipe(model, balance=[1, 1], chunks=4)
    loss = pipe.step({"x": x}, y, loss_fn)
    assert loss.item() == pytest.approx(plain_loss.item(), abs=1e-12)
    assert max_diff(grads(model), ref) <= 1e-12
    pipe.close()


# ------------------------------------------------------------------ ports of the seed's tests


def _conv_model() -> nn.Sequential:
    layers = []
    for _ in range(16):
        conv = nn.Conv2d(1, 1, 3, padding=1)
        nn.init.constant_(conv.weight, 0.1)
        nn.init.constant_(conv.bias, 0.1)
        layers += [conv]
    return nn.Sequential(*[nn.Sequential(c, nn.ReLU()) for c in layers])


@pytest.mark.parametrize(
    "balance",
    [
        *(pytest.param(b, marks=pytest.mark.slow) for b in (None, [16], [8, 8])),
        [4, 4, 4, 4],
        "auto4",
    ],
)
def test_seed_conv_gradient_norm_is_partition_independent(balance: object) -> None:
    x = torch.arange(16 * 64, dtype=torch.float32).reshape(16, 1, 8, 8) / 1000.0
    plain = _conv_model()
    plain(x).sum().backward()
    want = torch.sqrt(sum((p.grad**2).sum() for p in plain.parameters()))
    model = _conv_model()
    kw = {"stages": 4} if balance == "auto4" else {"balance": balance}
    pipe = gpipe.Pipe(model, chunks=8, **kw)
    pipe(x).sum().backward()
    got = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters()))
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    pipe.close()


def test_seed_micro_batch_size_mismatch() -> None:
    pipe = gpipe.Pipe(_conv_model(), balance=[8, 8], chunks=8, micro_batch_size=1)
    with pytest.raises(ValueError, match=r"1 \* 8 != batch size: .*16|1 \* 8 != 16"):
        pipe(torch.zeros(16, 1, 8, 8))
    pipe.close()


class Scale(nn.Module):
    """y = dropout(w * x), with w a scalar weight."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones((), dtype=torch.float64))
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.w * x)


@pytest.mark.parametrize(("k", "m"), [(1, 1), (2, 4), (4, 8), (4, 2)])
def test_seed_dropout_recompute_is_exact(k: int, m: int) -> None:
    """With w = 1 and x = 1, d(sum y)/dw of one layer equals sum y: any mask mismatch between
    forward and recompute breaks the identity. Four such layers stacked, any K and M."""
    model = nn.Sequential(*[Scale() for _ in range(4)])
    pipe = gpipe.Pipe(model, balance=balance_costs([1.0] * 4, k), chunks=m, remat="always")
    x = torch.ones(8, 32, dtype=torch.float64)
    y = pipe(x)
    y.sum().backward()
    # d(sum y)/dw_i = sum y for every i when all w = 1 (y is multilinear in the w's)
    for p in model.parameters():
        assert p.grad.item() == pytest.approx(y.sum().item(), rel=1e-12)
    pipe.close()


# ------------------------------------------------------------------ failures


# Raising stages in forward and backward, every stage and schedule, and stalls: see
# tests/local/test_reliability.py.


def test_loss_must_be_scalar() -> None:
    pipe = gpipe.Pipe(make_model(), balance=[6, 6], chunks=2)
    x, y = data()
    with pytest.raises(gpipe.StageError, match="loss_fn must return a scalar"):
        pipe.step(x, y, lambda out, t: (out - t) ** 2)
    pipe.close()


def test_backward_path_needs_separable_schedule() -> None:
    pipe = gpipe.Pipe(make_model(), balance=[6, 6], chunks=4, schedule="1f1b")
    x, _ = data()
    with pytest.raises(RuntimeError, match=r"use loss = pipe.step"):
        pipe(x)
    with torch.no_grad():
        assert pipe(x).shape == x.shape  # forward-only works with any schedule
    pipe.close()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"balance": [6, 5]}, "sums to 11"),
        ({"balance": [12, 0]}, "at least one layer"),
        ({"stages": 13}, "cannot cut 12 layers into 13"),
        ({"balance": [6, 6], "devices": ["cpu"]}, "got 1 devices for 2 stages"),
        ({"schedule": "pipedream"}, "unknown schedule"),
        ({"remat": "sometimes"}, "unknown remat mode"),
        ({"chunks": 0}, "chunks must be >= 1"),
        ({"schedule": "interleaved", "stages": 2, "balance": [6, 6]}, "4 stages"),
        ({"schedule": "gpipe", "virtual_stages": 2}, "needs schedule='interleaved'"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gpipe.Pipe(make_model(), **kwargs)


def test_custom_schedule_runs_and_is_validated() -> None:
    sched = gpipe.schedules.custom(
        [["F0@s0", "F1@s0", "B0@s0", "B1@s0"], ["F0@s1", "B0@s1", "F1@s1", "B1@s1"]], 2
    )
    model = make_model()
    pipe = gpipe.Pipe(model, balance=[6, 6], chunks=2, schedule=sched)
    x, y = data()
    loss = pipe.step(x, y, loss_fn)
    ref_loss, ref_grads = reference(0.0, 2)
    assert abs(loss.item() - ref_loss.item()) <= 1e-12
    assert max_diff(grads(model), ref_grads) <= 1e-10
    pipe.close()
    other = gpipe.Pipe(make_model(), balance=[6, 6], chunks=4, schedule=sched)
    with pytest.raises(ValueError, match="built for 2 micro-batches"):
        other.step(x, y, loss_fn)
    other.close()


def test_workers_stop_on_close() -> None:
    pipe = gpipe.Pipe(make_model(), balance=[6, 6], chunks=2)
    assert pipe._runner.pool is not None and pipe._runner.pool.alive
    pipe.close()
    assert not pipe._runner.pool.alive
    with pytest.raises(RuntimeError, match="closed"):
        pipe(data()[0])


def test_a_pipe_closes_as_a_context_like_the_distributed_one() -> None:
    with gpipe.Pipe(make_model(), balance=[6, 6], chunks=2) as pipe:
        pipe(data()[0])
        assert pipe._runner.pool.alive
    assert not pipe._runner.pool.alive


@pytest.mark.parametrize(("schedule", "v"), SCHEDULES)
@pytest.mark.parametrize(("k", "m"), [(2, 8), (3, 4), (4, 8)])
@pytest.mark.parametrize("remat", ["always", "never"])
def test_measured_peak_live_microbatches_equal_simulated(
    schedule: str, v: int, k: int, m: int, remat: str
) -> None:
    from gpipe.planner.simulate import simulate

    model = make_model()
    pipe = gpipe.Pipe(
        model,
        balance=balance_costs([1.0] * N_LAYERS, k * v),
        chunks=m,
        schedule=schedule,
        virtual_stages=v if schedule == "interleaved" else None,
        remat=remat,
    )
    x, y = data()
    pipe.step(x, y, loss_fn)
    sim = simulate(pipe._schedule(m))
    assert pipe.peak_live == list(sim.peak_activations)
    if schedule == "gpipe":
        assert pipe.peak_live == [m] * k
    if schedule == "1f1b":
        assert all(pipe.peak_live[s] <= k - s for s in range(k))
    pipe.close()
