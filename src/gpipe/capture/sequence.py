"""The layer sequence a pipe cuts, from whatever the user gave: an ``nn.Sequential``, a list of
modules, or any ``nn.Module`` captured on a sample (:func:`gpipe.capture.capture`).

Both pipes and the planner read a model through these functions, so the three see the same
layers in the same order, bind a call's arguments the same way and name a mistake once. The
invariant: a module listed twice runs twice (nothing is silently dropped), and a captured
model's layers are checked against the model as it is *now* before every call
(:class:`Follower`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from gpipe.base.snapshot import Snapshot
from gpipe.capture import Sample, capture
from gpipe.capture.segment import CapturedLayers
from gpipe.nn import convert_deferred_batch_norm_in

__all__ = [
    "Follower",
    "bind_inputs",
    "container",
    "front",
    "layers_of",
    "mode_of",
    "model_keys",
    "step_inputs",
]


def front(
    module: Any,
    who: str = "Pipe",
    *,
    sample: Any = None,
    split_points: str | Sequence[str] | None = None,
    batch_dim: int = 0,
    deferred_batch_norm: bool = False,
) -> Any:
    """What a pipe cuts: ``module`` itself when it is a sequence of layers (an
    ``nn.Sequential`` or a list), else the model captured on ``sample`` and cut into layers
    (:func:`gpipe.capture.capture`; also for a sequence given ``split_points``); with
    ``deferred_batch_norm``, its BatchNorms replaced by :class:`gpipe.nn.DeferredBatchNorm`
    first (in the user's own container)."""

    if deferred_batch_norm:
        module = convert_deferred_batch_norm_in(module)

    if isinstance(module, CapturedLayers):
        return module
    sequential = isinstance(module, (nn.Sequential, list, tuple, nn.ModuleList))
    if sequential and not split_points:
        return module
    if not isinstance(module, nn.Module):
        return module  # layers_of names the mistake
    if sample is None:
        what = "split_points" if sequential else f"a {type(module).__name__}"
        raise TypeError(
            f"{who} got {what}, so it captures the model as a graph and needs an example "
            f"call: pass sample=<inputs> (a tensor, a tuple of arguments, a dict of keyword "
            "arguments or gpipe.capture.Sample(*args, **kwargs)); or give an nn.Sequential"
        )
    return capture(module, sample, split_points=split_points, batch_dim=batch_dim)


def mode_of(module: Any) -> bool:
    """The mode a pipe starts in: the wrapped model's (a list of layers: train unless every
    layer is in eval mode). The layers keep their own modes until ``pipe.train()`` or
    ``pipe.eval()``."""
    if isinstance(module, nn.Module):
        return module.training
    return any(getattr(m, "training", True) for m in module)


class Follower:
    """What a pipe calls before each call, ``follow(who)``: refuse (naming the place) when a
    layer was replaced in the pipe's container or the user's sequence, or a captured model
    no longer holds the objects its graphs run; make a captured model's graphs those of the
    modes it is in now (:meth:`gpipe.capture.CapturedLayers.select`). :meth:`train` sets the
    mode of the whole captured model (a pipe whose children are only some of its layers)."""

    def __init__(self, module: Any, layers: Any) -> None:

        self._snapshot = Snapshot("model" if layers is module else "pipe.layers")
        for name in layers._modules if isinstance(layers, nn.Module) else ():
            self._snapshot.add(layers, name, name)
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and not isinstance(
            module, CapturedLayers
        ):
            user = Snapshot("model")
            for name in module._modules:
                user.add(module, name, name)
            self._snapshot.merge(user)
        self._captured = layers if isinstance(layers, CapturedLayers) else None

    def __call__(self, who: str) -> None:
        self._snapshot.check(who)
        if self._captured is not None:
            self._captured.prepare(who)

    def train(self, mode: bool) -> None:
        """Set a captured model's mode everywhere (its segments and the model itself)."""
        if self._captured is not None:
            self._captured.train(mode)


def model_keys(module: Any) -> Any:
    """A captured model's own ``state_dict`` keys (:class:`gpipe.capture.segment.ModelKeys`)
    for a holder of its segments; ``None`` for a sequence, whose keys are already the
    model's."""

    return module.keys if isinstance(module, CapturedLayers) else None


def container(module: Any, named: Sequence[tuple[str, nn.Module]]) -> nn.Sequential:
    """The ``nn.Sequential`` a pipe holds its layers in: a captured model's own (its
    ``state_dict`` has the model's keys), else a new one of ``named``."""

    if isinstance(module, CapturedLayers):
        return module
    seq = nn.Sequential()
    for name, layer in named:
        seq.add_module(name, layer)
    return seq


def bind_inputs(layers: nn.Module, args: tuple, kwargs: dict, who: str = "Pipe") -> tuple:
    """A call's arguments as the first layer's inputs: a captured model's flattening of
    ``(args, kwargs)``; for a sequence, ``args`` (keyword arguments are refused)."""

    if isinstance(layers, CapturedLayers):
        return layers.bind(tuple(args), dict(kwargs))
    if kwargs:
        raise TypeError(
            f"{who} got keyword arguments {sorted(kwargs)}, but its first layer takes the "
            "positional inputs; give the model with sample=... (captured, keywords allowed) "
            "or pass them positionally"
        )
    return tuple(args)


def step_inputs(layers: nn.Module, inputs: Any) -> tuple:
    """``step``'s ``inputs`` as the first layer's inputs: ``(inputs,)``; for a captured model
    a :class:`gpipe.capture.Sample` gives its positional and keyword arguments."""

    if isinstance(layers, CapturedLayers):
        if isinstance(inputs, Sample):
            return layers.bind(tuple(inputs.args), dict(inputs.kwargs))
        return layers.bind((inputs,), {})
    return (inputs,)


def layers_of(
    module: nn.Module | Sequence[nn.Module], who: str = "Pipe"
) -> list[tuple[str, nn.Module]]:
    """The layers in the order ``module`` runs them, as ``(name, module)``.

    A module that appears twice is listed twice (``named_children`` would list it once and
    silently drop a layer); an ``nn.Sequential``'s names are kept, a list's are its indices.
    """
    if isinstance(module, nn.Sequential):
        named = [(n, m) for n, m in module._modules.items() if m is not None]
    elif isinstance(module, (list, tuple, nn.ModuleList)):
        for i, m in enumerate(module):
            if not isinstance(m, nn.Module):
                raise TypeError(
                    f"layer {i} is {type(m).__name__} {m!r}, not an nn.Module; wrap it in a "
                    "module (e.g. nn.ReLU() for torch.relu)"
                )
        named = [(str(i), m) for i, m in enumerate(module)]
    else:
        raise TypeError(
            f"{who} needs an nn.Sequential (or a list of modules), got {type(module).__name__}; "
            "wrap your layers in nn.Sequential so they can be cut into stages, or capture the "
            "model: gpipe.Pipe(model, sample=<inputs>) or gpipe.capture.capture(model, sample)"
        )
    if not named:
        raise ValueError(f"{who} needs at least one layer")
    return named
