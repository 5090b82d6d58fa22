"""A captured model follows the user's habits: the model's mode, train/eval after wrapping,
another sequence length, non-tensor arguments, and changes to the model after wrapping.

Each case compares against the plain model in float64 (or checks the refusal names the
place); every one was silently wrong before the pipe followed the model's modes and checked
its objects.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpipe
from gpipe.base.snapshot import ModelChanged
from gpipe.capture import CaptureError, Sample, capture

D = 6


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


class Blocks(nn.Module):
    """Embedding-free stack with dropout, BatchNorm over features and a mode branch."""

    def __init__(self, p: float = 0.3, n: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(D, D), nn.Tanh(), nn.Dropout(p)) for _ in range(n)
        )
        self.norm = nn.BatchNorm1d(D)
        self.head = nn.Linear(D, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = b(x)
        x = self.norm(x)
        if self.training:  # a mode branch the graph would fix
            x = x * 2.0
        return self.head(x)


def _x(rows: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, D, generator=torch.Generator().manual_seed(seed))


def _pipe(model: nn.Module, sample, **kw) -> gpipe.Pipe:
    kw.setdefault("stages", 2)
    kw.setdefault("chunks", 2)
    return gpipe.Pipe(model, sample=sample, **kw)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_eval_before_wrapping_is_kept_and_runs_no_dropout() -> None:
    model = Blocks(p=0.5).eval()
    x = _x()
    with _pipe(model, x) as pipe:
        assert not pipe.training
        with torch.no_grad():
            assert _max_diff(pipe(x), model(x)) <= 1e-12
        assert not model.training  # the pipe did not flip the model


def test_eval_before_wrapping_a_sequence_is_kept() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(D, D), nn.Dropout(0.5), nn.Linear(D, D), nn.Dropout(0.5)).eval()
    x = _x()
    with gpipe.Pipe(seq, stages=2, chunks=2) as pipe:
        assert not pipe.training
        with torch.no_grad():
            assert _max_diff(pipe(x), seq(x)) <= 1e-12


def test_batchnorm_captured_in_train_then_eval_uses_running_statistics() -> None:
    model = Blocks(p=0.0).train()
    x = _x()
    with _pipe(model, x) as pipe:
        pipe.eval()
        assert not model.training and not model.norm.training  # reached the model itself
        before = model.norm.running_mean.clone()
        with torch.no_grad():
            got = pipe(x)
        assert torch.equal(model.norm.running_mean, before)  # eval moves no statistics
        with torch.no_grad():
            want = model(x)
        assert _max_diff(got, want) <= 1e-12


def test_batchnorm_captured_in_eval_then_train_uses_batch_statistics() -> None:
    model = Blocks(p=0.0).eval()
    plain = Blocks(p=0.0).train()
    x, y = _x(), torch.randn(8, 2, generator=torch.Generator().manual_seed(3))
    with _pipe(model, x, chunks=1) as pipe:
        pipe.train()
        loss = pipe.step(x, y, F.mse_loss)
    want = F.mse_loss(plain(x), y)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-12
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert _max_diff(p.grad, q.grad) <= 1e-10, name
    assert _max_diff(model.norm.running_mean, plain.norm.running_mean) <= 1e-12


def test_a_mixed_mode_model_runs_its_own_modes_then_follows_train_and_eval() -> None:
    """A frozen BatchNorm (eval inside a training model) is captured as it is; pipe.eval() and
    pipe.train() then set every module, as they do on a plain model."""
    model = Blocks(p=0.0).train()
    model.norm.eval()
    plain = Blocks(p=0.0).train()
    plain.norm.eval()
    x = _x()
    with _pipe(model, x, chunks=1) as pipe:  # one micro-batch: BatchNorm sees the whole batch
        assert pipe.training
        with torch.no_grad():
            assert _max_diff(pipe(x), plain(x)) <= 1e-12
        pipe.eval()
        pipe.train()
        plain.train()
        with torch.no_grad():
            assert _max_diff(pipe(x), plain(x)) <= 1e-12
        model.norm.eval()
        model.blocks[0].eval()  # a mix no graph was captured for
        with pytest.raises(RuntimeError, match=r"blocks\.0 is in eval mode"):
            pipe(x)


def test_a_training_branch_follows_the_mode() -> None:
    model = Blocks(p=0.0).train()
    x = _x()
    with _pipe(model, x) as pipe, torch.no_grad():
        model.eval()  # the user's own call on the model is followed too
        assert _max_diff(pipe(x), model(x)) <= 1e-12


def test_dropout_in_training_matches_the_plain_model_with_the_same_streams() -> None:
    model = Blocks(p=0.4).train()
    x = _x()
    with _pipe(model, x, chunks=2) as pipe:
        pipe.eval()
        pipe.train()
        a = pipe.step(x, torch.zeros(8, 2), F.mse_loss)
    with _pipe(Blocks(p=0.4).train(), x, stages=3, chunks=2, schedule="1f1b") as other:
        b = other.step(x, torch.zeros(8, 2), F.mse_loss)
    assert abs(a.item() - b.item()) <= 1e-12  # dropout drew, and alike for another cut


class Seq(nn.Module):
    """Token model whose layers read the sequence length (positions) and a padding mask."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(20, D)
        self.pos = nn.Embedding(32, D)
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(3))
        self.head = nn.Linear(D, 20)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)
        for b in self.blocks:
            x = torch.tanh(b(x)) * mask.unsqueeze(-1)
        return self.head(x)


def _tokens(rows: int, length: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 20, (rows, length), generator=g), torch.ones(rows, length)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "zb-h1"])
def test_another_sequence_length_trains_exactly(schedule: str) -> None:
    model, plain = Seq(), Seq()
    t12, m12 = _tokens(4, 12, 1)
    with _pipe(model, Sample(t12, m12), schedule=schedule) as pipe:
        for length in (20, 7, 12):
            t, m = _tokens(4, length, length)
            y = torch.randint(0, 20, (4, length), generator=torch.Generator().manual_seed(9))
            pipe.zero_grad()
            plain.zero_grad()

            def loss_fn(out, y):
                return F.cross_entropy(out.reshape(-1, 20), y.reshape(-1))

            loss = pipe.step(Sample(t, m), y, loss_fn)
            want = loss_fn(plain(t, m), y)
            want.backward()
            assert abs(loss.item() - want.item()) <= 1e-12, length
            for p, q in zip(model.parameters(), plain.parameters(), strict=True):
                assert _max_diff(p.grad, q.grad) <= 1e-10, length


class Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, scale: float = 1.0, flip: bool = False) -> torch.Tensor:
        y = self.b(torch.tanh(self.a(x))) * scale
        return -y if flip else y


@pytest.mark.parametrize("method", ["export", "fx"])
def test_non_tensor_arguments_other_than_the_samples_are_refused(method: str) -> None:
    model, x = Scaled(), _x()
    layers = capture(model, Sample(x, scale=3.0, flip=True), method=method)
    with gpipe.Pipe(layers, stages=2, chunks=2) as pipe, torch.no_grad():
        assert _max_diff(pipe(x, scale=3.0, flip=True), model(x, 3.0, True)) <= 1e-12
        with pytest.raises(
            ValueError, match=r"scale.* is 2\.0, but .* with 3\.0 .*fixed this non-tensor"
        ):
            pipe(x, scale=2.0, flip=True)


class WithBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(3))
        self.register_buffer("scale", torch.full((D,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x)) * self.scale
        return x


def test_a_buffer_reassigned_after_wrapping_is_refused_by_name() -> None:
    model, x = WithBuffer(), _x()
    with _pipe(model, x) as pipe, torch.no_grad():
        model.scale.fill_(3.0)  # in place: followed
        assert _max_diff(pipe(x), model(x)) <= 1e-12
        model.scale = torch.full((D,), 4.0)
        with pytest.raises(
            ModelChanged, match=r"model\.scale is another Tensor of shape \(6,\), but was"
        ):
            pipe(x)


class Lora(nn.Module):
    def __init__(self, base: nn.Linear) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Linear(base.in_features, 2, bias=False)
        self.up = nn.Linear(2, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


def test_an_adapter_put_into_the_model_after_wrapping_is_refused_by_name() -> None:
    model, x = WithBuffer(), _x()
    with _pipe(model, x) as pipe:
        model.blocks[1] = Lora(model.blocks[1])
        with pytest.raises(ModelChanged, match=r"model\.blocks\.1 is a Lora, but was a Linear"):
            pipe.step(x, torch.zeros(8, D), F.mse_loss)
        assert all(p.grad is None for p in model.parameters())  # refused before any work


def test_an_adapter_put_into_a_sequence_pipe_is_refused_by_name() -> None:
    torch.manual_seed(0)
    seq = nn.Sequential(*[nn.Linear(D, D) for _ in range(4)])
    x = _x()
    with gpipe.Pipe(seq, stages=2, chunks=2) as pipe:
        pipe.layers[2] = Lora(pipe.layers[2])
        with pytest.raises(ModelChanged, match=r"pipe\.layers\.2 is a Lora"):
            pipe(x)
    with gpipe.Pipe(seq, stages=2, chunks=2) as pipe:
        seq[1] = Lora(seq[1])
        with pytest.raises(ModelChanged, match=r"model\.1 is a Lora"):
            pipe(x)


class Counter(nn.Module):
    """A forward whose result depends on Python state the tracer fixes."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.ModuleList(nn.Linear(D, D) for _ in range(2))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin[1](self.lin[0](x)) * self.calls


def test_a_capture_that_computes_something_else_is_refused_with_the_difference() -> None:
    with pytest.raises(
        CaptureError,
        match=r"differs from the model on the sample .* off by .*; they first part in the glue "
        r"after layer 'lin/1'",
    ):
        capture(Counter(), _x())
    capture(Counter(), _x(), check=False)  # the way out it names


def test_the_self_check_restores_modes_buffers_and_random_state() -> None:
    model = Blocks(p=0.5).train()
    model.blocks[0].eval()
    modes = [m.training for m in model.modules()]
    stats = model.norm.running_mean.clone(), model.norm.num_batches_tracked.clone()
    state = torch.get_rng_state()
    capture(model, _x())
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model.norm.running_mean, stats[0])
    assert torch.equal(model.norm.num_batches_tracked, stats[1])
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.grad is None for p in model.parameters())


class Island(nn.Module):
    """Blocks under the caller's autocast, a head it keeps in float32."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(D, D) for _ in range(3))
        self.head = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for b in self.blocks:
            x = torch.tanh(b(x))
        with torch.autocast("cpu", enabled=False):
            return self.head(x.float())


def test_an_autocast_island_is_captured_and_trains_under_bf16() -> None:
    """export keeps the island as a region whose body the capture holds (was AttributeError
    'submod_1'); under bf16 the island computes in float32, as in the plain model."""
    model, plain = Island().float(), Island().float()
    x = _x().float()
    y = torch.zeros(8, D)
    with _pipe(model, x, chunks=1, threads_per_stage=1) as pipe:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = pipe.step(x, y, F.mse_loss)
            out = pipe(x)
        assert out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.mse_loss(plain(x), y)
    want.backward()
    assert abs(loss.item() - want.item()) <= 1e-2 * abs(want.item())
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad, rtol=2e-2, atol=1e-3)
