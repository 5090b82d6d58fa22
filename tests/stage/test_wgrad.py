"""``gpipe.stage.wgrad``: the deferred weight gradient (W) formed from each standard module call's input
and output gradient equals autograd's weight gradient, for every module kind; the reductions
(normalization layers, parameters of at most one dimension) come out of B exactly; what cannot
be split falls back to the graph and is counted; a stage or a pipe mixing all three kinds of
parameters is exact (float64, against plain autograd and tests/reference_impl.py)."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpipe
import reference_impl
from gpipe import schedules
from gpipe.nn import DeferredBatchNorm
from gpipe.stage import wgrad
from gpipe.stage.stage import Stage

DT = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _split_weight_grads(
    module: nn.Module, x: torch.Tensor, g: torch.Tensor, captured: bool = True
) -> None:
    """B then W through :class:`wgrad.WeightGrads` alone; ``.grad`` gets W's result.
    ``captured``: the module's call is captured for W (else B reduces its parameters)."""
    wg = wgrad.WeightGrads(list(module.modules()))
    with wg.capture() as calls:
        y = module(x)
    assert len(calls.calls) == int(captured), "the call was not captured as expected"
    params = list(module.parameters())
    before = [None if p.grad is None else p.grad.clone() for p in params]
    _, kept = wg.input_grads(calls, [y], [g], [], params)
    assert not kept
    for p, b in zip(params, before, strict=True):  # B does not touch the weight gradients
        assert (p.grad is None) if b is None else torch.equal(p.grad, b)
    assert len(calls.direct) == (0 if captured else len(params))  # B's reductions, kept for W
    wg.accumulate(calls)
    wg.close()


def _check_kind(
    module: nn.Module, x: torch.Tensor, *, twice: bool = False, captured: bool = True
) -> None:
    module = module.to(DT)
    ref = copy.deepcopy(module)
    x = x.to(DT) if x.is_floating_point() else x
    y = ref(x)
    g = torch.randn(y.shape, generator=_gen(5), dtype=DT)
    y.backward(g)
    _split_weight_grads(module, x, g, captured)
    if twice:  # accumulation onto an existing .grad
        ref(x).backward(g)
        _split_weight_grads(module, x, g, captured)
    names = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert names
    for (n, p), q in zip(module.named_parameters(), ref.parameters(), strict=True):
        if q.requires_grad:
            assert p.grad is not None, n
            assert (p.grad - q.grad).abs().max().item() <= 1e-10, n
        else:
            assert p.grad is None, n


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=_gen(seed), dtype=DT)


KINDS = {
    "linear": (lambda: nn.Linear(5, 3), _x(4, 5)),
    "linear-3d-input": (lambda: nn.Linear(5, 3), _x(2, 4, 5)),
    "linear-1d-input": (lambda: nn.Linear(5, 3), _x(5)),
    "linear-no-bias": (lambda: nn.Linear(5, 3, bias=False), _x(4, 5)),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, stride=2, padding=1), _x(2, 3, 9)),
    "conv1d-unbatched": (lambda: nn.Conv1d(3, 4, 3), _x(3, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2), _x(2, 4, 7, 7)),
    "conv2d-reflect": (
        lambda: nn.Conv2d(3, 2, 3, padding=1, padding_mode="reflect"),
        _x(2, 3, 6, 6),
    ),
    "conv2d-circular": (
        lambda: nn.Conv2d(3, 2, 3, padding=1, padding_mode="circular"),
        _x(1, 3, 5, 5),
    ),
    "conv2d-same-even-kernel": (lambda: nn.Conv2d(3, 2, (4, 3), padding="same"), _x(2, 3, 6, 6)),
    "conv2d-valid-no-bias": (
        lambda: nn.Conv2d(3, 2, 2, padding="valid", bias=False),
        _x(2, 3, 5, 5),
    ),
    "conv3d": (lambda: nn.Conv3d(2, 3, 2, stride=(1, 2, 1)), _x(2, 2, 4, 5, 3)),
    "embedding": (lambda: nn.Embedding(7, 4), torch.tensor([[1, 3, 3], [0, 6, 1]])),
    "embedding-padding-freq": (
        lambda: nn.Embedding(7, 4, padding_idx=3, scale_grad_by_freq=True),
        torch.tensor([[1, 3, 3], [0, 6, 1]]),
    ),
    "embedding-max-norm": (lambda: nn.Embedding(7, 4, max_norm=0.5), torch.tensor([1, 2, 2, 5])),
}

# normalization layers and other parameters of at most one dimension: reduced by B itself
REDUCED = {
    "layernorm": (lambda: nn.LayerNorm(5), _x(3, 4, 5)),
    "layernorm-2d-shape": (lambda: nn.LayerNorm((4, 5)), _x(3, 4, 5)),
    "layernorm-no-bias": (lambda: nn.LayerNorm(5, bias=False), _x(3, 5)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), _x(3, 4, 5, 2)),
    "batchnorm1d-train": (lambda: nn.BatchNorm1d(4), _x(6, 4)),
    "batchnorm2d-train": (lambda: nn.BatchNorm2d(3), _x(4, 3, 2, 2)),
    "batchnorm2d-eval": (lambda: _eval(nn.BatchNorm2d(3)), _x(4, 3, 2, 2)),
    "batchnorm3d-no-stats": (
        lambda: _eval(nn.BatchNorm3d(2, track_running_stats=False)),
        _x(2, 2, 3, 2, 2),
    ),
    "instancenorm1d-affine": (lambda: nn.InstanceNorm1d(3, affine=True), _x(2, 3, 5)),
    "deferred-batchnorm-train": (lambda: DeferredBatchNorm(3, chunks=2), _x(4, 3, 5)),
    "deferred-batchnorm-eval": (lambda: _eval(DeferredBatchNorm(3)), _x(4, 3, 5)),
    "custom-gate-1d": (lambda: _Gate(5), _x(3, 5)),
}
if hasattr(nn, "RMSNorm"):
    REDUCED["rmsnorm"] = (lambda: nn.RMSNorm(5), _x(3, 4, 5))
    REDUCED["rmsnorm-eps"] = (lambda: nn.RMSNorm((4, 5), eps=1e-3), _x(3, 4, 5))


class _Gate(nn.Module):
    """A custom module with a vector parameter: its gradient is a reduction, formed in B."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.linspace(0.5, 1.5, n))
        self.shift = nn.Parameter(torch.tensor(0.25))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x * self.gate + self.shift)


def _eval(m: nn.Module) -> nn.Module:
    """``m`` in eval mode, with running statistics that are not the defaults."""
    if getattr(m, "running_mean", None) is not None:
        with torch.no_grad():
            m.running_mean.copy_(torch.linspace(-1, 1, m.running_mean.numel()))
            m.running_var.copy_(torch.linspace(0.5, 2, m.running_var.numel()))
    return m.eval()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_weight_gradient_of_each_kind_equals_autograds(kind: str) -> None:
    make, x = KINDS[kind]
    torch.manual_seed(0)
    module = make()
    with torch.no_grad():  # non-trivial affine parameters for the norms
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(3)) * 0.1)
    assert wgrad.splittable(module)
    with warnings.catch_warnings():  # ATen's note that an even 'same' kernel pads a copy
        warnings.filterwarnings("ignore", "Using padding='same' with even kernel")
        _check_kind(module, x, twice=kind in ("linear", "conv2d"))


@pytest.mark.parametrize("kind", sorted(REDUCED))
def test_reductions_come_out_of_b_exactly(kind: str) -> None:
    make, x = REDUCED[kind]
    torch.manual_seed(0)
    module = make()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=_gen(3)) * 0.1)
    assert not wgrad.splittable(module)
    assert wgrad.WeightGrads(list(module.modules())).fallback(module.parameters()) == []
    _check_kind(module, x, twice=kind == "layernorm", captured=False)


def test_frozen_weight_only_the_bias_is_formed() -> None:
    lin = nn.Linear(5, 3)
    lin.weight.requires_grad_(False)
    _check_kind(lin, _x(4, 5))
    assert lin.weight.grad is None and lin.bias.grad is not None


class _Custom(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * 2


class _Keeps(nn.Linear):
    """A subclass that keeps ``nn.Linear.forward``: still splittable."""


class _Scale(nn.Module):
    """A custom module with a matrix parameter: not splittable, not a reduction — falls back."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.eye(n) * torch.linspace(0.5, 1.5, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.scale


def test_what_is_not_splittable() -> None:
    weight_normed = nn.utils.parametrizations.weight_norm(nn.Linear(3, 3))
    assert not wgrad.splittable(weight_normed)
    assert not wgrad.splittable(nn.Embedding(4, 2, sparse=True))
    assert not wgrad.splittable(_Custom(3, 3))
    assert not wgrad.splittable(_Scale(3))
    assert not wgrad.splittable(nn.LayerNorm(3, elementwise_affine=False))  # nothing to split
    assert not wgrad.splittable(nn.LayerNorm(3))  # B reduces it
    assert not wgrad.splittable(nn.MultiheadAttention(4, 2))
    assert not wgrad.splittable(nn.ConvTranspose2d(2, 2, 3))
    assert wgrad.splittable(_Keeps(3, 3))
    wg = wgrad.WeightGrads([_Keeps(3, 3), _Scale(3), nn.ReLU()])
    assert [type(m) for m in wg.modules] == [_Keeps]


def test_outside_a_capture_the_hooks_do_nothing() -> None:
    lin = nn.Linear(3, 2).to(DT)
    wg = wgrad.WeightGrads([lin])
    with wg.capture():
        pass
    assert len(lin._forward_pre_hooks) == len(lin._forward_hooks) == 1  # by the first capture
    lin(_x(4, 3)).sum().backward()  # an ordinary call: autograd's own gradient
    assert lin.weight.grad is not None
    assert isinstance(lin._parameters["weight"], nn.Parameter)
    wg.close()
    assert not lin._forward_pre_hooks and not lin._forward_hooks


def _captured(wg: wgrad.WeightGrads, module: nn.Module) -> int:
    """How many calls of ``module`` a capture by ``wg`` takes."""
    with wg.capture() as calls:
        module(_x(4, 3))
    return len(calls.calls)


def test_a_module_two_stages_hold_is_captured_by_both_from_the_first_call() -> None:
    """A module that appears in two stages gets one hook pair, not one per stage: a second pair
    read as a user's hook left the module to the graph once both stages had captured, so the
    first step formed its gradients another way than every later one."""
    lin = nn.Linear(3, 2).to(DT)
    first, second = wgrad.WeightGrads([lin]), wgrad.WeightGrads([lin])
    assert [_captured(first, lin), _captured(second, lin)] == [1, 1]
    assert [_captured(first, lin), _captured(second, lin)] == [1, 1]  # and on every later step
    assert len(lin._forward_pre_hooks) == len(lin._forward_hooks) == 1
    first.close()  # the other stage still captures
    assert _captured(second, lin) == 1
    second.close()
    assert not lin._forward_pre_hooks and not lin._forward_hooks


def test_a_capture_takes_only_its_own_stages_modules() -> None:
    """Another stage's module called inside a capture is left to the graph, whether or not that
    stage has put its hooks on yet (so the threads' timing never decides)."""
    mine, other = nn.Linear(3, 3).to(DT), nn.Linear(3, 2).to(DT)
    wg, theirs = wgrad.WeightGrads([mine]), wgrad.WeightGrads([other])
    assert _captured(theirs, other) == 1  # their hooks are on
    with wg.capture() as calls:
        other(mine(_x(4, 3)))
    assert [c.module for c in calls.calls] == [mine]
    wg.close()
    theirs.close()


def test_a_failing_forward_leaves_the_real_parameters_in_place() -> None:
    lin = nn.Linear(3, 2)
    wg = wgrad.WeightGrads([lin])
    with pytest.raises(RuntimeError), wg.capture():
        lin(torch.ones(2, 4))  # wrong width: raises inside the module
    assert isinstance(lin._parameters["weight"], nn.Parameter)
    assert lin.weight.requires_grad and lin.weight.grad_fn is None


# ---------------------------------------------------------------- through a Stage


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


class _Tied(nn.Module):
    """Uses an embedding's weight directly (a use outside the embedding's own call)."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.emb.weight)


class _Twice(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.lin = nn.Linear(n, n)
        self.norm = nn.LayerNorm(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(torch.tanh(self.lin(self.norm(x))))


class _Lookup(nn.Module):
    """Adds the embedding of fixed indices (a call of the embedding inside the stage)."""

    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.emb(torch.tensor([1, 2, 5]))


def _layers(fallback: bool) -> list[nn.Module]:
    torch.manual_seed(0)
    emb = nn.Embedding(6, 4)
    layers: list[nn.Module] = [
        nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.3)),
        _Lookup(emb),
        _Twice(4),
        nn.Sequential(nn.Linear(4, 4), nn.GELU()),
    ]
    if fallback:
        layers.append(_Scale(4))
    layers.append(_Tied(emb))  # the tied weight read directly: not through the embedding call
    return [m.to(DT) for m in layers]


HIDDEN = torch.randn(2, 3, 4, generator=_gen(1), dtype=DT)
TOKENS = torch.tensor([[1, 2, 5], [0, 2, 3]])
TARGET = torch.randn(2, 3, 6, generator=_gen(2), dtype=DT)


def _reference(layers: list[nn.Module], x: torch.Tensor, seed: int) -> tuple[Any, list]:
    """Plain autograd with the stage's keyed random streams (layer index = position):
    the input's gradient and the parameters'."""
    from gpipe.stage import rng

    x = x.clone().requires_grad_(x.is_floating_point())
    h = x
    for i, layer in enumerate(layers):
        with rng.keyed(seed, 0, 0, i):
            h = layer(h)
    (_mse(h, TARGET) * 0.5).backward()
    grads = [p.grad.clone() for p in _params(layers)]
    for p in _params(layers):
        p.grad = None
    return x.grad, grads


def _params(layers: list[nn.Module]) -> list[nn.Parameter]:
    return list(nn.ModuleList(layers).parameters())


def _max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("remat", ["never", "always"])
@pytest.mark.parametrize("fallback", [False, True])
def test_stage_mixing_split_and_fallback_parameters_is_exact(remat: str, fallback: bool) -> None:
    layers = _layers(fallback)
    want_x, want = _reference(layers, HIDDEN, seed=4)
    st = Stage(1, list(enumerate(layers)), "cpu", is_first=False, is_last=True, remat=remat, seed=4)
    assert st.fallback_parameters() == (["4.scale"] if fallback else [])
    st.begin_step(0, 2, True, loss_fn=_mse, loss_scale=0.5)
    res = st.forward(0, HIDDEN, TARGET, split=True)
    gx = st.backward(0, None, split=True)
    assert (gx - want_x).abs().max().item() <= 1e-10
    saved = st.state.saved[0]
    assert saved.calls is not None and len(saved.calls.calls) == 5  # lin, emb, lin ×2, lin
    assert all(c.edge is None for c in saved.calls.calls)  # no reference to the graph
    # the graph is kept for W only when some parameter falls back to it
    assert bool(saved.out_tensors) is fallback
    direct = {id(p) for p, _ in saved.calls.direct}
    norm = layers[2].norm
    assert {id(norm.weight), id(norm.bias)} <= direct  # the norm's reduction, always in B
    assert (id(layers[-1].emb.weight) in direct) is not fallback  # the tied read, in B
    assert all(p.grad is None for p in _params(layers))
    if not fallback and remat == "never":
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            res.loss.backward()  # B freed the graph
    st.backward_weight(0)
    assert st.pending == []
    assert _max_diff([p.grad for p in _params(layers)], want) <= 1e-10
    st.close()


@pytest.mark.parametrize("remat", ["never", "always"])
def test_a_first_stage_on_token_ids_leaves_the_whole_backward_to_w(remat: str) -> None:
    layers = [nn.Sequential(nn.Embedding(6, 4), nn.Linear(4, 4)).to(DT), *_layers(True)]
    _, want = _reference(layers, TOKENS, seed=2)
    st = Stage(0, list(enumerate(layers)), "cpu", is_first=True, is_last=True, remat=remat, seed=2)
    st.begin_step(0, 1, True, loss_fn=_mse, loss_scale=0.5)
    st.forward(0, (TOKENS,), TARGET, split=True)
    assert st.backward(0, None, split=True) == (None,)  # nothing wants the input's gradient
    assert st.state.saved[0].calls is None  # not captured: W walks the graph once
    assert all(p.grad is None for p in _params(layers))
    st.backward_weight(0)
    assert _max_diff([p.grad for p in _params(layers)], want) <= 1e-10


def test_whole_backward_after_a_split_forward_is_exact() -> None:
    layers = _layers(fallback=True)
    want_x, want = _reference(layers, HIDDEN, seed=0)
    st = Stage(1, list(enumerate(layers)), "cpu", is_first=False, is_last=True, remat="never")
    st.begin_step(0, 1, True, loss_fn=_mse, loss_scale=0.5)
    st.forward(0, HIDDEN, TARGET, split=True)
    assert st.state.saved[0].calls is not None
    gx = st.backward(0, None)  # not split: both halves at once
    assert st.pending == []
    assert (gx - want_x).abs().max().item() <= 1e-10
    assert _max_diff([p.grad for p in _params(layers)], want) <= 1e-10


def test_an_input_changed_in_place_after_the_module_is_named() -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.tanh(x)
            out = self.lin(h)
            h.mul_(2)  # the linear's input, after the linear ran
            return out + h

    st = Stage(2, [(0, InPlace())], "cpu", is_first=False, is_last=False)
    st.begin_step(0, 1, True)
    st.forward(3, torch.ones(2, 3), split=True)
    with pytest.raises(RuntimeError) as info:
        st.backward(3, torch.ones(2, 3), split=True)
    assert str(info.value).startswith(
        "stage 2, micro-batch 3: the input of a Linear was modified in place after the module ran;"
    )


# ---------------------------------------------------------------- through a Pipe

D, N_LAYERS, BATCH = 6, 8, 24


class _Block(nn.Module):
    """LayerNorm → Linear → tanh → dropout → a vector scale (reduced in B), with or without a
    non-standard matrix parameter (falls back to the graph)."""

    def __init__(self, raw: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(D)
        self.fc = nn.Linear(D, D)
        self.drop = nn.Dropout(0.3)
        self.scale = nn.Parameter(torch.linspace(0.8, 1.2, D))
        self.gate = nn.Parameter(torch.eye(D) + 0.1 * torch.ones(D, D)) if raw else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.fc(self.norm(x))))
        return x + (h @ self.gate if self.gate is not None else h) * self.scale


def _mixed_model() -> nn.Sequential:
    torch.manual_seed(0)
    embed = nn.Sequential(nn.Embedding(10, D), nn.Dropout(0.3))
    blocks = [_Block(raw=i % 3 == 1) for i in range(N_LAYERS - 2)]
    return nn.Sequential(embed, *blocks, nn.Linear(D, D)).to(DT)


def _split_schedules() -> list[str]:
    return [n for n in schedules.available() if schedules.get(n, 2, 4).split_backward]


MATRIX = [
    (s, k, m, r)
    for s in _split_schedules()
    for k in (2, 3, 4)
    for m in (k, 2 * k)
    for r in ("always", "except_last", "never")
]


@pytest.mark.parametrize(  # by default every 7th case: each schedule, K, M and remat mode
    ("schedule", "k", "m", "remat"),
    [
        case if i % 7 == 0 else pytest.param(*case, marks=pytest.mark.slow)
        for i, case in enumerate(MATRIX)
    ],
)
def test_split_schedules_on_a_mixed_model_equal_the_reference(
    schedule: str, k: int, m: int, remat: str
) -> None:
    sched = schedules.get(schedule, k, m)
    n = sched.num_stages
    if n > N_LAYERS:
        pytest.skip(f"{n} stages for {N_LAYERS} layers")
    x = torch.randint(0, 10, (BATCH,), generator=_gen(1))
    y = torch.randn(BATCH, D, generator=_gen(2), dtype=DT)
    ref = _mixed_model()
    ref_loss = reference_impl.step(ref, x, y, _mse, chunks=m, seed=7)
    model = _mixed_model()
    bal = [N_LAYERS // n + (1 if i < N_LAYERS % n else 0) for i in range(n)]
    pipe = gpipe.Pipe(model, balance=bal, chunks=m, schedule=schedule, remat=remat, seed=7)
    loss = pipe.step(x, y, _mse)
    assert abs(loss.item() - ref_loss.item()) <= 1e-12
    diff = max(
        (p.grad - q.grad).abs().max().item()
        for p, q in zip(model.parameters(), ref.parameters(), strict=True)
    )
    assert diff <= 1e-10
    fell_back = [name for st in pipe._stages for name in st.fallback_parameters()]
    assert len(fell_back) == sum(1 for i in range(N_LAYERS - 2) if i % 3 == 1)
    assert all(name.endswith(".gate") for name in fell_back)
    pipe.close()


def _conv_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        DeferredBatchNorm(4, chunks=4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect", bias=False),
        nn.GroupNorm(2, 4),
        nn.Tanh(),
        nn.Conv2d(4, 2, 1),
        DeferredBatchNorm(2, chunks=4),
    ).to(DT)


@pytest.mark.parametrize("remat", ["always", "except_last", "never"])
def test_zero_bubble_with_convolutions_and_deferred_batch_norm(remat: str) -> None:
    x = torch.randn(8, 2, 5, 5, generator=_gen(1), dtype=DT)
    y = torch.randn(8, 2, 5, 5, generator=_gen(2), dtype=DT)
    ref = _conv_model()
    reference_impl.step(ref, x, y, _mse, chunks=4)
    model = _conv_model()
    pipe = gpipe.Pipe(model, balance=[3, 5], chunks=4, schedule="zb-h1", remat=remat)
    pipe.step(x, y, _mse)
    assert all(st.fallback_parameters() == [] for st in pipe._stages)
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max().item() <= 1e-10
    for i in (1, 7):  # running statistics counted once per micro-batch, recompute or not
        assert torch.allclose(model[i].running_mean, ref[i].running_mean, atol=1e-12)
        assert torch.allclose(model[i].running_var, ref[i].running_var, atol=1e-12)
    pipe.close()
