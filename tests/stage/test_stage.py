"""Value checks for ``gpipe.stage.stage`` by itself: one :class:`Stage` driven by hand — what it keeps
per micro-batch under each remat mode, that recompute and split backward give the plain
gradients, which inputs get ``requires_grad``, the random-stream key (``rng_offset``), fetched
activations, and the wording of each error. They kill the stage mutants the pipe tests let
live (docs/mutation.md)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gpipe.stage import rng
from gpipe.stage.stage import Stage


def _raises(exc: type[Exception], call, *args, **kwargs) -> str:
    with pytest.raises(exc) as info:
        call(*args, **kwargs)
    return str(info.value)


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))


def _stage(model: nn.Module, **kw) -> Stage:
    kw.setdefault("is_first", True)
    kw.setdefault("is_last", True)
    return Stage(0, list(enumerate(model)), torch.device("cpu"), **kw)


def _reference_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float = 1.0):
    model.zero_grad()
    (_mse(model(x), y) * scale).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


X = torch.linspace(-1, 1, 6).reshape(2, 3)
Y = torch.tensor([[0.5, -0.5], [1.0, 0.0]])


@pytest.mark.parametrize("remat", ["never", "always", "except_last"])
@pytest.mark.parametrize("split", [False, True])
def test_loss_stage_gradients_equal_plain_autograd(remat: str, split: bool) -> None:
    model = _model()
    want = _reference_grads(model, X, Y, scale=0.5)
    st = _stage(model, remat=remat)
    st.begin_step(0, 2, True, loss_fn=_mse, loss_scale=0.5)
    res = st.forward(0, (X,), Y)
    assert res.loss is not None and res.loss.shape == ()
    assert torch.allclose(res.loss, _mse(model(X), Y) * 0.5)
    assert st.pending == [0]
    saved = st.state.saved[0]
    assert saved.remat is (remat != "never")  # micro-batch 0 of 2 is not the last
    assert (saved.outputs is None) is saved.remat
    gin = st.backward(0, None, split=split)
    assert gin == (None,)  # the user's input does not require grad
    if split:
        assert all(p.grad is None for p in model.parameters())
        assert st.pending == [0]
        st.backward_weight(0)
    assert st.pending == []
    for p, g in zip(model.parameters(), want, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_middle_stage_returns_the_input_gradient() -> None:
    model = _model()
    st = Stage(1, list(enumerate(model)), torch.device("cpu"), is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    x = X.clone()  # from another stage: no requires_grad, yet differentiated
    out = st.forward(0, x).value
    assert out.requires_grad
    g = torch.ones(2, 2)
    gin = st.backward(0, g)
    xr = X.clone().requires_grad_(True)
    model.zero_grad()
    model(xr).backward(g)
    assert torch.allclose(gin, xr.grad)


def test_split_backward_of_a_middle_stage() -> None:
    model = _model()
    want = _reference_grads(model, X, Y)
    st = Stage(1, list(enumerate(model)), torch.device("cpu"), is_first=False, is_last=True)
    st.begin_step(0, 1, True, loss_fn=_mse)
    st.forward(0, X.clone(), Y)
    gin = st.backward(0, None, split=True)
    xr = X.clone().requires_grad_(True)
    _mse(model(xr), Y).backward()
    model.zero_grad()
    assert torch.allclose(gin, xr.grad)
    st.backward_weight(0)
    for p, g in zip(model.parameters(), want, strict=True):
        assert torch.allclose(p.grad, g, atol=1e-6)


def test_first_stage_keeps_the_users_requires_grad_and_ints() -> None:
    class Pair(nn.Module):
        def forward(self, a: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return a * 2 + idx

    st = Stage(0, [(0, Pair())], torch.device("cpu"), is_first=True, is_last=False)
    st.begin_step(0, 1, True)
    a = torch.ones(2, requires_grad=True)
    idx = torch.tensor([1, 2])
    st.forward(0, (a, idx))
    inputs = st.state.saved[0].inputs
    assert inputs[0].requires_grad and not inputs[1].requires_grad
    assert inputs[0] is not a  # detached copies
    ga, gi = st.backward(0, torch.ones(2))
    assert torch.equal(ga, torch.full((2,), 2.0)) and gi is None
    st.begin_step(1, 1, True)
    st.forward(0, (torch.ones(2), idx))
    assert not st.state.saved[0].inputs[0].requires_grad


def test_no_grad_step_keeps_nothing() -> None:
    model = _model()
    st = _stage(model)
    st.begin_step(0, 1, False, loss_fn=_mse)
    res = st.forward(0, (X,), Y)
    assert not res.value.requires_grad and not res.loss.requires_grad
    assert st.pending == []


def test_random_stream_key_uses_rng_offset() -> None:
    def mask(offset: int, microbatch: int) -> torch.Tensor:
        st = Stage(0, [(5, nn.Dropout(0.5))], torch.device("cpu"), is_first=False, is_last=False)
        st.rng_offset = offset
        st.seed = 3
        st.begin_step(7, 4, False)
        return st.forward(microbatch, torch.ones(64)).value

    with rng.keyed(3, 7, 2, 5):
        want = nn.functional.dropout(torch.ones(64), 0.5, True)
    assert torch.equal(mask(0, 2), want)
    assert torch.equal(mask(2, 0), want)
    assert not torch.equal(mask(0, 0), want)


def test_fetch_collects_detached_outputs_not_recomputes() -> None:
    model = _model()
    st = _stage(model, remat="always", fetch={"hidden": model[1]})
    st.begin_step(0, 1, True, loss_fn=_mse)
    res = st.forward(0, (X,), Y)
    h = res.fetched["hidden"]
    assert torch.allclose(h, torch.tanh(model[0](X))) and not h.requires_grad
    st.backward(0, None)  # the recompute runs the hook again, without collecting
    assert st._sink is None
    st.close()
    st.begin_step(1, 1, True, loss_fn=_mse)
    assert st.forward(0, (X,), Y).fetched == {}  # close() removed the hook


def test_parameters_are_distinct() -> None:
    shared = nn.Linear(2, 2)
    st = Stage(0, [(0, shared), (1, nn.ReLU()), (2, shared)], "cpu", is_first=True, is_last=True)
    assert [id(p) for p in st.parameters()] == [id(p) for p in shared.parameters()]
    assert st.remat == "except_last" and st.seed == 0 and st.rng_offset == 0
    assert st.index == 0 and st.device == torch.device("cpu")


def test_stage_error_wording() -> None:
    assert _raises(ValueError, Stage, 3, [], "cpu", is_first=True, is_last=True) == (
        "stage 3 has no layers"
    )
    st = _stage(_model())
    st.begin_step(0, 2, True, loss_fn=_mse)
    st.forward(0, (X,), Y)
    assert _raises(RuntimeError, st.forward, 0, (X,), Y) == (
        "stage 0: micro-batch 0 ran forward twice"
    )
    assert _raises(RuntimeError, st.backward, 1, None) == (
        "stage 0: backward of micro-batch 1 without its forward"
    )
    assert _raises(RuntimeError, st.backward_weight, 0) == (
        "stage 0: weight-gradient of micro-batch 0 before its input-gradient"
    )


def _loss_error(loss_fn, target=Y, check_finite: bool = False):
    st = _stage(_model())
    st.check_finite = check_finite
    st.begin_step(0, 1, True, loss_fn=loss_fn)
    return lambda: st.forward(0, (X,), target)


def test_loss_error_wording() -> None:
    msg = _raises(ValueError, _loss_error(_mse, target=None))
    assert msg.startswith("loss_fn failed on micro-batch 0 with targets=None (TypeError: ")
    assert msg.endswith(
        "); pass the targets to step(inputs, targets, loss_fn) — with DistributedPipe, "
        "on the rank of the last stage too"
    )
    assert _raises(ValueError, _loss_error(lambda o, t: o - t)) == (
        "loss_fn must return a scalar tensor, got (2, 2) for micro-batch 0; "
        "reduce it (e.g. .mean()) inside loss_fn"
    )
    assert _raises(ValueError, _loss_error(lambda o, t: 1.0)).startswith(
        "loss_fn must return a scalar tensor, got float for micro-batch 0;"
    )
    assert _raises(
        FloatingPointError, _loss_error(lambda o, t: o.sum() * float("nan"), check_finite=True)
    ) == (
        "loss of micro-batch 0 is nan (check_finite=True); look for a diverging learning rate "
        "or bad inputs in this micro-batch"
    )
    _loss_error(lambda o, t: o.sum() * float("nan"))()  # not checked unless asked
    assert _raises(TypeError, _loss_error(lambda o, t: torch.tensor(3))) == (
        "loss_fn returned a torch.int64 tensor for micro-batch 0; a loss must be a "
        "floating-point scalar (convert the inputs of the loss, not the loss)"
    )
    assert _raises(ValueError, _loss_error(lambda o, t: o.sum().detach())) == (
        "loss_fn returned a loss that does not require grad for micro-batch 0 (detached, "
        "computed under no_grad, or from .item()), so nothing would train; return the "
        "differentiable loss tensor from loss_fn"
    )


def test_gradient_of_the_wrong_shape_is_named() -> None:
    st = Stage(0, [(0, nn.Linear(2, 2))], "cpu", is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    st.forward(0, torch.ones(1, 2))
    assert _raises(RuntimeError, st.backward, 0, [torch.ones(1, 2), torch.ones(1, 2)]) == (
        "stage 0: micro-batch 0 output has 1 leaves but its gradient has 2"
    )


def test_weight_gradient_of_an_unknown_microbatch_is_named() -> None:
    st = _stage(_model())
    st.begin_step(0, 1, True, loss_fn=_mse)
    assert _raises(RuntimeError, st.backward_weight, 4) == (
        "stage 0: weight-gradient of micro-batch 4 before its input-gradient"
    )


def test_split_backward_with_no_output_gradient() -> None:
    model = _model()
    st = Stage(1, list(enumerate(model)), torch.device("cpu"), is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    st.forward(0, X.clone())
    assert st.backward(0, None, split=True) is None  # no output got a gradient
    st.backward_weight(0)
    assert all(p.grad is None for p in model.parameters())
    assert st.pending == []


def test_targets_move_to_the_stage_device_with_their_other_leaves() -> None:
    seen = {}

    def loss_fn(out, target):
        seen["device"] = target["y"].device
        seen["w"] = target["w"]
        return ((out - target["y"]) ** 2).mean() * target["w"]

    layer = nn.Linear(3, 2, device="meta")
    st = Stage(0, [(0, layer)], torch.device("meta"), is_first=True, is_last=True, remat="never")
    st.begin_step(0, 1, True, loss_fn=loss_fn)
    res = st.forward(0, (X,), {"y": Y, "w": 2.0})
    assert seen == {"device": torch.device("meta"), "w": 2.0}
    assert res.loss.device.type == "meta"


def test_backward_is_whole_by_default() -> None:
    model = _model()
    st = Stage(1, list(enumerate(model)), torch.device("cpu"), is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    st.forward(0, X.clone())
    st.backward(0, torch.ones(2, 2))
    assert st.pending == []
    assert all(p.grad is not None for p in model.parameters())


def test_outputs_without_gradient_leave_nothing_to_do() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor):
            return self.lin(x), x.sum(dim=1)

    st = Stage(1, [(0, Two())], torch.device("cpu"), is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    st.forward(0, X.clone())
    gin = st.backward(0, None)
    assert gin is None
    assert st.pending == []


def test_finite_loss_passes_the_check_and_close_resets() -> None:
    st = _stage(_model())
    st.check_finite = True
    st.begin_step(0, 1, True, loss_fn=_mse)
    assert torch.isfinite(st.forward(0, (X,), Y).loss)
    st.close()
    assert st.pending == []


class Noisy(nn.Module):
    """Draws random numbers outside any known random module."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


@pytest.mark.parametrize(
    "layer", [Noisy, lambda: nn.Dropout(0.5), lambda: nn.Sequential(nn.Dropout(0.5), Noisy())]
)
def test_every_run_of_a_random_layer_draws_the_keyed_stream(layer) -> None:
    st = Stage(0, [(4, layer())], torch.device("cpu"), is_first=False, is_last=False, seed=9)
    st.layers[0][1].train()
    outs = []
    for _ in range(3):  # the first run learns how the layer draws; the later ones use that
        st.begin_step(1, 1, False)
        outs.append(st.forward(0, torch.ones(16)).value)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[1], outs[2])
    with rng.keyed(9, 1, 0, 4):
        want = st.layers[0][1](torch.ones(16))
    assert torch.equal(outs[0], want)


def test_middle_stage_takes_integer_boundary_tensors() -> None:
    class Embed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(5, 2)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.table(idx)

    st = Stage(1, [(0, Embed())], torch.device("cpu"), is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    out = st.forward(0, torch.tensor([1, 3])).value
    assert out.shape == (2, 2)
    assert st.backward(0, torch.ones(2, 2)) is None  # no gradient for indices


def test_no_grad_forward_names_the_microbatch_and_returns_fetched() -> None:
    model = _model()
    st = _stage(model, fetch={"hidden": model[1]})
    st.begin_step(0, 3, False, loss_fn=lambda o, t: o)
    msg = _raises(ValueError, st.forward, 2, (X,), Y)
    assert msg.startswith("loss_fn must return a scalar tensor, got (2, 2) for micro-batch 2;")
    st.begin_step(0, 1, False)
    res = st.forward(0, (X,))
    assert list(res.fetched) == ["hidden"]


def test_gradients_from_another_device_are_moved() -> None:
    layer = nn.Linear(3, 2, device="meta")
    st = Stage(1, [(0, layer)], torch.device("meta"), is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    st.forward(0, X)  # a CPU activation arrives on the meta stage
    gin = st.backward(0, torch.ones(2, 2))  # and a CPU gradient
    assert gin.device.type == "meta" and gin.shape == (2, 3)


def test_split_backward_with_an_unused_input() -> None:
    class First(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, pair):
            return self.lin(pair[0])

    st = Stage(1, [(0, First())], torch.device("cpu"), is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    st.forward(0, (X.clone(), torch.ones(2, 3)))
    gx, gy = st.backward(0, torch.ones(2, 2), split=True)
    assert gx.shape == (2, 3) and gy is None
    st.backward_weight(0)


def test_a_new_stage_holds_nothing_and_checks_nothing() -> None:
    model = _model()
    st = _stage(model, fetch={"hidden": model[1]})
    assert st.pending == [] and st.check_finite is False
    model(X)  # the model run outside the stage: the fetch hook collects nothing, fails nothing
    st.begin_step(0, 1, True, loss_fn=lambda o, t: o.sum() * float("nan"))
    assert torch.isnan(st.forward(0, (X,), Y).loss)


def test_split_backward_of_a_stage_without_parameters() -> None:
    st = Stage(1, [(0, nn.ReLU())], torch.device("cpu"), is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    st.forward(0, X.clone())
    gin = st.backward(0, torch.ones(2, 3), split=True)
    assert torch.equal(gin, (X > 0).float())
    st.backward_weight(0)  # nothing to do, and no error
    assert st.pending == []
