"""Value checks of the loss scale (gpipe.core.precision) that ``make mutants`` showed were
missing: the gradients are divided by the scale (Adam, being scale-invariant, hides a missing
division in training), each precision's autocast, the count of finite steps from the start
and after growing, the smallest scale, and a state that only fp16 takes."""

from __future__ import annotations

import math

import pytest
import torch

from gpipe.core.precision import INIT_SCALE, MIN_SCALE, Precision


def _params() -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    with_grad = [torch.nn.Parameter(torch.randn(3, generator=g)) for _ in range(2)]
    for p in with_grad:
        p.grad = torch.randn(3, generator=g)
    return [*with_grad, torch.nn.Parameter(torch.zeros(2))]  # the last has no gradient


def test_unscale_divides_every_gradient_by_the_scale() -> None:
    p = Precision("fp16", "cpu")
    params = _params()
    want = [q.grad / p.scale for q in params[:2]]
    p.unscale(params)
    for q, w in zip(params, want):
        assert torch.equal(q.grad, w)  # the scale is a power of two: exact
    assert params[2].grad is None


@pytest.mark.parametrize("name", ["fp32", "bf16"])
def test_unscale_leaves_unscaled_gradients_alone(name: str) -> None:
    params = _params()
    want = [q.grad.clone() for q in params[:2]]
    Precision(name, "cpu").unscale(params)
    assert all(torch.equal(q.grad, w) for q, w in zip(params, want))


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)]
)
def test_each_precision_autocasts_to_its_own_dtype(name: str, dtype) -> None:
    with Precision(name, "cpu").autocast():
        assert torch.is_autocast_enabled("cpu") is (dtype is not None)
        if dtype is not None:
            assert torch.get_autocast_dtype("cpu") == dtype


def test_the_scale_grows_after_exactly_the_interval_from_the_start_and_after_growing() -> None:
    p = Precision("fp16", "cpu", growth_interval=2)
    assert p.state_dict() == {"scale": INIT_SCALE, "good_steps": 0}
    assert p.update(1.0) and p.scale == INIT_SCALE
    assert p.update(1.0) and p.scale == 2 * INIT_SCALE
    assert p.state_dict() == {"scale": 2 * INIT_SCALE, "good_steps": 0}
    assert p.update(1.0) and p.scale == 2 * INIT_SCALE
    assert p.update(1.0) and p.scale == 4 * INIT_SCALE


def test_the_smallest_scale_is_still_used_and_below_it_is_refused() -> None:
    p = Precision("fp16", "cpu")
    p.load_state_dict({"scale": 2 * MIN_SCALE, "good_steps": 5})
    assert p.update(math.inf) is False and p.scale == MIN_SCALE
    with pytest.raises(FloatingPointError) as err:
        p.update(math.inf)
    assert str(err.value) == (
        f"fp16's loss scale fell to {MIN_SCALE / 2:g}: the gradients are not finite at any "
        "scale; lower --lr, or use --precision bf16 or fp32"
    )


def test_only_fp16_takes_a_saved_scale() -> None:
    saved = {"scale": 8.0, "good_steps": 3}
    for name in ("fp32", "bf16"):
        p = Precision(name, "cpu")
        p.load_state_dict(saved)
        assert p.state_dict() == {"scale": 1.0, "good_steps": 0}
    p = Precision("fp16", "cpu")
    p.load_state_dict(None)
    assert p.state_dict() == {"scale": INIT_SCALE, "good_steps": 0}
    p.load_state_dict(saved)
    assert p.state_dict() == saved
