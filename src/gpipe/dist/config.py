"""A distributed pipe's options: checked on this rank, then described as plain data.

:func:`configure` checks this rank's arguments with the same words as :class:`gpipe.Pipe`
(:mod:`gpipe.base.options`, :mod:`gpipe.core.plan`) and derives K, D, V, the device and the tie groups,
with no collective; :func:`fingerprint` is what every rank must hold equal
(:func:`gpipe.dist.agree.check` compares it before any group is created).

The invariant: configuration reads only this rank's arguments and the world size, so ranks
given the same arguments derive the same pipeline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from gpipe.base import options

from gpipe.capture import sequence
from gpipe.core import plan
from gpipe.stage import remat as remat_mod
from gpipe.dist.layout import Layout, default_device, resolve_counts
from gpipe.core.materialize import _param_slots, _tie_groups
from gpipe.base.microbatch import tree_flatten
from gpipe.dist import agree
from gpipe.schedules import Schedule, ScheduleSpec

if TYPE_CHECKING:
    from gpipe.dist.pipe import DistributedPipe

__all__ = ["configure", "fingerprint"]


def configure(
    pipe: DistributedPipe,
    module: nn.Module | Sequence[nn.Module],
    stages: int | None,
    balance: Sequence[int] | None,
    chunks: int | None,
    micro_batch_size: int | None,
    schedule: str | Schedule,
    virtual_stages: int | None,
    remat: str,
    seed: int,
    pinned: int,
    device: torch.device | str | None,
    timeout: float,
    data_parallel: int | None,
    tied: Sequence[Sequence[str]],
    batch_dim: int,
    backend: str,
) -> Sequence[int] | None:
    """Check this rank's arguments and derive K, D, V, the device and the tie groups (no
    collective: :func:`gpipe.dist.agree.check` runs after this on every rank); the balance
    to cut by (``balance``, else the one a captured model's split points force)."""
    pipe._timeout = options.seconds("timeout", timeout)
    pipe._named = sequence.layers_of(module, "DistributedPipe")
    pipe.fetch_names = options.names("fetch", pipe._fetch_arg)
    pipe._fetch_at = plan.fetch_points(pipe._named, pipe.fetch_names)
    if chunks is None and micro_batch_size is None:
        raise ValueError("give chunks= (micro-batches per step) or micro_batch_size=")
    pipe._chunks = None if chunks is None else options.count("chunks", chunks)
    pipe._mbs = (
        None if micro_batch_size is None else options.count("micro_batch_size", micro_batch_size)
    )
    pipe._batch_dim = options.integer("batch_dim", batch_dim)
    pipe._remat = remat_mod.check_mode(remat)
    pipe._seed = options.integer("seed", seed)
    pipe._pinned = options.count("pinned", pinned, minimum=0)

    # --- schedule, K, V
    pipe._spec = ScheduleSpec(schedule, virtual_stages)
    pipe._schedule_name = pipe._spec.name
    v, k_sched = pipe._spec.virtual_stages, pipe._spec.num_devices
    pipe._v = v
    balance = plan.cut_by(module, balance, stages=stages, virtual_stages=v, auto=False)
    world = dist.get_world_size(pipe._pg)
    k, d = resolve_counts(
        world, stages, k_sched, data_parallel, balance, v, len(pipe._named), pipe._pinned
    )
    pipe._layout = Layout(pipe.rank, k, d, v, pipe._spec.placement(k))
    pipe.num_devices, pipe.data_parallel = k, d
    pipe.pipeline_device, pipe.replica = pipe._layout.pipeline_device, pipe._layout.replica

    # --- device
    given = None if device is None else options.device(device, "device=")
    pipe.device = default_device(backend, os.environ) if given is None else given
    if pipe.device.type == "cuda":
        torch.cuda.set_device(pipe.device)  # NCCL and this rank's kernels use this GPU

    # --- ties (names validated now, groups resolved at build)
    pipe._tied = [tuple(t) for t in _tie_lists(tied)]
    pipe._slots = _param_slots(pipe._named)
    pipe._tie_groups = _tie_groups(pipe._slots, pipe._tied)
    return balance


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


def fingerprint(
    pipe: DistributedPipe, balance: Sequence[int] | None, sample: Any, captured: bool = False
) -> dict[str, Any]:
    """Everything that defines this rank's model and schedule, as plain data: all ranks
    must hold the same (see :mod:`gpipe.dist.agree`). The sample counts where it is used:
    a ``captured`` model was captured on it, and without a balance it is balanced on it."""
    fixed = pipe._spec.fixed
    used = captured or balance is None
    return {
        "layers": [f"{n!r}: {agree.layer_signature(m)}" for n, m in pipe._named],
        "stages": pipe.num_devices,
        "data_parallel": pipe.data_parallel,
        "balance": None if balance is None else [int(b) for b in balance],
        "sample": None if not used else "none" if sample is None else sample_signature(sample),
        "chunks": pipe._chunks,
        "micro_batch_size": pipe._mbs,
        "schedule": pipe._schedule_name,
        "the custom schedule's actions": None
        if fixed is None
        else f"hash {agree.schedule_digest(fixed.actions)} (M={fixed.num_microbatches})",
        "virtual_stages": pipe._v,
        "remat": pipe._remat,
        "seed": pipe._seed,
        "pinned": pipe._pinned,
        "batch_dim": pipe._batch_dim,
        "batch": pipe.batch,
        "tied parameters": [list(grp) for grp in pipe._tie_groups],
    }
