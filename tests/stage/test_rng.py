"""Keyed random streams: same key, same numbers — in any thread, at any nesting, on recompute.

Value checks that kill the mutants of ``gpipe.stage.rng`` the main tests let live.

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
import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import gpipe
import reference_impl
from gpipe.stage import rng


def _draw() -> list[torch.Tensor]:
    x = torch.ones(64)
    return [
        torch.nn.functional.dropout(x, 0.5, True),
        torch.rand(5),
        torch.randn(3, 3),
        torch.randint(0, 10, (4,)),
        torch.randperm(6),
        torch.rand_like(x),
        torch.empty(4).uniform_(),
        torch.empty(4).normal_(),
        torch.bernoulli(torch.full((8,), 0.5)),
        torch.multinomial(torch.ones(10), 3),
    ]


def test_same_key_same_numbers_different_key_different() -> None:
    with rng.keyed(1, 2, 3, 4):
        a = _draw()
    with rng.keyed(1, 2, 3, 4):
        b = _draw()
    with rng.keyed(1, 2, 3, 5):
        c = _draw()
    assert len(a) == len(b) == len(c) == 10
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, c))


def test_global_generator_is_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    with rng.keyed(0, 0, 0, 0):
        _draw()
    assert torch.equal(before, torch.get_rng_state())


def test_explicit_generator_is_respected() -> None:
    g1 = torch.Generator().manual_seed(5)
    g2 = torch.Generator().manual_seed(5)
    with rng.keyed(0, 0, 0, 0):
        a = torch.rand(4, generator=g1)
    assert torch.equal(a, torch.rand(4, generator=g2))


def test_threads_do_not_interfere() -> None:
    serial = {}
    for k in range(4):
        with rng.keyed(0, 0, k, 0):
            serial[k] = _draw()
    results: dict[int, list[torch.Tensor]] = {}

    def work(k: int) -> None:
        for _ in range(20):
            with rng.keyed(0, 0, k, 0):
                results[k] = _draw()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == list(range(4))
    for k in range(4):
        assert len(serial[k]) == len(results[k]) == 10
        assert all(torch.equal(x, y) for x, y in zip(serial[k], results[k]))


# Golden values of the stream format (docs/testing.md): a change here changes every dropout
# mask of every model, so it must be a deliberate, versioned decision, never a side effect.
GOLDEN_SEEDS = {
    (0, 0, 0, 0): 4831152143159499963,
    (1, 2, 3, 4): 685993333062480786,
    (7, 0, 3, 11): 6494474911313934309,
    (-1, 5, -2, 2**40): 8618396427723006196,
    (123456789, 99, 7, 0): 7516939274530987404,
}
GOLDEN_RAND_1234 = [0.9460112452507019, 0.6207560896873474, 0.3554580807685852, 0.2069351077079773]
GOLDEN_DROPOUT_1234 = [2, 0, 0, 0, 2, 0, 0, 0, 0, 2, 2, 0, 0, 2, 0, 2]


def test_seed_derivation_golden_values() -> None:
    for key, want in GOLDEN_SEEDS.items():
        assert rng.derive_seed(*key) == want, key
        assert reference_impl.stream_seed(*key) == want, key  # the tests' own derivation
    seeds = {
        rng.derive_seed(0, s, m, layer) for s in range(3) for m in range(3) for layer in range(3)
    }
    assert len(seeds) == 27 and all(0 <= s < 2**63 for s in seeds)


def test_keyed_stream_golden_values() -> None:
    """The first numbers a keyed region draws: ``torch.rand`` first, then a dropout mask, both
    from one generator seeded with ``derive_seed(1, 2, 3, 4)``."""
    with rng.keyed(1, 2, 3, 4):
        first = torch.rand(4)
        dropped = F.dropout(torch.ones(16, dtype=torch.float64), 0.5, True)
    assert first.tolist() == GOLDEN_RAND_1234
    assert dropped.tolist() == GOLDEN_DROPOUT_1234
    g = torch.Generator().manual_seed(GOLDEN_SEEDS[(1, 2, 3, 4)])
    assert torch.rand(4, generator=g).tolist() == GOLDEN_RAND_1234  # nothing but that generator


def test_pipe_draws_the_golden_masks() -> None:
    """Layer 1 (a dropout) of a Pipe with seed 1 at its first step: micro-batch t draws from
    the key (1, 0, t, 1)."""
    model = nn.Sequential(nn.Linear(8, 8).double(), nn.Dropout(0.5))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(8))
        model[0].bias.zero_()
    pipe = gpipe.Pipe(model, balance=[1, 1], chunks=2, seed=1)
    out = pipe(torch.ones(2, 8, dtype=torch.float64))
    assert out.tolist() == [[2, 2, 0, 2, 2, 0, 0, 0], [0, 0, 2, 0, 2, 0, 2, 2]]
    pipe.close()


class Noisy(nn.Module):
    """Draws random numbers outside any dropout module."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) * (1 + 0.1 * torch.rand_like(x))


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4).double()
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc(x))


def test_fast_path_is_chosen_only_when_safe_and_matches_reference() -> None:
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(Noisy(), WithDropout(), nn.Linear(4, 4).double())

    x = torch.randn(8, 4, dtype=torch.float64)
    model = build()
    pipe = gpipe.Pipe(model, balance=[2, 1], chunks=4, remat="always", seed=3)
    ref = build()
    for step in range(3):
        model.zero_grad()
        ref.zero_grad()
        out = pipe(x)
        out.sum().backward()
        want = reference_impl.forward(ref, x, chunks=4, seed=3, step=step)
        want.sum().backward()
        assert torch.equal(out, want)
        assert len(list(model.parameters())) == len(list(ref.parameters())) == 6
        for a, b in zip(model.parameters(), ref.parameters()):
            assert torch.allclose(a.grad, b.grad, atol=1e-12)
    how = {k[0]: v for k, v in pipe._stages[0]._random.items()}
    how.update({k[0]: v for k, v in pipe._stages[1]._random.items()})
    assert how == {0: "full", 1: "modules", 2: "none"}
    pipe.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_a_plain_cpu_dropout_draws_without_the_dispatch_mode_and_the_same_bits(p, dtype):
    """Inside a hooked ``nn.Dropout`` (a layer's runs after its first), the CPU dropout is
    drawn by a function mode issuing ATen's own CPU dropout ops, not under the dispatch
    mode: output and input gradient must be bit for bit those of the dispatch mode (a layer's
    first run, and a re-materialized forward, use one and then the other)."""
    drop = nn.Dropout(p)
    handles = rng.install_hooks(drop)
    x = torch.randn(3, 5, 7, dtype=dtype, requires_grad=True)
    with rng.keyed(1, 2, 3, 4):
        want = F.dropout(x, p, True)
    (gw,) = torch.autograd.grad(want.float().square().sum(), x)
    dispatched = []
    orig = rng.KeyedRandom.__torch_dispatch__

    def spy(self, func, *args, **kwargs):
        dispatched.append(func)
        return orig(self, func, *args, **kwargs)

    rng.KeyedRandom.__torch_dispatch__ = spy
    try:
        with rng.keyed_modules(1, 2, 3, 4) as mode:
            got = drop(x)
    finally:
        rng.KeyedRandom.__torch_dispatch__ = orig
        for h in handles:
            h.remove()
    (gg,) = torch.autograd.grad(got.float().square().sum(), x)
    assert dispatched == [] and mode.used
    assert torch.equal(got, want) and torch.equal(gg, gw)


def test_other_dropouts_in_a_hooked_module_still_go_through_the_dispatch_mode():
    """In place, a subclass, ``Dropout1d``: anything but a plain ``nn.Dropout`` keeps the
    dispatch mode inside the module, and draws what the full mode draws."""

    class MyDropout(nn.Dropout):
        pass

    x = torch.randn(4, 6)
    orig = rng.KeyedRandom.__torch_dispatch__
    for drop in (nn.Dropout(0.3, inplace=True), MyDropout(0.3), nn.Dropout1d(0.3)):
        handles = rng.install_hooks(drop)
        dispatched = []

        def spy(self, func, *args, seen=dispatched, **kwargs):
            seen.append(func)
            return orig(self, func, *args, **kwargs)

        try:
            with rng.keyed(5, 0, 0, 0):
                want = drop(x.clone())
            rng.KeyedRandom.__torch_dispatch__ = spy
            with rng.keyed_modules(5, 0, 0, 0):
                got = drop(x.clone())
        finally:
            rng.KeyedRandom.__torch_dispatch__ = orig
            for h in handles:
                h.remove()
        assert dispatched, type(drop).__name__
        assert torch.equal(got, want), type(drop).__name__


@pytest.mark.parametrize("case", ["p=0", "p=1", "eval", "empty", "int8"])
def test_a_dropout_that_draws_nothing_stays_off_the_cpu_path(case):
    """``p = 0``, ``p = 1``, eval mode, an empty or a non-float tensor: the module's own
    forward under the dispatch mode decides (it draws nothing, or refuses), never the CPU
    path, which would draw a mask (and mark the region used) where ATen draws none."""
    p = {"p=0": 0.0, "p=1": 1.0}.get(case, 0.5)
    drop = nn.Dropout(p)
    if case == "eval":
        drop.eval()
    x = {"empty": torch.randn(0, 3), "int8": torch.ones(4, 3, dtype=torch.int8)}.get(
        case, torch.randn(4, 3)
    )
    handles = rng.install_hooks(drop)
    try:
        with rng.keyed(7, 0, 0, 0):
            try:
                want: object = drop(x)
            except Exception as e:  # an integer tensor: ATen refuses it, and so must we
                want = type(e)
        with rng.keyed_modules(7, 0, 0, 0) as mode:
            try:
                got: object = drop(x)
            except Exception as e:
                got = type(e)
    finally:
        for h in handles:
            h.remove()
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor) and torch.equal(got, want)
        assert not mode.used
    else:
        assert got == want


def test_two_backwards_on_one_device_leave_no_stale_entry() -> None:
    """Two workers' backwards on one (non-CPU) device overlap; each removes only its own entry
    (the device thread's replay lookup never sees a backward that has ended)."""
    from gpipe.stage import rng_replay

    dev = torch.device("meta")  # any non-CPU device is keyed the same way
    a = rng_replay.backward_of(0, 0, False, {}, device=dev)
    b = rng_replay.backward_of(1, 0, False, {}, device=dev)
    a.__enter__()
    b.__enter__()
    a.__exit__(None, None, None)  # A ends first: B's entry stays
    assert [w[0] for w in rng_replay.on_device[dev]] == [1]
    b.__exit__(None, None, None)
    assert dev not in rng_replay.on_device


# ----------------------------------------------------------------------------- values
# Value checks that pin what a mutation of the module changes (tools/mutants.py).


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
