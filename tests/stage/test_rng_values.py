"""Value checks that kill the mutants of ``gpipe.stage.rng`` the main tests let live.

They pin what the module docstring promises, by value: a keyed op draws from *the* private
generator seeded with the key (the same numbers as an explicit ``torch.Generator``), an explicit
generator is kept, an op that draws nothing (attention with ``dropout_p=0``) leaves the stream
alone, the fused ``native_dropout`` is keyed, an op without a generator overload runs on the
global generator seeded from the key and leaves the global state as it was, and the module
hooks switch the mode on only inside random modules, even when one raises or nests another.
The cold paths (the generator-variant cache, ``warm_up``) are run from cold. See
docs/mutation.md.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gpipe.stage import rng

KEY = (1, 2, 3, 4)


def _gen(seed: int | None = None) -> torch.Generator:
    return torch.Generator().manual_seed(rng.derive_seed(*KEY) if seed is None else seed)


@contextlib.contextmanager
def _global_untouched():
    before = torch.random.get_rng_state()
    yield
    assert torch.equal(torch.random.get_rng_state(), before)


def _draws(g: torch.Generator | None) -> list[torch.Tensor]:
    kw = {} if g is None else {"generator": g}
    return [
        torch.rand(5, **kw),
        torch.randn(3, 3, **kw),
        torch.randint(0, 10, (4,), **kw),
        torch.randperm(6, **kw),
        torch.empty(4).uniform_(**kw),
        torch.empty(4).normal_(**kw),
        torch.bernoulli(torch.full((8,), 0.5), **kw),
        torch.multinomial(torch.ones(10), 3, **kw),
    ]


@pytest.fixture
def cold_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rng, "_VARIANTS", {})


def test_keyed_ops_draw_from_the_keyed_generator(cold_cache: None) -> None:
    with _global_untouched(), rng.keyed(*KEY) as mode:
        got = _draws(None)
    assert mode.used is True
    want = _draws(_gen())
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # and again with the variant cache warm
    with rng.keyed(*KEY):
        again = _draws(None)
    assert all(torch.equal(a, b) for a, b in zip(again, want, strict=True))


def test_variant_cache_is_filled_once(cold_cache: None) -> None:
    with rng.keyed(*KEY):
        torch.rand(2)
    rand = torch.ops.aten.rand.default
    assert rng._VARIANTS[rand] is torch.ops.aten.rand.generator
    assert (
        rng._generator_variant(torch.ops.aten.randperm.default) is torch.ops.aten.randperm.generator
    )
    assert rng._generator_variant(torch.ops.aten.add.Tensor) is None


def test_aten_op_without_device_or_tensors_draws_on_cpu() -> None:
    with rng.keyed(*KEY):
        got = torch.ops.aten.rand.default([3])
    assert torch.equal(got, torch.rand(3, generator=_gen()))


def test_positional_generator_slot() -> None:
    op = torch.ops.aten.rrelu_with_noise.default  # its generator is a positional argument
    x = -torch.arange(1.0, 9.0)

    def run(gen: torch.Generator | None) -> torch.Tensor:
        return op(x, torch.empty(8), 0.1, 0.3, True, gen)

    with rng.keyed(*KEY):
        got = run(None)
    assert torch.equal(got, run(_gen()))
    with rng.keyed(*KEY):
        mine = run(_gen(7))
        after = torch.rand(3)
    assert torch.equal(mine, run(_gen(7)))
    assert torch.equal(after, torch.rand(3, generator=_gen()))


def test_explicit_positional_generator_keeps_the_other_arguments() -> None:
    rates = torch.full((6,), 4.0)
    with rng.keyed(*KEY):
        out = torch.empty(6)
        torch.ops.aten.poisson.out(rates, _gen(7), out=out)
    assert torch.equal(out, torch.poisson(rates, generator=_gen(7)))


def test_explicit_generator_is_kept() -> None:
    with _global_untouched(), rng.keyed(*KEY) as mode:
        got = _draws(_gen(7))
        after = torch.rand(3)
    assert mode.used is True
    assert all(torch.equal(a, b) for a, b in zip(got, _draws(_gen(7)), strict=True))
    assert torch.equal(after, torch.rand(3, generator=_gen()))  # the keyed stream is unused


def test_non_random_ops_keep_their_arguments() -> None:
    with rng.keyed(*KEY) as mode:
        z = torch.zeros(2, dtype=torch.float64)
        s = torch.full((2,), 3.0).sum(dim=0, keepdim=True)
    assert mode.used is False and mode.used_outside_known is False
    assert z.dtype == torch.float64
    assert s.shape == (1,)


def test_attention_without_dropout_draws_nothing() -> None:
    q = torch.randn(1, 2, 4, 8)
    with _global_untouched(), rng.keyed(*KEY) as mode:
        F.scaled_dot_product_attention(q, q, q)
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, dropout_p=0.0)
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, q, q, 0.0)
        assert mode.used is False
        after = torch.rand(3)
    assert torch.equal(after, torch.rand(3, generator=_gen()))


def test_attention_with_dropout_is_a_draw() -> None:
    q = torch.randn(1, 2, 4, 8)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    for call in (lambda: flash(q, q, q, 0.5), lambda: flash(q, q, q, dropout_p=0.5)):
        with rng.keyed(*KEY) as mode, pytest.raises(RuntimeError, match="dropout"):
            call()
        assert mode.used is True


def test_native_dropout_is_keyed() -> None:
    x = torch.arange(1.0, 33.0)
    with rng.keyed(*KEY):
        out, mask = torch.native_dropout(x, 0.25, True)
    want = torch.empty_like(x, dtype=torch.bool).bernoulli_(0.75, generator=_gen())
    assert mask.dtype == torch.bool
    assert torch.equal(mask, want)
    assert torch.allclose(out, x * want / 0.75)


@pytest.mark.parametrize(("p", "train"), [(0.0, True), (0.5, False)])
def test_native_dropout_that_keeps_everything(p: float, train: bool) -> None:
    x = torch.arange(1.0, 9.0)
    with rng.keyed(*KEY):
        out, mask = torch.native_dropout(x, p, train)
        after = torch.rand(3)
    assert torch.equal(out, x) and out is not x
    assert mask.dtype == torch.bool and bool(mask.all())
    assert torch.equal(after, torch.rand(3, generator=_gen()))  # nothing was drawn


def test_native_dropout_of_everything() -> None:
    x = torch.arange(1.0, 9.0)
    with rng.keyed(*KEY):
        out, mask = torch.native_dropout(x, 1.0, True)
    assert not bool(mask.any())
    assert torch.equal(out, torch.zeros(8))


# ------------------------------------------------------- an op with no generator overload

if not hasattr(torch.ops.gpipe_mutants, "noisy"):  # once per process, however often imported
    _LIB = torch.library.Library("gpipe_mutants", "DEF")
    _LIB.define(
        "noisy(Tensor x, *, float scale=1.0) -> Tensor", tags=(torch.Tag.nondeterministic_seeded,)
    )
    _LIB.impl("noisy", lambda x, *, scale=1.0: x + scale * torch.rand(x.shape), "CPU")


def test_op_without_generator_overload_is_seeded_from_the_key() -> None:
    x = torch.zeros(4)
    with _global_untouched():
        with rng.keyed(*KEY) as mode:
            got = torch.ops.gpipe_mutants.noisy(x, scale=3.0)
            after = torch.rand(2)
        g = _gen()
        sub = int(torch.randint(0, 2**62, (1,), generator=g))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sub)
            want = 3.0 * torch.rand(4)
        assert torch.equal(after, torch.rand(2, generator=g))
    assert mode.used is True
    assert torch.equal(got, want)


# --------------------------------------------------------------------- hooks and warm-up


class Outer(nn.Dropout):
    """A random module holding another one."""

    def __init__(self) -> None:
        super().__init__(0.5)
        self.inner = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.inner(x))


def _after_module_is_global(model: nn.Module, x) -> None:
    torch.manual_seed(11)
    want = torch.rand(3)
    torch.manual_seed(11)
    with rng.keyed_modules(*KEY) as mode:
        with contextlib.suppress(TypeError):
            model(x)
        got = torch.rand(3)  # outside every random module: the global generator
    assert getattr(rng._tls, "known_depth", 0) == 0
    assert torch.equal(got, want)
    return mode


@pytest.mark.parametrize("make", [lambda: nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)), Outer])
def test_module_hooks_switch_the_mode_off_after_the_module(make) -> None:
    model = make()
    handles = rng.install_hooks(model)
    try:
        mode = _after_module_is_global(model, torch.ones(2, 4))
        assert mode.used is True and mode.used_outside_known is False
    finally:
        for h in handles:
            h.remove()


def test_module_hooks_switch_the_mode_off_when_the_module_raises() -> None:
    model = nn.Dropout(0.5)
    handles = rng.install_hooks(model)
    try:
        _after_module_is_global(model, "not a tensor")
    finally:
        for h in handles:
            h.remove()


def test_warm_up_from_cold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rng, "_warm", False)
    with _global_untouched():
        rng.warm_up()
    assert rng._warm is True
    rng.warm_up()
    assert rng._warm is True


def test_op_without_generator_overload_seeds_only_what_it_restores(monkeypatch) -> None:
    """The fallback seeds the CPU's generator (and the op's own GPU's), never through
    torch.manual_seed, which reseeds every GPU while fork_rng restores one."""

    def every_device(seed: int) -> None:
        raise AssertionError("torch.manual_seed reseeds every device")

    monkeypatch.setattr(torch, "manual_seed", every_device)
    with rng.keyed(*KEY):
        torch.ops.gpipe_mutants.noisy(torch.zeros(4), scale=1.0)
