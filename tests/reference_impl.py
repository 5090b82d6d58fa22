"""An independent reference for the pipeline's one promise, sharing no code with ``gpipe``.

The promise: a pipelined step equals un-pipelined training of the same model on the same batch,
cut into M micro-batches, where every random op of layer ``i`` on micro-batch ``t`` at training
step ``s`` draws, in order, from one generator seeded by the documented key (see
docs/testing.md)::

    seed = int.from_bytes(blake2b(b"gpipe-rng" + int64_le(seed, step, t, i), 8), "little") >> 1

Everything here is written from that contract, not from the library: the key derivation, the
dispatch mode that hands each random op its generator, the split (``torch.chunk``) and the
merge (``torch.cat``). A bug in ``gpipe.stage.rng`` or ``gpipe.base.microbatch`` therefore shows up as a
difference instead of cancelling out. Tensors only (one input tensor, one target tensor).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Stream", "forward", "step", "stream_seed"]

PREFIX = b"gpipe-rng"


def stream_seed(seed: int, step: int, microbatch: int, layer: int) -> int:
    """The documented 63-bit generator seed of the key (seed, step, micro-batch, layer)."""
    data = PREFIX + struct.pack("<4q", seed, step, microbatch, layer)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


class Stream(TorchDispatchMode):
    """Inside the body, every seeded ATen op draws from one ``torch.Generator`` per device,
    seeded with ``seed``: ops with a ``generator`` argument get it; ``rand``-like ops are sent
    to their ``.generator`` overload. Anything else that would draw raises, so a test can never
    silently compare against the global generator."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.generators: dict[torch.device, torch.Generator] = {}

    def _generator(self, args: tuple, kwargs: dict) -> torch.Generator:
        device = kwargs.get("device")
        if device is None:
            tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
            device = tensors[0].device if tensors else "cpu"
        device = torch.device(device)
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.generators[device]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = dict(kwargs or {})
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return func(*args, **kwargs)
        names = [a.name for a in func._schema.arguments]
        if "dropout_p" in names:  # fused attention: tagged seeded, draws only when p > 0
            i = names.index("dropout_p")
            p = args[i] if i < len(args) else kwargs.get("dropout_p", 0.0)
            if p == 0:
                return func(*args, **kwargs)
        if "generator" in names:
            i = names.index("generator")
            if i < len(args):
                if args[i] is None:
                    args = (*args[:i], self._generator(args, kwargs), *args[i + 1 :])
            elif kwargs.get("generator") is None:
                kwargs["generator"] = self._generator(args, kwargs)
            return func(*args, **kwargs)
        packet = func.overloadpacket
        name = func._overloadname
        variant = "generator" if name == "default" else f"{name}_generator"
        if variant in packet.overloads():
            return getattr(packet, variant)(
                *args, generator=self._generator(args, kwargs), **kwargs
            )
        raise NotImplementedError(f"reference_impl.Stream: no generator form of {func}")


def _chunks(x: torch.Tensor | None, m: int, dim: int) -> list[Any]:
    if x is None:
        return [None] * m
    parts = torch.chunk(x, m, dim=dim)
    assert len(parts) == m and len({p.shape[dim] for p in parts}) == 1, (x.shape, m)
    return list(parts)


def _run(layers: Sequence[nn.Module], x: Any, seed: int, step: int, t: int) -> Any:
    for i, layer in enumerate(layers):
        with Stream(stream_seed(seed, step, t, i)):
            x = layer(x)
    return x


def forward(
    model: nn.Sequential | Sequence[nn.Module],
    x: torch.Tensor,
    *,
    chunks: int = 1,
    seed: int = 0,
    step: int = 0,
    batch_dim: int = 0,
) -> torch.Tensor:
    """The output ``Pipe(model, chunks=chunks, seed=seed)(x)`` has at its ``step``-th
    training call: each micro-batch through every layer in its own stream, concatenated."""
    layers = list(model)
    outs = [_run(layers, mb, seed, step, t) for t, mb in enumerate(_chunks(x, chunks, batch_dim))]
    return torch.cat(outs, dim=batch_dim)


def step(
    model: nn.Sequential | Sequence[nn.Module],
    x: torch.Tensor,
    y: torch.Tensor | None,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    *,
    chunks: int = 1,
    seed: int = 0,
    step: int = 0,
    reduction: str = "mean",
    batch_dim: int = 0,
) -> torch.Tensor:
    """What ``Pipe.step(x, y, loss_fn)`` computes at its ``step``-th training call: the sum of
    the micro-batch losses (divided by M for ``"mean"``), backward once (when grad is enabled).
    Gradients accumulate in ``model``'s parameters; returns the detached loss."""
    layers = list(model)
    xs, ys = _chunks(x, chunks, batch_dim), _chunks(y, chunks, batch_dim)
    scale = 1.0 / chunks if reduction == "mean" else 1.0
    total = sum(loss_fn(_run(layers, xs[t], seed, step, t), ys[t]) * scale for t in range(chunks))
    if torch.is_grad_enabled() and total.requires_grad:
        total.backward()
    return total.detach()
