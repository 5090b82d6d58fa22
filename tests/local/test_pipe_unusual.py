"""Legal but unusual uses of ``gpipe.Pipe``: each gives plain PyTorch's result or a clear error.

Every case here gave a silent wrong result (or a raw ``KeyError``) before it was handled:
two forwards before one backward, a loss that cannot train, inputs that require grad under
``step``, concurrent and re-entrant calls, a module that appears twice, layers that change the
batch size, ``torch.autograd.grad`` and double backward through the pipe. The expected values
come from the plain model (float64), never from the pipe itself.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import gpipe

D = 5
BATCH = 8


def make(seed: int = 0, n: int = 4, p: float = 0.0) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for _ in range(n):
        layers += [nn.Linear(D, D), nn.Tanh()]
        if p:
            layers.append(nn.Dropout(p))
    return nn.Sequential(*layers).double()


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(BATCH, D, generator=g, dtype=torch.float64),
        torch.randn(BATCH, D, generator=g, dtype=torch.float64),
    )


def mse(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def grads(model: nn.Module) -> list[torch.Tensor]:
    out = [p.grad.clone() for p in model.parameters()]
    assert len(out) == len(list(model.parameters()))
    return out


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 1e-12) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=tol, rtol=0)


def pipe_of(model: nn.Module, **kw) -> gpipe.Pipe:
    kw.setdefault("balance", [len(model) // 2, len(model) - len(model) // 2])
    kw.setdefault("chunks", 4)
    return gpipe.Pipe(model, **kw)


# ----------------------------------------------------------------- call orders


@pytest.mark.parametrize("remat", ["always", "except_last", "never"])
def test_two_forwards_then_one_backward_differentiates_the_first(remat: str) -> None:
    x, _ = batch()
    model = make()
    pipe = pipe_of(model, remat=remat)
    o1 = pipe(x)
    pipe(2 * x)  # a second forward before the first one's backward
    (o1**2).sum().backward()
    plain = make()
    (plain(x) ** 2).sum().backward()
    assert_same(grads(model), grads(plain))


def test_two_forwards_with_dropout_each_backward_repeats_its_own_masks() -> None:
    # the first forward's backward must recompute with the first forward's random stream,
    # not the second's: compare with a pipe that ran only the first forward
    x, _ = batch()
    alone, interleaved = make(p=0.3), make(p=0.3)
    pa = pipe_of(alone, remat="always")
    (pa(x) ** 2).sum().backward()
    pi = pipe_of(interleaved, remat="always")
    o1 = pi(x)
    pi(x)
    (o1**2).sum().backward()
    assert_same(grads(alone), grads(interleaved))


def test_siamese_loss_over_two_forwards_equals_plain() -> None:
    x, y = batch()
    model = make()
    pipe = pipe_of(model)
    a, b = pipe(x), pipe(y)
    ((a - b) ** 2).mean().backward()
    plain = make()
    ((plain(x) - plain(y)) ** 2).mean().backward()
    assert_same(grads(model), grads(plain))


def test_forward_under_no_grad_between_forward_and_backward() -> None:
    x, _ = batch()
    model = make()
    pipe = pipe_of(model)
    o1 = pipe(x)
    with torch.no_grad():
        pipe(3 * x)
    (o1**2).sum().backward()
    plain = make()
    (plain(x) ** 2).sum().backward()
    assert_same(grads(model), grads(plain))


def test_step_between_forward_and_its_backward() -> None:
    x, y = batch()
    model = make()
    pipe = pipe_of(model)
    o1 = pipe(x)
    pipe.step(y, x, mse)
    (o1**2).sum().backward()
    plain = make()
    mse(plain(y), x).backward()
    (plain(x) ** 2).sum().backward()
    assert_same(grads(model), grads(plain))


# ----------------------------------------------------------------- losses that cannot train


@pytest.mark.parametrize(
    ("bad_loss", "error", "match"),
    [
        (lambda o, t: mse(o, t).detach(), ValueError, "does not require grad"),
        (lambda o, t: torch.tensor(mse(o, t).item()), ValueError, "does not require grad"),
        (lambda o, t: (o > t).sum(), TypeError, "floating-point"),
        (lambda o, t: mse(o, t).item(), ValueError, "scalar tensor"),
    ],
    ids=["detached", "rebuilt-from-item", "integer", "python-float"],
)
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_loss_that_cannot_train_is_refused(bad_loss, error, match, schedule: str) -> None:
    x, y = batch()
    model = make()
    pipe = pipe_of(model, schedule=schedule)
    with pytest.raises(gpipe.StageError, match=match) as info:
        pipe.step(x, y, bad_loss)
    assert isinstance(info.value.__cause__, error)
    assert info.value.microbatch in range(4)
    assert f"micro-batch {info.value.microbatch}" in str(info.value.__cause__)
    assert all(p.grad is None for p in model.parameters())  # refused before any backward


def test_non_callable_loss_fn_named() -> None:
    x, y = batch()
    pipe = pipe_of(make())
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        pipe.step(x, mse, y)  # arguments swapped


def test_targets_with_another_batch_size_refused() -> None:
    x, _ = batch()
    pipe = pipe_of(make())
    y = torch.randn(2 * BATCH, D, dtype=torch.float64)  # divisible by chunks: splits "fine"
    with pytest.raises(ValueError, match="targets have 16 rows .* inputs have 8"):
        pipe.step(x, y, mse)


# ----------------------------------------------------------------- gradients into inputs


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1", "interleaved"])
def test_step_fills_the_grad_of_inputs_that_require_it(schedule: str) -> None:
    x, y = batch()
    model = make()
    balance = [2, 2, 2, 2] if schedule == "interleaved" else [4, 4]
    pipe = gpipe.Pipe(model, balance=balance, chunks=4, schedule=schedule)
    xr = x.clone().requires_grad_(True)
    pipe.step(xr, y, mse)
    plain = make()
    xp = x.clone().requires_grad_(True)
    mse(plain(xp), y).backward()
    assert xr.grad is not None
    torch.testing.assert_close(xr.grad, xp.grad, atol=1e-12, rtol=0)
    assert_same(grads(model), grads(plain))


def test_step_sends_input_gradients_through_a_graph_built_before_the_pipe() -> None:
    x, y = batch()
    torch.manual_seed(5)
    pre = nn.Linear(D, D).double()
    pre_plain = nn.Linear(D, D).double()
    pre_plain.load_state_dict(pre.state_dict())
    model = make()
    pipe = pipe_of(model, schedule="1f1b")
    pipe.step(pre(x), y, mse)  # the pipe's input is not a leaf
    plain = make()
    mse(plain(pre_plain(x)), y).backward()
    torch.testing.assert_close(pre.weight.grad, pre_plain.weight.grad, atol=1e-12, rtol=0)


def test_autograd_grad_for_inputs_leaves_parameter_grads_alone() -> None:
    x, _ = batch()
    model = make()
    pipe = pipe_of(model)
    xr = x.clone().requires_grad_(True)
    (gx,) = torch.autograd.grad((pipe(xr) ** 2).sum(), xr)
    plain = make()
    xp = x.clone().requires_grad_(True)
    (gp,) = torch.autograd.grad((plain(xp) ** 2).sum(), xp)
    torch.testing.assert_close(gx, gp, atol=1e-12, rtol=0)
    assert all(p.grad is None for p in model.parameters())  # as with the plain model


def test_double_backward_refused() -> None:
    x, _ = batch()
    pipe = pipe_of(make())
    xr = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match="create_graph=True"):
        torch.autograd.grad((pipe(xr) ** 2).sum(), xr, create_graph=True)


def test_backward_for_some_parameters_only_refused() -> None:
    x, _ = batch()
    model = make()
    pipe = pipe_of(model)
    with pytest.raises(RuntimeError, match="all of them or none"):
        (pipe(x) ** 2).sum().backward(inputs=[model[0].weight])


# ----------------------------------------------------------------- threads and re-entrance


def test_concurrent_steps_from_two_threads_run_one_after_the_other() -> None:
    x, y = batch()
    model = make()
    pipe = pipe_of(model, schedule="1f1b")
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(4):
                pipe.step(x, y, mse)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    plain = make()
    for _ in range(8):
        mse(plain(x), y).backward()
    assert_same(grads(model), grads(plain), tol=1e-11)


def test_step_from_inside_loss_fn_refused_not_deadlocked() -> None:
    x, y = batch()
    pipe = pipe_of(make(), timeout=30)

    def reentrant(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        pipe.step(x, y, mse)
        return mse(out, t)

    with pytest.raises(gpipe.StageError, match="inside a running step"):
        pipe.step(x, y, reentrant)
    pipe.step(x, y, mse)  # still usable


# ----------------------------------------------------------------- models that surprise


def test_module_used_twice_runs_twice_and_trains_its_one_weight() -> None:
    x, y = batch()
    torch.manual_seed(3)
    shared = nn.Linear(D, D).double()
    model = nn.Sequential(shared, nn.Tanh(), shared)
    pipe = gpipe.Pipe(model, balance=[2, 1], chunks=4, schedule="1f1b")
    assert len(pipe) == 3
    pipe.step(x, y, mse)
    got = shared.weight.grad.clone()
    shared.weight.grad = None
    shared.bias.grad = None
    mse(shared(torch.tanh(shared(x))), y).backward()
    torch.testing.assert_close(got, shared.weight.grad, atol=1e-12, rtol=0)


def test_module_used_twice_forward_equals_model() -> None:
    x, _ = batch()
    torch.manual_seed(3)
    shared = nn.Linear(D, D).double()
    model = nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh())
    pipe = gpipe.Pipe(model, chunks=2, stages=2)
    with torch.no_grad():
        torch.testing.assert_close(pipe(x), model(x), atol=1e-12, rtol=0)


def test_shared_parameter_across_devices_refused() -> None:
    shared = nn.Linear(D, D)
    model = nn.Sequential(shared, nn.Tanh(), shared)
    with pytest.raises(ValueError, match="share a parameter .* on cpu and meta"):
        gpipe.Pipe(model, balance=[2, 1], devices=["cpu", "meta"])
    assert shared.weight.device.type == "cpu"  # refused before anything moved


class TakeFirstRow(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1]


class MeanOverBatch(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(0)


@pytest.mark.parametrize("layer", [TakeFirstRow(), MeanOverBatch()], ids=["rows", "no-batch-dim"])
def test_layer_that_changes_the_batch_size_refused(layer: nn.Module) -> None:
    x, _ = batch()
    model = nn.Sequential(nn.Linear(D, D), nn.Tanh(), layer).double()
    pipe = gpipe.Pipe(model, balance=[2, 1], chunks=4)
    with pytest.raises(ValueError, match="changed the batch size"), torch.no_grad():
        pipe(x)
    with pytest.raises(ValueError, match="micro-batch 0, whose input has 2"):
        pipe.step(x, None, lambda o, t: o.sum())


# ----------------------------------------------------------------- construction arguments


def _layers(n: int = 4) -> nn.Sequential:
    return nn.Sequential(*[nn.Linear(D, D) for _ in range(n)])


BAD_CONSTRUCTION = [
    ({"stages": 2.0}, TypeError, "stages must be an int >= 1, got float 2.0"),
    ({"stages": True}, TypeError, "stages must be an int >= 1, got bool True"),
    ({"chunks": 2.5}, TypeError, "chunks must be an int >= 1, got float 2.5"),
    ({"chunks": True}, TypeError, "chunks must be an int >= 1, got bool"),
    ({"chunks": "4"}, TypeError, "chunks must be an int >= 1, got str '4'"),
    ({"micro_batch_size": 0}, ValueError, "micro_batch_size must be >= 1, got 0"),
    ({"balance": [1.5, 2.5]}, TypeError, r"balance\[0\] must be an int >= 0, got float 1.5"),
    ({"balance": 4}, TypeError, "balance must be a list of layer counts"),
    ({"balance": [2, "2"]}, TypeError, r"balance\[1\] must be an int >= 0, got str '2'"),
    ({"balance": [4, 0]}, ValueError, r"at least one layer; balance=\[4, 0\] gives stage 1"),
    ({"balance": [5, -1]}, ValueError, r"balance\[1\] must be >= 0, got -1"),
    ({"seed": "a"}, TypeError, "seed must be an int, got str 'a'"),
    ({"seed": 1.5}, TypeError, "seed must be an int, got float 1.5"),
    ({"stages": 2, "pinned": -1}, ValueError, "pinned must be >= 0, got -1"),
    ({"stages": 2, "pinned": 9}, ValueError, "pinned=9 but the model has 4 layers"),
    ({"stages": 2, "pinned": 4}, ValueError, "pinned=4 leaves 0 layers for the other 1 stages"),
    ({"timeout": 0}, ValueError, "timeout must be a finite number of seconds > 0, got 0"),
    ({"timeout": float("nan")}, ValueError, "timeout must be a finite .* got nan"),
    ({"timeout": -1}, ValueError, "timeout must be a finite .* got -1"),
    ({"threads_per_stage": 0}, ValueError, "threads_per_stage must be >= 1, got 0"),
    ({"fetch": "0"}, TypeError, r"fetch must be a list of names, got the string '0'; use \['0'\]"),
    ({"batch_dim": True}, TypeError, "batch_dim must be an int, got bool True"),
    ({"devices": ["gpu0"]}, ValueError, "devices holds 'gpu0', which is not a device"),
    ({"devices": ["cuda:7"]}, ValueError, "devices holds 'cuda:7', but this machine has"),
    ({"remat": None}, ValueError, "unknown remat mode None"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_CONSTRUCTION, ids=str)
def test_bad_construction_argument_named(kwargs: dict, error: type, match: str) -> None:
    if "cuda" in str(kwargs) and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that many GPUs")
    with pytest.raises(error, match=match):
        gpipe.Pipe(_layers(), **kwargs)


def test_a_function_among_the_layers_named() -> None:
    with pytest.raises(TypeError, match="layer 1 is builtin_function_or_method .* nn.ReLU"):
        gpipe.Pipe([nn.Linear(D, D), torch.relu])


def test_a_worker_that_cannot_start_never_hangs_the_step() -> None:
    # threads_per_stage=0 used to kill the worker threads at start-up; the step then waited
    # for them for 2 x timeout + 60 s. Refused at construction now.
    with pytest.raises(ValueError, match="threads_per_stage"):
        gpipe.Pipe(_layers(), stages=2, threads_per_stage=0)


# ----------------------------------------------------------------- deferred BatchNorm


def _bn_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D), nn.Tanh(), nn.Linear(D, D)).double()


@pytest.mark.parametrize(
    ("kwargs", "rows"),
    [({"micro_batch_size": 2}, [8, 4, 6]), ({"chunks": 4}, [8, 8, 8]), ({"chunks": 2}, [8, 4, 6])],
    ids=["micro-batch-size-with-changing-batches", "chunks", "chunks-with-changing-batches"],
)
def test_deferred_batch_norm_statistics_follow_the_real_micro_batch_count(
    kwargs: dict, rows: list[int]
) -> None:
    # with micro_batch_size=2 a batch of 8, then 4, then 6 rows is 4, 2, 3 micro-batches: the
    # running statistics must still move once per mini-batch, over the whole mini-batch
    g = torch.Generator().manual_seed(2)
    model, plain = _bn_model(), _bn_model()
    pipe = gpipe.Pipe(model, balance=[2, 2], deferred_batch_norm=True, **kwargs)
    assert isinstance(model[1], gpipe.nn.DeferredBatchNorm)  # the user's model holds it too
    for n in rows:
        x = torch.randn(n, D, dtype=torch.float64, generator=g)
        pipe.step(x, None, lambda o, t: o.pow(2).mean())
        plain(x)  # plain BatchNorm on the whole batch, once per step
    torch.testing.assert_close(model[1].running_mean, plain[1].running_mean, atol=1e-12, rtol=0)
    torch.testing.assert_close(model[1].running_var, plain[1].running_var, atol=1e-12, rtol=0)


class CountRows(nn.Module):
    """Returns the hidden state and how many rows it saw: per micro-batch, not per batch."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return x, int((x.sum(1) > 0).sum())


def test_non_tensor_output_that_differs_between_micro_batches_refused() -> None:
    x = torch.tensor([[1.0] * D] * 2 + [[-1.0] * D] * 6, dtype=torch.float64)
    pipe = gpipe.Pipe(nn.Sequential(nn.Identity(), CountRows()), balance=[1, 1], chunks=4)
    with (
        pytest.raises(ValueError, match=r"output\[1\] is 0 for micro-batch 1 but 2 for"),
        torch.no_grad(),
    ):
        pipe(x)


def test_non_tensor_output_equal_in_every_micro_batch_passes_through() -> None:
    x, _ = batch()
    pipe = gpipe.Pipe(nn.Sequential(nn.Identity(), CountRows()), balance=[1, 1], chunks=8)
    x = x.abs()
    with torch.no_grad():
        out, n = pipe(x)
    assert n == 1 and torch.equal(out, x)
