"""Keyed random streams: every random op of a layer draws from a generator seeded by
(seed, step, micro-batch, layer).

The invariant: the random numbers a layer sees depend only on that key — not on which thread,
stage, device or schedule ran it, nor on how many times it ran. So re-materialization repeats
dropout masks exactly, and a model cut into 1, 2 or 8 stages draws the same masks.

How: :func:`keyed` pushes a ``TorchDispatchMode`` (thread-local in PyTorch, so concurrent stage
threads do not interfere) that rewrites every ATen op tagged ``nondeterministic_seeded``
(``bernoulli_``, ``rand``, ``randn``, ``randint``, ``randperm``, ``normal``, ``multinomial``,
the fused ``native_dropout`` ...) to draw from a private ``torch.Generator``. Ops that already
receive an explicit generator keep it. The global generator is never touched, except for the
rare seeded op that has no generator overload: that one runs under a process-wide lock with
the global generator forked and seeded from the key.

A Python dispatch mode costs a few microseconds per ATen op, so stages use it sparingly: the
first run of a layer goes under the full mode, which also notes whether every random op came
from a known random module (``nn.Dropout`` and friends). If so, later runs only switch the mode
on inside those modules (forward hooks, :func:`install_hooks` + :func:`keyed_modules`): the
draws are the same, in the same order, from the same generator, at no cost for the other ops.
A plain ``nn.Dropout`` on a CPU tensor skips even that: a function mode issues ATen's own CPU
dropout ops with the region's generator (``_CpuDropout``), the same bits. A random module
recomputed by a layer's own ``torch.utils.checkpoint`` during the backward, outside every
region, draws its forward's numbers again (:mod:`gpipe.stage.rng_replay`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "RANDOM_MODULES",
    "KeyedRandom",
    "derive_seed",
    "draws_nothing",
    "in_region",
    "input_device",
    "install_hooks",
    "keyed",
    "keyed_modules",
    "module_mode",
    "recording",
    "region",
    "warm_up",
]

_aten = torch.ops.aten
_FALLBACK_LOCK = threading.Lock()
_VARIANTS: dict[Any, Any] = {}
# This thread's keyed-region state: ``regions`` (how many keyed regions are open),
# ``full_mode`` / ``module_mode`` (the innermost :func:`keyed` / :func:`keyed_modules` mode),
# ``draws`` (where :func:`recording` keeps generator states), ``known_depth`` and ``entered``
# (the hooks' nesting). Other modules use the functions below, never these fields.
_tls = threading.local()

#: Modules whose forward is known to draw random numbers; see :func:`install_hooks`.
RANDOM_MODULES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


def derive_seed(seed: int, step: int, microbatch: int, layer: int) -> int:
    """A 63-bit seed from the key, stable across processes, Python versions and machines."""
    data = b"gpipe-rng" + b"".join(
        int(v).to_bytes(8, "little", signed=True) for v in (seed, step, microbatch, layer)
    )
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def _generator_variant(func: Any) -> Any | None:
    """The overload of ``func`` that takes a ``generator`` argument (``rand`` → ``rand.generator``)."""
    if func in _VARIANTS:
        return _VARIANTS[func]
    names = [a.name for a in func._schema.arguments]
    found = None
    packet = func.overloadpacket
    for overload in packet.overloads():
        cand = getattr(packet, overload)
        cand_names = [a.name for a in cand._schema.arguments]
        if "generator" in cand_names and [n for n in cand_names if n != "generator"] == names:
            found = cand
            break
    _VARIANTS[func] = found
    return found


def draws_nothing(func: Any, args: tuple, kwargs: dict) -> bool:
    """True for a seeded op called with a zero dropout probability (attention kernels are
    tagged seeded because they *can* drop; with ``dropout_p=0`` they draw nothing)."""
    for i, a in enumerate(func._schema.arguments):
        if a.name == "dropout_p":
            value = args[i] if i < len(args) else kwargs.get("dropout_p", a.default_value)
            return value == 0
    return False


def _device_of(args: tuple, kwargs: dict) -> torch.device:
    dev = kwargs.get("device")
    if dev is not None:
        return torch.device(dev)
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


class KeyedRandom(TorchDispatchMode):
    """Dispatch mode routing seeded random ops to generators seeded with ``seed``.

    One generator per device is created on first use and advances as ops draw from it, so the
    sequence of draws inside one keyed region is reproducible. ``used`` records whether any
    random op ran (the stage uses it to skip the mode for layers that never draw).
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.used = False
        self.used_outside_known = False
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """This region's generator for ``device``."""
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        g = self._generators.get(device)
        if g is None:
            g = torch.Generator(device=device)
            g.manual_seed(self.seed)
            self._generators[device] = g
        return g

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded not in func.tags or draws_nothing(func, args, kwargs):
            return func(*args, **kwargs)
        self.used = True
        if not getattr(_tls, "known_depth", 0):
            self.used_outside_known = True
        if func is _aten.native_dropout.default:
            return self._dropout(*args, **kwargs)
        schema_args = func._schema.arguments
        names = [a.name for a in schema_args]
        device = _device_of(args, kwargs)
        if "generator" in names:
            idx = names.index("generator")
            if idx < len(args):
                if args[idx] is not None:
                    return func(*args, **kwargs)
                args = (*args[:idx], self.generator(device), *args[idx + 1 :])
                return func(*args, **kwargs)
            if kwargs.get("generator") is not None:
                return func(*args, **kwargs)
            return func(*args, **{**kwargs, "generator": self.generator(device)})
        variant = _generator_variant(func)
        if variant is not None:
            bound = dict(zip(names, args))
            bound.update(kwargs)
            bound["generator"] = self.generator(device)
            return variant(**bound)
        # No generator overload: seed the global generator from ours, under a lock.
        sub_seed = int(torch.randint(0, 2**62, (1,), generator=self.generator(torch.device("cpu"))))
        cuda = device.type == "cuda"
        with _FALLBACK_LOCK, torch.random.fork_rng(devices=[device] if cuda else []):
            # seed exactly what fork_rng restores: the CPU's and this device's generators
            # (torch.manual_seed would reseed every GPU and leave the others changed)
            torch.default_generator.manual_seed(sub_seed)
            if cuda:
                index = torch.cuda.current_device() if device.index is None else device.index
                torch.cuda.default_generators[index].manual_seed(sub_seed)
            return func(*args, **kwargs)

    def _dropout(self, input: torch.Tensor, p: float, train: bool | None = None) -> Any:
        if train is False or p == 0:
            return input.clone(), torch.ones_like(input, dtype=torch.bool)
        keep = 1.0 - p
        mask = torch.empty_like(input, dtype=torch.bool).bernoulli_(
            keep, generator=self.generator(input.device)
        )
        scale = 1.0 / keep if keep > 0 else 0.0
        return input * mask * scale, mask


_warm = False


def warm_up() -> None:
    """Pay the one-time cost of the first dispatch mode (PyTorch imports its compiler stack,
    ~1-2 s) now, in the calling thread, rather than inside a stage's first action where it
    would count against the pipeline's timeouts."""
    global _warm
    if not _warm:
        with KeyedRandom(0):
            torch.empty(1).uniform_()
        _warm = True


@contextlib.contextmanager
def keyed(seed: int, step: int, microbatch: int, layer: int) -> Iterator[KeyedRandom]:
    """Run the body with random ops drawing from the stream keyed by the four numbers."""
    mode = KeyedRandom(derive_seed(seed, step, microbatch, layer))
    _tls.regions = getattr(_tls, "regions", 0) + 1
    prev, _tls.full_mode = getattr(_tls, "full_mode", None), mode
    try:
        with mode:
            yield mode
    finally:
        _tls.regions -= 1
        _tls.full_mode = prev


class _CpuDropout(TorchFunctionMode):
    """``F.dropout`` of one plain ``nn.Dropout`` call on a CPU tensor, drawn from a keyed
    region's generator without the dispatch mode (which costs ~0.1 ms per ATen op here, a
    third of the dropout itself). It issues the ops ATen's CPU dropout decomposes into — a
    float noise tensor ``bernoulli_(1 - p)``, ``div_(1 - p)``, ``input * noise`` — so mask,
    output and graph are bit for bit those of :class:`KeyedRandom`, which a layer's first run
    and the independent reference use (``tests/stage/test_rng.py``)."""

    def __init__(self, keyed: KeyedRandom) -> None:
        super().__init__()
        self.keyed = keyed

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if func is not _F_DROPOUT:
            return func(*args, **kwargs)
        x, p = args[0], float(args[1] if len(args) > 1 else kwargs.get("p", 0.5))
        self.keyed.used = True
        noise = torch.empty_like(x).bernoulli_(1 - p, generator=self.keyed.generator(x.device))
        noise.div_(1 - p)
        return x * noise


_F_DROPOUT = torch.nn.functional.dropout


def _fast(module: nn.Module, args: Any) -> bool:
    """Whether this call is one :class:`_CpuDropout` draws: a plain ``nn.Dropout`` in training
    mode, not in place, with ``0 < p < 1``, on one non-empty CPU floating-point tensor."""
    if type(module) is not nn.Dropout or module.inplace or not module.training:
        return False
    x = args[0] if len(args) == 1 else None
    return (
        isinstance(x, torch.Tensor)
        and x.device.type == "cpu"
        and x.is_floating_point()
        and x.numel() > 0
        and 0.0 < module.p < 1.0
    )


def module_mode(mode: KeyedRandom, module: nn.Module, args: Any) -> Any:
    """The context in which random ``module``'s call on ``args`` draws from ``mode``'s
    generator: ``mode`` itself, or, for a plain CPU ``nn.Dropout``, the cheaper function mode
    that draws the same bits."""
    return _CpuDropout(mode) if _fast(module, args) else mode


def in_region() -> bool:
    """Whether this thread runs inside a keyed region (:func:`keyed`, :func:`keyed_modules`,
    :func:`region`)."""
    return bool(getattr(_tls, "regions", 0))


@contextlib.contextmanager
def region() -> Iterator[None]:
    """Count the body as a keyed region: hooked random modules in it do not ask for a replay
    (the caller has entered the mode they draw from)."""
    _tls.regions = getattr(_tls, "regions", 0) + 1
    try:
        yield
    finally:
        _tls.regions -= 1


@contextlib.contextmanager
def recording(draws: dict) -> Iterator[None]:
    """Record into ``draws``, for each hooked random module call of the body inside a keyed
    region, the state of the region's generator just before it, under ``(layer index,
    id(module))``: what a layer's own checkpoint needs to recompute the call with the same
    draws (:func:`gpipe.stage.rng_replay.replay`)."""
    prev, _tls.draws = getattr(_tls, "draws", None), draws
    try:
        yield
    finally:
        _tls.draws = prev


def _draws(module: nn.Module) -> bool:
    return module.training and getattr(module, "p", 1) != 0


def input_device(args: Any) -> torch.device:
    """The device of a module call's first argument (CPU when it is not a tensor): the device
    whose generator the call draws from."""
    x = args[0] if args else None
    return x.device if isinstance(x, torch.Tensor) else torch.device("cpu")


def _pre_hook(
    module: nn.Module,
    args: Any,
    index: int | None = None,
    replay: Callable[[nn.Module, Any, int | None], Any] | None = None,
) -> None:
    depth = getattr(_tls, "known_depth", 0)
    _tls.known_depth = depth + 1
    if depth:
        return
    entered = None
    mode = getattr(_tls, "module_mode", None)
    region = mode or getattr(_tls, "full_mode", None)
    if getattr(_tls, "regions", 0):
        draws = getattr(_tls, "draws", None)
        if draws is not None and index is not None and region is not None and _draws(module):
            state = region.generator(input_device(args)).get_state()
            draws.setdefault((index, id(module)), []).append(state)
        if mode is not None:
            entered = module_mode(mode, module, args)
    elif replay is not None and _draws(module):  # outside every region: a recompute?
        entered = replay(module, args, index)
    if entered is not None:
        entered.__enter__()
    _tls.entered = entered


def _post_hook(module: nn.Module, args: Any, output: Any) -> None:
    _tls.known_depth -= 1
    entered = getattr(_tls, "entered", None)
    if _tls.known_depth == 0 and entered is not None:
        entered.__exit__(None, None, None)
        _tls.entered = None


def install_hooks(
    layer: nn.Module,
    index: int | None = None,
    replay: Callable[[nn.Module, Any, int | None], Any] | None = None,
) -> list[Any]:
    """Hook every :data:`RANDOM_MODULES` instance inside ``layer`` (the model's layer
    ``index``); returns the handles. A call outside every keyed region asks ``replay(module,
    args, index)`` for the context it draws in (:func:`gpipe.stage.rng_replay.replay`: a recompute
    by the layer's own checkpoint draws its forward's numbers again; ``None``: as usual).

    The hooks do nothing outside keyed regions and backwards but count nesting depth, which
    lets the full mode tell whether a layer draws random numbers anywhere else.
    """
    handles = []
    pre = functools.partial(_pre_hook, index=index, replay=replay)
    for m in layer.modules():
        if isinstance(m, RANDOM_MODULES):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(_post_hook, always_call=True))
    return handles


@contextlib.contextmanager
def keyed_modules(seed: int, step: int, microbatch: int, layer: int) -> Iterator[KeyedRandom]:
    """Like :func:`keyed`, but the mode is active only inside hooked random modules."""
    mode = KeyedRandom(derive_seed(seed, step, microbatch, layer))
    prev = getattr(_tls, "module_mode", None)
    _tls.module_mode = mode
    _tls.regions = getattr(_tls, "regions", 0) + 1
    try:
        yield mode
    finally:
        _tls.module_mode = prev
        _tls.regions -= 1
