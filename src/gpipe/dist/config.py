"""A distributed pipe's configuration: this rank's arguments checked, then described as plain data.

:func:`configure` takes the options both pipes share (:class:`gpipe.core.options.PipeOptions`,
checked by :func:`gpipe.core.options.pipe_options`, the one function :class:`gpipe.Pipe` uses
too) and checks what only a distributed pipe takes — the world size against the stages and
replicas, the device, the tied names — with no collective, into one frozen
:class:`DistConfig`: the layers, the :class:`~gpipe.dist.layout.Layout` (which pipeline device
runs which stage: the schedule's placement alone), the device and the tie groups.
:func:`fingerprint` is what every rank must hold equal (:func:`gpipe.dist.agree.check`
compares it before any group is created); its options part is
:meth:`PipeOptions.agreed <gpipe.core.options.PipeOptions.agreed>`.

The invariant: configuration reads only this rank's arguments and the world size, so ranks
given the same arguments derive the same pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gpipe.base import options
from gpipe.base.microbatch import tree_flatten
from gpipe.capture import sequence
from gpipe.core import plan
from gpipe.core.materialize import param_slots, tie_groups
from gpipe.core.options import PipeOptions
from gpipe.dist import agree
from gpipe.dist.layout import Layout, default_device, resolve_counts
from gpipe.schedules import Schedule

__all__ = ["DistConfig", "configure", "fingerprint"]


@dataclass(frozen=True)
class DistConfig:
    """A distributed pipe's options, checked on this rank: the layers, the schedule, this
    rank's place in the job (``layout``), its device and the tie groups. Built once by
    :func:`configure` and read by the builders and the step, never changed."""

    options: PipeOptions  # the options both pipes share, checked
    rank: int  # in the pipe's process group
    named: list[tuple[str, nn.Module]]  # the layers, in order
    fetch_at: Any  # the layer after which each fetched name's output is taken
    layout: Layout
    device: torch.device
    slots: Any  # every parameter's (layer, name) slots, for the tie groups
    tie_groups: list[tuple[str, ...]]
    batch: str  # "same" or "per_replica"
    balance: list[int] | None  # the cut given (or forced by split points); None: balance later
    fsdp: bool = False  # each stage sharded over its replicas (gpipe.dist.fsdp)

    @property
    def num_devices(self) -> int:
        """Pipeline devices K."""
        return self.layout.num_devices

    @property
    def data_parallel(self) -> int:
        """Replicas D."""
        return self.layout.data_parallel

    def schedule(self, num_microbatches: int) -> Schedule:
        """The validated schedule for M micro-batches on K devices."""
        return self.options.schedule.get(self.num_devices, num_microbatches)


def configure(
    module: nn.Module | Sequence[nn.Module],
    opts: PipeOptions,
    *,
    rank: int,
    world: int,
    balance: Sequence[int] | None,
    device: torch.device | str | None,
    data_parallel: int | None,
    tied: Sequence[Sequence[str]],
    backend: str,
    batch: str,
    fsdp: bool = False,
) -> DistConfig:
    """Check this rank's distributed arguments and derive K, D, V, the device and the tie
    groups (no collective: :func:`gpipe.dist.agree.check` runs after this on every rank), and
    the balance to cut by (``balance``, else the one a captured model's split points force)."""
    named = sequence.layers_of(module, "DistributedPipe")
    fetch_at = plan.fetch_points(named, list(opts.fetch))

    # --- K, D (V and the placement are the schedule's)
    spec, v, pinned = opts.schedule, opts.virtual_stages, opts.pinned
    balance = plan.cut_by(module, balance, stages=opts.stages, virtual_stages=v, auto=False)
    k, d = resolve_counts(
        world, opts.stages, spec.num_devices, data_parallel, balance, v, len(named), pinned
    )
    layout = Layout(rank, k, d, v, spec.placement(k))

    # --- device
    given = None if device is None else options.device(device, "device=")
    here = default_device(backend, os.environ) if given is None else given
    if here.type == "cuda":
        torch.cuda.set_device(here)  # NCCL and this rank's kernels use this GPU

    # --- ties (names validated now, groups resolved at build)
    slots = param_slots(named)
    return DistConfig(
        options=opts,
        rank=rank,
        named=named,
        fetch_at=fetch_at,
        layout=layout,
        device=here,
        slots=slots,
        tie_groups=tie_groups(slots, [tuple(t) for t in _tie_lists(tied)]),
        batch=batch,
        fsdp=fsdp,
        balance=None if balance is None else [int(b) for b in balance],
    )


def _tie_lists(tied: Any) -> list[Sequence[str]]:
    """``tied=`` as a list of groups of names; a group given as one string (a flat list of
    names, read letter by letter) is refused."""
    if isinstance(tied, str) or any(isinstance(t, str) for t in tied):
        raise TypeError(
            f"tied must be a list of groups of parameter names, e.g. [['0.weight', "
            f"'2.weight']], got {list(tied) if not isinstance(tied, str) else tied!r}; wrap "
            "each group in its own list"
        )
    return list(tied)


def sample_signature(sample: Any) -> str:
    """A sample's structure, and each tensor's shape and dtype (values are not compared)."""
    from gpipe.capture import sample_args

    def leaf(v: Any) -> str:
        if isinstance(v, torch.Tensor):
            shape = "x".join(map(str, v.shape)) or "scalar"
            return f"{shape} {str(v.dtype).removeprefix('torch.')}"
        return f"{type(v).__name__} {repr(v)[:40]}"

    return "; ".join(f"{path}: {leaf(v)}" for path, v in tree_flatten(sample_args(sample))[0])


def fingerprint(config: DistConfig, sample: Any, captured: bool = False) -> dict[str, Any]:
    """Everything that defines this rank's model and schedule, as plain data: all ranks
    must hold the same (see :mod:`gpipe.dist.agree`). The sample counts where it is used:
    a ``captured`` model was captured on it, and without a balance it is balanced on it."""
    c = config
    used = captured or c.balance is None
    return {
        "layers": [f"{n!r}: {agree.layer_signature(m)}" for n, m in c.named],
        "stages": c.num_devices,
        "data_parallel": c.data_parallel,
        "balance": c.balance,
        "sample": None if not used else "none" if sample is None else sample_signature(sample),
        **c.options.agreed(),
        "batch": c.batch,
        "tied parameters": [list(grp) for grp in c.tie_groups],
        "fsdp": c.fsdp,
    }
