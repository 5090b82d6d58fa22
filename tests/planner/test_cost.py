"""Cost model: exact FLOPs and bytes, shapes that chain, a 10B model on meta in seconds, no side effects."""

from __future__ import annotations

import copy
import resource

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from gpipe.planner.cost import LayerCost, profile, summarize


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _Noise(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.rand_like(x)


class _ToDict(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"h": x * 2, "mask": x > 0}


class _FromDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 3)

    def forward(self, d: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(d["h"]), d["mask"].long().sum(-1)


class _FromTuple(nn.Module):
    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        y, counts = pair
        return y * counts.unsqueeze(-1)


class _Broken(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ torch.ones(x.shape[-1] + 1, 2)


def test_linear_is_exact() -> None:
    (c,) = profile([nn.Linear(1024, 4096)], torch.randn(8, 1024))
    assert isinstance(c, LayerCost)
    assert c.name == "0"
    assert c.flops == 2 * 8 * 1024 * 4096
    assert c.param_bytes == (1024 * 4096 + 4096) * 4
    assert c.buffer_bytes == 0
    assert c.activation_bytes == 8 * 4096 * 4
    assert c.out_shapes == ((8, 4096),)
    assert c.out_dtypes == (torch.float32,)
    assert not c.random


def test_linear_backward_counts_input_and_weight_grads() -> None:
    x = torch.randn(8, 1024)
    (c,) = profile([nn.Linear(1024, 4096)], x)
    assert c.backward_flops == 4 * 8 * 1024 * 4096  # dX = dY·W and dW = dYᵀ·X
    (c,) = profile([nn.Linear(1024, 4096)], x, input_grad=False)
    assert c.backward_flops == 2 * 8 * 1024 * 4096  # dW only
    frozen = nn.Linear(1024, 4096).requires_grad_(False)
    (c,) = profile([frozen], x, input_grad=False)
    assert c.backward_flops == 0  # nothing needs a gradient


def test_shapes_chain_and_relu_is_free() -> None:
    seq = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4), nn.Softmax(-1))
    costs = profile(seq, torch.randn(5, 16))
    assert [c.name for c in costs] == ["0", "1", "2", "3"]
    assert [c.out_shapes for c in costs] == [((5, 32),), ((5, 32),), ((5, 4),), ((5, 4),)]
    relu = costs[1]
    assert relu.flops == 0 and relu.backward_flops == 0
    assert relu.param_bytes == 0 and relu.buffer_bytes == 0
    assert costs[2].flops == 2 * 5 * 32 * 4


def test_named_children_and_shared_and_buffer_bytes() -> None:
    lin = nn.Linear(8, 8, bias=False)
    tied = nn.Sequential(lin, lin)  # one parameter seen twice inside one layer
    seq = nn.Sequential()
    seq.add_module("embed", tied)
    seq.add_module("norm", nn.BatchNorm1d(8))
    costs = profile(seq, torch.randn(4, 8))
    assert [c.name for c in costs] == ["embed", "norm"]
    assert costs[0].param_bytes == 8 * 8 * 4
    assert costs[0].flops == 2 * (2 * 4 * 8 * 8)
    # running_mean, running_var (float32) and num_batches_tracked (int64)
    assert costs[1].buffer_bytes == 8 * 4 + 8 * 4 + 8
    assert costs[1].param_bytes == 2 * 8 * 4


def test_ten_billion_parameters_on_meta_without_memory() -> None:
    profile([nn.Linear(4, 4)], torch.randn(2, 4))  # pay one-time imports and warm-up first
    with torch.device("meta"):
        model = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(
                    d_model=5120, nhead=40, dim_feedforward=20480, batch_first=True
                )
                for _ in range(32)
            ]
        )
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params >= 10e9

    rss, peak = _rss_mib(), _peak_rss_mib()
    costs = profile(model, torch.empty(2, 128, 5120, device="meta"))
    assert _rss_mib() - rss < 500
    assert _peak_rss_mib() - peak < 500

    assert len(costs) == 32
    assert costs[0].flops > 0 and costs[0].backward_flops > 0
    assert len({(c.flops, c.backward_flops, c.param_bytes) for c in costs}) == 1
    assert sum(c.param_bytes for c in costs) == 4 * n_params
    assert all(c.out_shapes == ((2, 128, 5120),) for c in costs)
    assert all(p.is_meta for p in model.parameters())


def test_real_model_and_inputs_are_untouched() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(6, 6), nn.BatchNorm1d(6), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(6, 2)
    )
    model.eval()
    model[1].train()  # mixed modes must come back exactly as they were
    before = copy.deepcopy(model.state_dict())
    modes = [m.training for m in model.modules()]
    x = torch.randn(4, 6)
    x_before = x.clone()
    rng_before = torch.get_rng_state()

    for train in (True, False):
        profile(model, x, train=train)

    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(x, x_before) and x.grad is None
    assert torch.equal(torch.get_rng_state(), rng_before)


@pytest.mark.parametrize(
    ("layer", "train", "expected"),
    [
        (nn.Dropout(0.1), True, True),
        (nn.Dropout(0.1), False, False),
        (nn.Linear(4, 4), True, False),
        (_Noise(), True, True),
        (_Noise(), False, True),
    ],
)
def test_random_flag(layer: nn.Module, train: bool, expected: bool) -> None:
    (c,) = profile([layer], torch.randn(3, 4), train=train)
    assert c.random is expected


def test_pytree_outputs_flow_to_the_next_layer() -> None:
    costs = profile([_ToDict(), _FromDict(), _FromTuple()], torch.randn(2, 6))
    assert costs[0].out_shapes == ((2, 6), (2, 6))
    assert costs[0].out_dtypes == (torch.float32, torch.bool)
    assert costs[0].activation_bytes == 2 * 6 * 4 + 2 * 6 * 1
    assert costs[1].out_shapes == ((2, 3), (2,))
    assert costs[1].out_dtypes == (torch.float32, torch.int64)
    assert costs[1].flops == 2 * 2 * 6 * 3
    assert costs[2].out_shapes == ((2, 3),)


def test_first_layer_gets_all_sample_inputs_and_non_tensors() -> None:
    class Two(nn.Module):
        def forward(self, a: torch.Tensor, b: dict, scale: float) -> torch.Tensor:
            return (a @ b["w"]) * scale

    (c,) = profile([Two()], torch.randn(3, 5), {"w": torch.randn(5, 7)}, 2.0)
    assert c.out_shapes == ((3, 7),)
    assert c.flops == 2 * 3 * 5 * 7


def test_meta_fake_and_real_inputs_agree() -> None:
    layers = [nn.Linear(12, 20), nn.GELU()]
    real = profile(layers, torch.randn(3, 12))
    meta = profile(layers, torch.empty(3, 12, device="meta"))
    with FakeTensorMode() as mode:
        fake_input = mode.from_tensor(torch.empty(3, 12))
    fake = profile(layers, fake_input)
    assert real == meta == fake


def test_failing_layer_is_named() -> None:
    seq = nn.Sequential(nn.Linear(4, 4), _Broken())
    with pytest.raises(RuntimeError, match=r"layer 1 \('1', _Broken\).*\(2, 4\)") as info:
        profile(seq, torch.randn(2, 4))
    assert info.value.__cause__ is not None


def test_single_module_is_rejected_with_a_fix() -> None:
    with pytest.raises(TypeError, match="wrap it"):
        profile(nn.Linear(2, 2), torch.randn(1, 2))


def test_summarize_is_readable() -> None:
    costs = profile(nn.Sequential(nn.Linear(1024, 4096), nn.ReLU()), torch.randn(8, 1024))
    text = summarize(costs)
    lines = text.splitlines()
    assert len(lines) == 2 + 2 + 2  # header, rule, two layers, rule, total
    assert "67.1 MFLOP" in text  # 2·8·1024·4096
    assert "16.0 MiB" in text  # (1024·4096 + 4096)·4 bytes
    assert "8x4096" in text
    assert lines[-1].split()[0] == "total"
