"""Per-layer cost of a sequential model, inferred on fake tensors (the paper's FPropMeta).

:func:`profile` walks the layers as ``nn.Sequential`` would (``layer_0(*inputs)``, then
``layer_{i+1}(out_i)``, a tuple output is not unpacked) and reports for each layer its forward
and backward FLOPs, parameter/buffer/output bytes, output shapes and dtypes, and whether its
forward draws random numbers. Inputs, parameters and buffers are swapped for fake tensors
(``torch._subclasses.fake_tensor``) and FLOPs are counted with
``torch.utils.flop_counter.FlopCounterMode``, so a model built on the meta device and larger
than memory is profiled in seconds.

The invariant: profiling never materializes a tensor and never changes the layers or the
inputs — parameters, buffers and ``training`` flags are the same objects with the same values
afterwards, and every computation happened on fake tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from gpipe.base.compiling import refuse_compiling
from gpipe.base.microbatch import tree_flatten, tree_unflatten
from gpipe.stage.wgrad_kinds import splittable

__all__ = ["LayerCost", "profile", "summarize"]


@dataclass(frozen=True)
class LayerCost:
    """What one layer costs for one sample input; all sizes in FLOPs or bytes."""

    name: str  # the layer's name in the sequence ("0", "1", ... or the nn.Sequential child name)
    flops: int  # forward FLOPs (FlopCounterMode: (m,k)x(k,n) matmul = 2mkn)
    backward_flops: int  # FLOPs of the backward w.r.t. inputs and parameters needing grad
    param_bytes: int  # bytes of the layer's distinct parameters
    buffer_bytes: int  # bytes of the layer's distinct buffers
    activation_bytes: int  # bytes of all tensors in the layer's output
    out_shapes: tuple  # shape of each output tensor, in pytree order, as a tuple of ints
    out_dtypes: tuple  # dtype of each output tensor, matching ``out_shapes``
    random: bool  # True if the forward called a random op (dropout, rand, randn, ...)
    # bytes of the distinct tensors the forward's autograd graph saves for backward, the
    # layer's own parameters and buffers excluded (what a micro-batch keeps alive without remat)
    saved_bytes: int = 0
    # bytes a split backward keeps from B to W (gpipe.stage.wgrad): each standard module call's input
    # and output gradient (the output's size), once B has freed the graph
    deferred_bytes: int = 0


class _SeededOps(TorchDispatchMode):
    """Remembers whether any op tagged ``nondeterministic_seeded`` (a random op) ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.nondeterministic_seeded in func.tags:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _named_layers(layers: nn.Module | Sequence[Any]) -> list[tuple[str, Callable[..., Any]]]:
    if isinstance(layers, nn.Sequential):
        return list(layers.named_children())
    if isinstance(layers, nn.Module):
        raise TypeError(
            f"profile() takes an nn.Sequential or a sequence of layers, got a single "
            f"{type(layers).__name__}; wrap it: profile([module], ...)"
        )
    out = []
    for i, layer in enumerate(layers):
        if not callable(layer):
            raise TypeError(f"layer {i} is a {type(layer).__name__}, not an nn.Module or callable")
        out.append((str(i), layer))
    return out


def _state(layer: Any) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of ``layer`` by name, shared ones under each of their names."""
    if not isinstance(layer, nn.Module):
        return {}
    state = dict(layer.named_parameters(remove_duplicate=False))
    state.update(layer.named_buffers(remove_duplicate=False))
    return state


def _distinct_bytes(tensors: Any) -> int:
    seen: dict[int, torch.Tensor] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return sum(t.numel() * t.element_size() for t in seen.values())


def _needs_grad_dtype(t: torch.Tensor) -> bool:
    return t.is_floating_point() or t.is_complex()


def _tensors(obj: Any) -> list[torch.Tensor]:
    return [leaf for _, leaf in tree_flatten(obj)[0] if isinstance(leaf, torch.Tensor)]


def _non_leaf(x: Any) -> Any:
    return x.clone() if isinstance(x, torch.Tensor) and x.requires_grad else x


def _shapes(obj: Any) -> str:
    leaves = tree_flatten(obj)[0]
    parts = [
        f"{path}: {tuple(leaf.shape)} {leaf.dtype}"
        for path, leaf in leaves
        if isinstance(leaf, torch.Tensor)
    ]
    return "; ".join(parts) or "no tensors"


class _Faker:
    """Turns real, meta or foreign fake tensors into fake tensors of one mode, memoized by id."""

    def __init__(self, device: torch.device | None) -> None:
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.device = device  # None: keep each tensor's device
        self._memo: dict[int, torch.Tensor] = {}

    def __call__(self, t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        key = id(t)
        if key not in self._memo:
            self._memo[key] = self._convert(t, requires_grad)
        return self._memo[key]

    def _convert(self, t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        requires_grad = requires_grad and _needs_grad_dtype(t)
        device = self.device or t.device
        if isinstance(t, FakeTensor) and t.fake_mode is self.mode and t.device == device:
            fake = t
        elif isinstance(t, FakeTensor) or t.device != device:
            with self.mode:  # a factory under the fake mode allocates nothing
                fake = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
        else:
            fake = self.mode.from_tensor(t)
        with self.mode:
            fake = fake.detach()
        return fake.requires_grad_(requires_grad)

    def leaf(self, t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
        """A fresh fake leaf like ``t`` (not memoized: each layer gets its own input leaves)."""
        return self._convert(t, requires_grad)


def _common_device(tensors: list[torch.Tensor]) -> torch.device | None:
    """``None`` (keep devices) when all tensors share one device, else ``meta``."""
    devices = {t.device for t in tensors}
    return None if len(devices) <= 1 else torch.device("meta")


def profile(
    layers: nn.Module | Sequence[Any],
    *sample_inputs: Any,
    train: bool = True,
    input_grad: bool = True,
) -> list[LayerCost]:
    """Costs of each layer of ``layers`` for ``sample_inputs``, inferred on fake tensors.

    ``layers`` is an ``nn.Sequential`` or a sequence of modules (plain callables are allowed and
    have no parameters). ``sample_inputs`` may be real, meta or fake tensors in any pytree;
    non-tensors pass through unchanged. When the inputs, parameters and buffers do not all sit
    on one device (e.g. a model on ``meta`` and a CPU sample), everything is faked on ``meta``.

    ``train`` sets the layers' mode during profiling (dropout then counts as random); the modes
    are restored afterwards. The backward is traced against the layer's float inputs and its
    parameters that require grad; ``input_grad=False`` makes the first layer's inputs not need a
    gradient (e.g. for images at the start of a pipeline). A later layer's input needs one when
    the previous layer's output does. ``backward_flops`` is 0 when no output needs a gradient,
    and ``2 * flops`` when the backward cannot be traced on fake tensors.

    Raises ``RuntimeError`` naming the layer, its index and its input shapes when a layer's
    forward fails on fake tensors (the original error is chained), and
    :class:`gpipe.base.compiling.CompileError` when ``torch.compile`` traces the call (profiling
    under dynamo crashes the process).
    """
    refuse_compiling("gpipe.planner.cost.profile")
    named = _named_layers(layers)
    all_tensors = _tensors(sample_inputs)
    for _, layer in named:
        all_tensors.extend(_state(layer).values())
    faker = _Faker(_common_device(all_tensors))

    def first_input(t: Any) -> Any:
        return faker.leaf(t, input_grad) if isinstance(t, torch.Tensor) else t

    leaves, rebuild = tree_flatten(sample_inputs)
    args = tree_unflatten(rebuild, [first_input(leaf) for _, leaf in leaves])

    costs = []
    for index, (name, layer) in enumerate(named):
        cost, out = _profile_layer(index, name, layer, args, faker, train)
        costs.append(cost)
        out_leaves, out_rebuild = tree_flatten(out)
        next_leaves = [
            faker.leaf(leaf, leaf.requires_grad) if isinstance(leaf, torch.Tensor) else leaf
            for _, leaf in out_leaves
        ]
        args = (tree_unflatten(out_rebuild, next_leaves),)
    return costs


def _profile_layer(
    index: int,
    name: str,
    layer: Any,
    args: tuple,
    faker: _Faker,
    train: bool,
) -> tuple[LayerCost, Any]:
    state = _state(layer)
    fake_state = {k: faker(v, v.requires_grad) for k, v in state.items()}
    modes = [(m, m.training) for m in layer.modules()] if isinstance(layer, nn.Module) else []
    seeded = _SeededOps()
    saved = _SavedTensors({_storage_key(t) for t in fake_state.values()})
    # The layer sees non-leaf copies of its input leaves, as inside nn.Sequential, so that
    # in-place layers (ReLU(inplace=True)) work; the clone's backward costs no FLOPs.
    leaves, rebuild = tree_flatten(args)
    with faker.mode:
        call_args = tree_unflatten(rebuild, [_non_leaf(leaf) for _, leaf in leaves])
    deferred = [0]
    hooks = []
    if isinstance(layer, nn.Module):
        for m in layer.modules():
            if splittable(m) and any(p.requires_grad for p in m.parameters(recurse=False)):
                hooks.append(m.register_forward_hook(_deferred_counter(deferred)))
    try:
        if isinstance(layer, nn.Module):
            layer.train(train)
        with (
            torch.enable_grad(),
            faker.mode,
            seeded,
            torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack),
            FlopCounterMode(display=False) as forward_counter,
        ):
            if isinstance(layer, nn.Module):
                out = functional_call(layer, fake_state, call_args)
            else:
                out = layer(*call_args)
    except Exception as e:
        kind = type(layer).__name__
        raise RuntimeError(
            f"cost.profile: layer {index} ({name!r}, {kind}) failed on fake tensors with inputs "
            f"[{_shapes(args)}]: {type(e).__name__}: {e}. Check that the previous layer's "
            f"output (or the sample input) has the shapes and dtypes this layer expects; a layer "
            f"whose control flow reads tensor values (.item(), data-dependent shapes) cannot be "
            f"profiled without data."
        ) from e
    finally:
        for m, was_training in modes:
            m.training = was_training
        for h in hooks:
            h.remove()
    flops = forward_counter.get_total_flops()

    outs = _tensors(out)
    grad_outs = [t for t in outs if t.requires_grad]
    backward_flops = 0
    if grad_outs:
        try:
            with torch.enable_grad(), faker.mode:
                ones = [torch.ones_like(t) for t in grad_outs]
                with FlopCounterMode(display=False) as backward_counter:
                    torch.autograd.backward(grad_outs, ones)
            backward_flops = backward_counter.get_total_flops()
        except Exception:  # an op without a fake backward: assume the usual 2x forward
            backward_flops = 2 * flops

    is_module = isinstance(layer, nn.Module)
    params = layer.parameters() if is_module else ()
    buffers = layer.buffers() if is_module else ()
    cost = LayerCost(
        name=name,
        flops=int(flops),
        backward_flops=int(backward_flops),
        param_bytes=_distinct_bytes(params),
        buffer_bytes=_distinct_bytes(buffers),
        activation_bytes=sum(t.numel() * t.element_size() for t in outs),
        out_shapes=tuple(tuple(int(s) for s in t.shape) for t in outs),
        out_dtypes=tuple(t.dtype for t in outs),
        random=bool(seeded.seen),
        saved_bytes=sum(saved.storages.values()),
        deferred_bytes=deferred[0],
    )
    return cost, out


def _deferred_counter(total: list[int]) -> Callable[..., None]:
    """A forward hook adding a standard module call's input and output bytes to ``total[0]``:
    what :mod:`gpipe.stage.wgrad` keeps of that call from ``B`` to ``W``."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if args and isinstance(args[0], torch.Tensor) and isinstance(output, torch.Tensor):
            x = args[0]
            total[0] += x.numel() * x.element_size() + output.numel() * output.element_size()

    return hook


def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class _SavedTensors:
    """``saved_tensors_hooks`` that note the bytes of each distinct storage a forward saves,
    skipping ``exclude`` (the layer's parameters and buffers, counted elsewhere)."""

    def __init__(self, exclude: set[int]) -> None:
        self.exclude = exclude
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in self.exclude:
            self.storages[key] = t.untyped_storage().nbytes()
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


# ----------------------------------------------------------------------------- summary


def _si(n: float, unit: str) -> str:
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(n) < 1000 or prefix == "P":
            return f"{n:.0f} {unit}" if prefix == "" else f"{n:.1f} {prefix}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _iec(n: float) -> str:
    for prefix in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or prefix == "TiB":
            return f"{n:.0f} {prefix}" if prefix == "B" else f"{n:.1f} {prefix}"
        n /= 1024
    raise AssertionError("unreachable")


def summarize(costs: Sequence[LayerCost]) -> str:
    """A plain-text table of ``costs``, one row per layer and a total row, in readable units."""
    header = ("#", "name", "fwd", "bwd", "params", "buffers", "output", "out shape", "rand")
    rows = [
        (
            str(i),
            c.name,
            _si(c.flops, "FLOP"),
            _si(c.backward_flops, "FLOP"),
            _iec(c.param_bytes),
            _iec(c.buffer_bytes),
            _iec(c.activation_bytes),
            ", ".join("x".join(map(str, s)) or "scalar" for s in c.out_shapes) or "-",
            "yes" if c.random else "",
        )
        for i, c in enumerate(costs)
    ]
    rows.append(
        (
            "",
            "total",
            _si(sum(c.flops for c in costs), "FLOP"),
            _si(sum(c.backward_flops for c in costs), "FLOP"),
            _iec(sum(c.param_bytes for c in costs)),
            _iec(sum(c.buffer_bytes for c in costs)),
            _iec(sum(c.activation_bytes for c in costs)),
            "",
            "",
        )
    )
    widths = [max(len(r[j]) for r in (header, *rows)) for j in range(len(header))]
    left = {1, 7}  # name and shape read left-aligned, numbers right-aligned

    def line(r: Sequence[str]) -> str:
        cells = [r[j].ljust(w) if j in left else r[j].rjust(w) for j, w in enumerate(widths)]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(r) for r in rows[:-1]), rule, line(rows[-1])])
