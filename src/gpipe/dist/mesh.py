"""A :class:`~torch.distributed.device_mesh.DeviceMesh` around a distributed pipeline, and the
user's ``parallelize`` applied to each stage on this rank.

A mesh names its dimensions; ``"pp"`` (required) is the pipeline, ``"dp"`` (optional) the
data-parallel replicas, any other dimension (``"tp"``, ...) is the user's own, inside the
stages. The pipe's process group is this rank's slice of the mesh over ``("dp", "pp")``: the
ranks that share this rank's coordinates on every other dimension. Its group rank must be
``replica · K + pipeline device`` (:mod:`gpipe.dist.layout`), so ``"dp"`` must come before
``"pp"`` in the mesh's dimensions; any mismatch is refused by name before a group is created.

The invariant: every rank of one pipeline sees the same mesh, the pipe's process group holds
exactly the ranks of this rank's ``("dp", "pp")`` slice in the layout's order, and
``parallelize(stage_module, mesh)`` runs once per stage on this rank, after its layers are
built and the replicas' parameters broadcast, before any step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

__all__ = [
    "Parallelize",
    "Siblings",
    "apply_parallelize",
    "check_mesh",
    "check_parallelize",
    "pipe_group",
    "pipe_ranks",
    "stage_modules",
]

Parallelize = Callable[[nn.Module, Any], Any]


def _dims(mesh: DeviceMesh) -> tuple[str, ...]:
    names = mesh.mesh_dim_names
    if not names:
        raise ValueError(
            "DistributedPipe(mesh=...) needs a mesh with named dimensions: build it with "
            "init_device_mesh(device, (pp, tp), mesh_dim_names=('pp', 'tp'))"
        )
    return tuple(names)


def pipe_ranks(mesh: DeviceMesh) -> list[int]:
    """The global ranks of this rank's ``("dp", "pp")`` slice of ``mesh``, in the layout's
    order (replica-major); refuses a mesh without ``"pp"`` or with ``"dp"`` after ``"pp"``."""
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(
            f"mesh must be a torch.distributed DeviceMesh (init_device_mesh(...)), got "
            f"{type(mesh).__name__}"
        )
    names = _dims(mesh)
    if "pp" not in names:
        raise ValueError(
            f"the mesh's dimensions {names} have no 'pp': name the pipeline dimension 'pp' "
            "(mesh_dim_names=('pp', 'tp'), or ('dp', 'pp', 'tp'))"
        )
    if "dp" in names and names.index("dp") > names.index("pp"):
        raise ValueError(
            f"the mesh's dimensions {names} put 'dp' after 'pp'; a pipeline's ranks are "
            "replica-major (rank = replica x stages + pipeline device), so order them "
            "('dp', 'pp', ...)"
        )
    me = mesh.get_coordinate()
    if me is None:
        raise ValueError(f"rank {dist.get_rank()} is not in the mesh {mesh}")
    index = []
    for i, n in enumerate(names):
        index.append(slice(None) if n in ("dp", "pp") else me[i])
    return [int(r) for r in mesh.mesh[tuple(index)].reshape(-1).tolist()]


def check_mesh(
    mesh: DeviceMesh, process_group: Any, stages: int | None, data_parallel: int | None
) -> tuple[int, int]:
    """Refuse, naming the mismatch, a mesh whose ``"pp"``/``"dp"`` sizes differ from
    ``stages``/``data_parallel``, or whose slice is not the pipe's ``process_group``; returns
    the mesh's ``(K, D)``."""
    ranks = pipe_ranks(mesh)
    names = _dims(mesh)
    k = mesh.size(names.index("pp"))
    d = mesh.size(names.index("dp")) if "dp" in names else 1
    if stages is not None and stages != k:
        raise ValueError(
            f"stages={stages} but the mesh's 'pp' dimension has {k} ranks; pass stages={k} "
            "or build the mesh with that many pipeline ranks"
        )
    if data_parallel is not None and data_parallel != d:
        raise ValueError(
            f"data_parallel={data_parallel} but the mesh's 'dp' dimension has {d} ranks "
            f"({'none' if 'dp' not in names else 'dp'}); pass data_parallel={d}"
        )
    if process_group is not None:
        given = sorted(dist.get_process_group_ranks(process_group))
        if given != ranks:
            raise ValueError(
                f"process_group holds ranks {given}, but this rank's ('dp', 'pp') slice of "
                f"the mesh is {ranks}; pass process_group=None with mesh= (the pipe uses the "
                "slice)"
            )
    return k, d


class Siblings:
    """The ``("dp", "pp")`` slices of a mesh, each running its own pipe at the same time.

    ``new_group`` is collective over the whole job (its name is a counter every rank keeps),
    so a slice's pipe cannot create its groups alone: :meth:`new_group` creates, for the
    ranks a pipe asks for, the same group in every sibling slice (rank at position ``i`` of
    this slice -> rank at position ``i`` of that slice), on every rank in one order, and
    returns this rank's.
    """

    def __init__(self, mesh: DeviceMesh) -> None:
        names = _dims(mesh)
        others = [i for i, n in enumerate(names) if n not in ("dp", "pp")]
        kept = [i for i in range(mesh.mesh.dim()) if i not in others]
        mine = pipe_ranks(mesh)
        self.slices = [
            [int(r) for r in row]
            for row in mesh.mesh.permute(*others, *kept).reshape(-1, len(mine)).tolist()
        ]
        self.mine = self.slices.index(mine)

    def new_group(self, ranks: Sequence[int], **kwargs: Any) -> Any:
        """``dist.new_group(ranks, **kwargs)`` for this slice, and its image in every
        sibling slice (``ranks`` are global ranks of this slice)."""
        pos = [self.slices[self.mine].index(r) for r in ranks]
        out = None
        for j, ranks_j in enumerate(self.slices):
            grp = dist.new_group([ranks_j[i] for i in pos], **kwargs)
            if j == self.mine:
                out = grp
        return out


def slice_group(mesh: DeviceMesh, timeout: Any) -> Any:
    """The process group of this rank's ``("dp", "pp")`` slice (every slice's, created on
    every rank in one order)."""
    sib = Siblings(mesh)
    return sib.new_group(sib.slices[sib.mine], timeout=timeout)


def pipe_group(
    mesh: DeviceMesh,
    process_group: Any,
    stages: int | None,
    data_parallel: int | None,
    timeout: float,
) -> Any:
    """The process group a pipe on ``mesh`` runs on: :func:`check_mesh`, then
    :func:`slice_group`."""
    check_mesh(mesh, process_group, stages, data_parallel)
    return slice_group(mesh, timedelta(seconds=timeout))


def stage_modules(named: Sequence[tuple[str, nn.Module]], stages: Sequence[Any]) -> list[nn.Module]:
    """One module per stage of this rank, holding its layers under their names in the full
    model (``"0"``, ``"2"``, ... for an ``nn.Sequential``), so a ``parallelize_module`` plan
    written for the full model names the same layers."""
    out = []
    for st in stages:
        holder = nn.Module()
        for idx, _ in st.layers:
            name, layer = named[idx]
            holder.add_module(name.replace(".", "_"), layer)
        out.append(holder)
    return out


def check_parallelize(parallelize: Any) -> Parallelize | None:
    """``parallelize`` must be ``None`` or a callable ``fn(stage_module, mesh_or_group)``."""
    if parallelize is not None and not callable(parallelize):
        raise TypeError(
            f"parallelize must be a function fn(stage_module, mesh) that parallelizes one "
            f"stage's module (e.g. with parallelize_module or fully_shard), got "
            f"{type(parallelize).__name__} {parallelize!r}"
        )
    return parallelize


def apply_parallelize(
    parallelize: Parallelize, modules: Sequence[nn.Module], mesh_or_group: Any
) -> None:
    """Run ``parallelize(module, mesh_or_group)`` on each stage module of this rank, in stage
    order (alike on every rank of a mesh dimension, as collective setup requires)."""
    for m in modules:
        parallelize(m, mesh_or_group)
