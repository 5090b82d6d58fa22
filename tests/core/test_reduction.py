"""A loss that averages over the targets it does not ignore (padded sequences) gives the plain
model's loss and gradients on the whole mini-batch when the items are unevenly spread over
micro-batches: ``reduction=gpipe.count_items()`` weights each micro-batch by its share of the
items (:mod:`gpipe.core.reduction`), for every schedule and re-materialization mode; ``"mean"``
(each micro-batch's mean, averaged) warns about exactly this case.

The reference here is the plain model itself (``loss_fn(model(x), y).backward()``, float64,
no random layers), so it shares no code with the pipeline.
"""

from __future__ import annotations

import itertools
import warnings
from contextlib import closing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpipe
from gpipe.schedules.named import resolve_virtual

VOCAB, D, BATCH, SEQ = 11, 8, 12, 5
REMATS = ["always", "except_last", "never"]
CASES = list(itertools.product(gpipe.schedules.available(), REMATS, [(2, 4), (3, 6)]))


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Embedding(VOCAB, D)]
    for _ in range(6):
        layers.append(nn.Sequential(nn.Linear(D, D), nn.Tanh()))
    layers.append(nn.Linear(D, VOCAB))
    return nn.Sequential(*layers).double()


def token_loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over the tokens not ignored (-100)."""
    return F.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1))


def padded_batch(first_empty: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and targets whose rows are padded (-100) to different lengths; with
    ``first_empty`` the first two rows are padding only."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    y = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    for row in range(BATCH):
        y[row, (row * 7) % SEQ + 1 :] = -100
    if first_empty:
        y[:2] = -100
    return x, y


def plain(x: torch.Tensor, y: torch.Tensor, loss_fn=token_loss) -> tuple[float, list]:
    """The plain model's loss and gradients on the whole batch."""
    model = make_model()
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((u - v).abs().max().item() for u, v in zip(a, b, strict=True))


def pipe_of(model: nn.Module, schedule: str, remat: str, k: int, m: int) -> gpipe.Pipe:
    stages = k * resolve_virtual(schedule, None)
    return gpipe.Pipe(
        model,
        balance=gpipe.balance([1.0] * len(model), stages),
        chunks=m,
        schedule=schedule,
        remat=remat,
    )


@pytest.mark.parametrize(("schedule", "remat", "km"), CASES)
def test_item_mean_equals_the_plain_model(schedule: str, remat: str, km: tuple) -> None:
    k, m = km
    x, y = padded_batch()
    ref_loss, ref_grads = plain(x, y)
    model = make_model()
    with pipe_of(model, schedule, remat, k, m) as pipe:  # a Pipe closes as a context
        loss = pipe.step(x, y, token_loss, reduction=gpipe.count_items())
    assert abs(loss.item() - ref_loss) <= 1e-12
    assert max_diff([p.grad for p in model.parameters()], ref_grads) <= 1e-10


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-v"])
def test_a_microbatch_without_items_adds_nothing(schedule: str) -> None:
    """Its loss function would be a mean over nothing (NaN); it is not called, and the
    micro-batch's gradient is zero, as in the plain model."""
    x, y = padded_batch(first_empty=True)
    ref_loss, ref_grads = plain(x, y)
    model = make_model()
    calls = []

    def counted(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(int((target != -100).sum()))
        return token_loss(out, target)

    with closing(pipe_of(model, schedule, "except_last", 2, 6)) as pipe:
        loss = pipe.step(x, y, counted, reduction=gpipe.count_items())
    assert calls and 0 not in calls, calls  # 5 micro-batches with items
    assert abs(loss.item() - ref_loss) <= 1e-12
    assert max_diff([p.grad for p in model.parameters()], ref_grads) <= 1e-10


def test_mean_over_micro_batches_differs_and_warns() -> None:
    """The case the callable exists for: ``"mean"`` averages the micro-batches' means, which
    is not the plain model's mean over tokens, and says so."""
    x, y = padded_batch()
    ref_loss, _ = plain(x, y)
    pipe = gpipe.Pipe(make_model(), balance=[4, 4], chunks=4)
    with closing(pipe), pytest.warns(UserWarning, match="count_items"):
        loss = pipe.step(x, y, token_loss)
    assert abs(loss.item() - ref_loss) > 1e-6


def test_no_warning_without_ignored_targets_or_with_a_count() -> None:
    x, y = padded_batch()
    full = torch.randint(0, VOCAB, (BATCH, SEQ))
    with (
        closing(gpipe.Pipe(make_model(), balance=[4, 4], chunks=4)) as pipe,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")
        pipe.step(x, full, token_loss)
        pipe.step(x, y, token_loss, reduction=gpipe.count_items())
        even = y.clone()
        even[:] = full
        even[:, -1] = -100  # as many ignored in every micro-batch: the means agree
        pipe.step(x, even, token_loss)


def test_evaluation_returns_the_item_mean() -> None:
    x, y = padded_batch()
    model = make_model()
    with torch.no_grad():
        ref = token_loss(model(x), y).item()
    with closing(pipe_of(model, "1f1b", "except_last", 2, 4)) as pipe, torch.no_grad():
        loss = pipe.step(x, y, token_loss, reduction=gpipe.count_items())
    assert abs(loss.item() - ref) <= 1e-12


def test_reference_step_takes_the_same_count() -> None:
    x, y = padded_batch(first_empty=True)
    ref_loss, ref_grads = plain(x, y)
    model = make_model()
    loss = gpipe.reference_step(model, x, y, token_loss, chunks=6, reduction=gpipe.count_items())
    assert abs(loss.item() - ref_loss) <= 1e-12
    assert max_diff([p.grad for p in model.parameters()], ref_grads) <= 1e-10


def test_own_count_for_a_shifted_loss() -> None:
    """A loss that predicts the next token counts the shifted targets: any callable works."""

    def shifted(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return token_loss(out[:, :-1], target[:, 1:])

    x, y = padded_batch()
    ref_loss, ref_grads = plain(x, y, shifted)
    model = make_model()
    with gpipe.Pipe(model, balance=[4, 4], chunks=3) as pipe:
        loss = pipe.step(x, y, shifted, reduction=lambda t: (t[:, 1:] != -100).sum())
    assert abs(loss.item() - ref_loss) <= 1e-12
    assert max_diff([p.grad for p in model.parameters()], ref_grads) <= 1e-10


@pytest.mark.parametrize(
    ("reduction", "match"),
    [
        ("avg", "reduction must be 'mean', 'sum' or a callable"),
        (lambda t: -1, "number of items"),
        (lambda t: "3", "number of items"),
        (lambda t: torch.ones(2), "number of items"),
        (lambda t: float("nan"), "number of items"),
    ],
)
def test_bad_reductions_are_refused(reduction, match: str) -> None:
    x, y = padded_batch()
    pipe = gpipe.Pipe(make_model(), balance=[4, 4], chunks=2)
    with closing(pipe), pytest.raises(ValueError, match=match):
        pipe.step(x, y, token_loss, reduction=reduction)


def test_a_count_needs_targets() -> None:
    x, _ = padded_batch()
    pipe = gpipe.Pipe(make_model(), balance=[4, 4], chunks=2)
    with closing(pipe), pytest.raises(ValueError, match="micro-batch 0 has none"):
        pipe.step(x, None, lambda o, t: o.mean(), reduction=gpipe.count_items())


def test_count_items_wants_one_tensor() -> None:
    with pytest.raises(ValueError, match="one target tensor"):
        gpipe.count_items()((torch.zeros(2), torch.zeros(2)))
    assert int(gpipe.count_items(ignore_index=0)(torch.tensor([0, 1, 2, 0]))) == 2


def _distributed_items(rank: int, path) -> None:
    from dist_mlp import ignored_batch, mlp_no_dropout

    x, y = ignored_batch()
    out = {}
    for schedule in ["gpipe", "1f1b", "zb-h1", "interleaved", "zb-v"]:
        v = resolve_virtual(schedule, None)
        balance = [5, 5, 5, 4] if v == 2 else [9, 10]
        with gpipe.DistributedPipe(
            mlp_no_dropout(), chunks=4, balance=balance, schedule=schedule
        ) as pipe:  # inputs on the first stage's rank only (rank 0, for zb-v too)
            loss = pipe.step(
                x if rank == 0 else None, y, F.cross_entropy, reduction=gpipe.count_items()
            )
            out[schedule] = (loss.item(), {n: p.grad.clone() for n, p in pipe.named_parameters()})
    torch.save(out, path / f"items{rank}.pt")


@pytest.mark.slow  # spawns a gloo process group
@pytest.mark.timeout(150)
def test_distributed_pipe_weighs_micro_batches_by_items(tmp_path) -> None:
    """Two ranks, one of 4 micro-batches without items: the last rank counts, the first
    learns the step's loss from it; both hold the plain model's gradients."""
    from dist_mlp import ignored_batch, mlp_no_dropout
    from spawn_ranks import run_gloo

    run_gloo(_distributed_items, tmp_path, world=2, limit=120)
    x, y = ignored_batch()
    model = mlp_no_dropout()
    ref = F.cross_entropy(model(x), y)
    ref.backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    for rank in range(2):
        for schedule, (loss, grads) in torch.load(tmp_path / f"items{rank}.pt").items():
            assert abs(loss - ref.item()) <= 1e-12, (rank, schedule)
            assert grads, (rank, schedule)
            assert max_diff(list(grads.values()), [want[n] for n in grads]) <= 1e-10


def test_a_class_weighted_loss_counts_the_weights_of_its_targets() -> None:
    """``F.cross_entropy(weight=w)`` averages over the weights of its targets: the count is
    their sum (and ignored targets weigh nothing)."""
    w = torch.linspace(0.5, 2.0, VOCAB, dtype=torch.float64)

    def weighted(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.reshape(-1, VOCAB), target.reshape(-1), weight=w)

    def weight_of(target: torch.Tensor) -> torch.Tensor:
        kept = target[target != -100]
        return w[kept].sum()

    x, y = padded_batch()
    ref_loss, ref_grads = plain(x, y, weighted)
    model = make_model()
    with gpipe.Pipe(model, balance=[4, 4], chunks=4, schedule="zb-h1") as pipe:
        loss = pipe.step(x, y, weighted, reduction=weight_of)
    assert abs(loss.item() - ref_loss) <= 1e-12
    assert max_diff([p.grad for p in model.parameters()], ref_grads) <= 1e-10


def test_tuning_times_the_steps_with_the_users_reduction() -> None:
    """``Auto(tune=N)`` times its candidates with the step's own ``reduction``: no warning
    about ``"mean"`` from the timed steps, and the trained step still equals the plain model."""
    x, y = padded_batch()
    ref_loss, ref_grads = plain(x, y)
    model = make_model()
    auto = gpipe.Auto(tune=2, tune_steps=1)
    with (
        gpipe.Pipe(model, stages=2, chunks=4, schedule=auto) as pipe,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("error")  # the "mean" warning would fail the test
        loss = pipe.step(x, y, token_loss, reduction=gpipe.count_items())
    assert len(auto.measured) == 2
    assert abs(loss.item() - ref_loss) <= 1e-12
    assert max_diff([p.grad for p in model.parameters()], ref_grads) <= 1e-10
