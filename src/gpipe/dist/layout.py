"""Where every rank of a distributed pipeline sits, and the process groups they share.

With world size ``W`` and ``K`` pipeline devices there are ``D = W // K`` data-parallel
replicas; rank ``r`` is pipeline device ``r % K`` of replica ``r // K``. Ranks ``0..K-1`` form
the first pipeline, ``K..2K-1`` the second, and the ranks ``d, K+d, 2K+d, ...`` hold the same
stages (their *data-parallel group*). Which pipeline device runs stage ``s`` is read through
:meth:`Layout.owner` only: the schedule's placement (``ScheduleSpec.placement``).

The invariant: every rank derives the same :class:`Layout` from the same options, and
:func:`create_groups` creates every group of the job — pipelines, data-parallel groups, the
pipelines' point-to-point groups and the CPU group of each step's agreement — in one fixed
order on every rank, at construction (under NCCL each communicator is also made to exist
then, never lazily in the middle of a step).

Boundary tensors travel on one two-rank group per *directed edge* ``a → b`` (a pipeline
device that sends values to another, :meth:`Layout.edges`): on it ``a`` only sends and ``b``
only receives, both in the channel's order. NCCL runs a communicator's operations in the
order each rank issued them, a receive holding back everything after it on that
communicator; with one communicator per direction of travel, the ``n``-th send always meets
the ``n``-th receive, whatever else either rank has posted ahead (one group for all
directions deadlocks from the second step: each rank's receive posted ahead waits for a
send the other rank queued behind its own receive).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from gpipe.base import options
from gpipe.core import plan
from gpipe.planner import balance as balance_mod

__all__ = [
    "EDGE_TIMEOUT_FACTOR",
    "Groups",
    "Layout",
    "create_groups",
    "default_device",
    "resolve_counts",
]

EDGE_TIMEOUT_FACTOR = 3  # the edge groups' (NCCL watchdog's) timeout, in pipe timeouts


def default_device(backend: str, env: Mapping[str, str]) -> torch.device:
    """This rank's compute device when none is given: under NCCL the GPU ``LOCAL_RANK`` names
    (torchrun sets it), refused without one; otherwise the CPU."""
    if backend != "nccl":
        return torch.device("cpu")
    local = env.get("LOCAL_RANK")
    if local is None or not local.isdigit():
        raise ValueError(
            f"DistributedPipe on NCCL needs this rank's GPU: LOCAL_RANK is {local!r}; launch "
            "with torchrun (which sets it) or pass device=torch.device('cuda', i)"
        )
    return torch.device("cuda", int(local))


def resolve_counts(
    world: int,
    stages: int | None,
    schedule_devices: int | None,
    data_parallel: int | None,
    balance: Sequence[int] | None,
    virtual_stages: int,
    num_layers: int,
    pinned: int,
) -> tuple[int, int]:
    """Pipeline devices ``K`` and replicas ``D`` from the options and the world size ``W``;
    refuses (saying what to change) any combination where ``W != K·D``."""
    v = virtual_stages
    if stages is not None:  # checked with the shared options (gpipe.core.options)
        k = stages
    elif schedule_devices is not None:
        k = schedule_devices
    elif data_parallel is not None:
        if world % options.count("data_parallel", data_parallel):
            raise ValueError(
                f"data_parallel={data_parallel} does not divide the {world} ranks of the "
                f"process group; launch a multiple of {data_parallel} ranks or change "
                "data_parallel="
            )
        k = world // data_parallel
    elif balance is not None:
        if isinstance(balance, (str, bytes)) or not isinstance(balance, Sequence):
            plan.check_balance(balance, num_layers, 1, v, pinned)  # names what is wrong
        k = len(balance) // v
    else:
        k = world
    if data_parallel is not None:
        options.count("data_parallel", data_parallel)
    if k * v > num_layers:  # the model's limit first, as gpipe.Pipe says it
        balance_mod.check_stage_count(num_layers, k, v, pinned)
    if k < 1 or world % k:
        raise ValueError(
            f"{world} ranks cannot form pipelines of {k} devices; the world size must be "
            f"a multiple of stages (W = stages x data_parallel): pass stages= that divides "
            f"{world}, or launch stages x data_parallel ranks"
        )
    d = world // k
    if data_parallel is not None and data_parallel != d:
        raise ValueError(
            f"data_parallel={data_parallel} x stages={k} = {data_parallel * k} ranks, but "
            f"the process group has {world}; launch {data_parallel * k} ranks or change "
            "data_parallel="
        )
    if schedule_devices is not None and schedule_devices != k:
        raise ValueError(
            f"the given schedule is built for {schedule_devices} devices, not {k}; build it "
            f"for {k} devices or pass stages={schedule_devices}"
        )
    if balance is not None:
        plan.check_balance(balance, num_layers, k, v, pinned)
    else:
        balance_mod.check_stage_count(num_layers, k, v, pinned)
    return k, d


@dataclass(frozen=True)
class Layout:
    """This rank's place: ``rank`` (in the pipe's process group) of ``K·D`` ranks."""

    rank: int
    num_devices: int
    data_parallel: int
    virtual_stages: int
    placement: tuple[int, ...]  # stage -> pipeline device: the schedule's (ScheduleSpec.placement)

    @property
    def pipeline_device(self) -> int:
        """The pipeline device ``d`` this rank is (``rank % K``)."""
        return self.rank % self.num_devices

    @property
    def replica(self) -> int:
        """The data-parallel replica ``j`` this rank belongs to (``rank // K``)."""
        return self.rank // self.num_devices

    @property
    def num_stages(self) -> int:
        """(Virtual) stages of one pipeline, ``K·V``."""
        return self.num_devices * self.virtual_stages

    def owner(self, stage: int) -> int:
        """The pipeline device that runs ``stage`` — the one placement rule of this runtime."""
        return self.placement[stage]

    @property
    def first_device(self) -> int:
        """The device that runs stage 0 (it needs the inputs)."""
        return self.owner(0)

    @property
    def last_device(self) -> int:
        """The device that runs the last stage (it needs the targets and has the loss)."""
        return self.owner(self.num_stages - 1)

    def edges(self) -> list[tuple[int, int]]:
        """Every directed edge ``(a, b)`` of the pipeline, sorted: device ``a`` runs a stage
        next to one that device ``b`` runs, so activations or gradients go from ``a`` to
        ``b``."""
        out = set()
        for s in range(self.num_stages - 1):
            a, b = self.owner(s), self.owner(s + 1)
            if a != b:
                out |= {(a, b), (b, a)}
        return sorted(out)

    def replica_ranks(self, process_group: Any) -> list[list[int]]:
        """Global ranks of every replica's pipeline devices: ``[j][d]`` (``new_group`` takes
        global ranks)."""
        k = self.num_devices

        def g(r: int) -> int:
            if process_group is dist.group.WORLD:
                return r
            return dist.get_global_rank(process_group, r)

        return [[g(j * k + dd) for dd in range(k)] for j in range(self.data_parallel)]


@dataclass
class Groups:
    """The process groups one rank uses, and every group the pipe created (to release)."""

    replicas: list[list[int]]  # global ranks, [replica][pipeline device]
    pp: Any  # this replica's pipeline: the collectives over its stages (clip_grad_norm)
    dp: Any | None  # the ranks holding this rank's stages in every replica (None if D == 1)
    p2p: dict[tuple[int, int], Any]  # this replica's group per directed edge (a, b) it is on
    meta: Any | None  # this replica's CPU (gloo) group for message headers (None if K == 1)
    calls: Any | None = None  # every rank's CPU (gloo) group for the step's agreement (W > 1)
    created: list[Any] = field(default_factory=list)


def create_groups(
    layout: Layout,
    process_group: Any,
    timeout: float,
    backend: str,
    comm_device: torch.device,
    new_group: Any = None,
) -> Groups:
    """Create every group of the job, in the same order on every rank (``new_group`` is
    collective): the pipelines (D > 1), the data-parallel groups (D > 1, K > 1), then for each
    replica one point-to-point group per directed edge (:meth:`Layout.edges`, in that order)
    and its gloo header group (K > 1). Under NCCL one all-reduce per new group makes its
    communicator exist now, each rank taking its groups in that one order (so every group's
    members meet at it). ``new_group`` (default ``dist.new_group``) creates each group; a pipe
    on one slice of a mesh passes :meth:`gpipe.dist.mesh.Siblings.new_group`."""
    new_group = new_group or dist.new_group
    k, d = layout.num_devices, layout.data_parallel
    replicas = layout.replica_ranks(process_group)
    td = timedelta(seconds=timeout)
    created: list[Any] = []
    pp, dp = process_group, None
    if d > 1:
        pps = [new_group(r, timeout=td) for r in replicas]
        created += pps
        pp = pps[layout.replica]
        if k > 1:
            dps = [new_group([rep[dd] for rep in replicas], timeout=td) for dd in range(k)]
            created += dps
            dp = dps[layout.pipeline_device]
        else:
            dp = process_group
    p2p: dict[tuple[int, int], Any] = {}
    meta = None
    if k > 1:
        me = layout.pipeline_device
        # NCCL's watchdog counts a work's age from its issue and tears the process down once
        # it passes the group's timeout; a receive posted ahead is older than the wait on it,
        # so the edge groups allow more: the pipe's own bounded waits come first
        edge_td = timedelta(seconds=EDGE_TIMEOUT_FACTOR * timeout)
        for j, rep in enumerate(replicas):
            for a, b in layout.edges():
                grp = new_group([rep[a], rep[b]], timeout=edge_td)
                created.append(grp)
                if j == layout.replica and me in (a, b):
                    p2p[(a, b)] = grp
            grp = new_group(rep, timeout=td, backend="gloo")
            created.append(grp)
            if j == layout.replica:
                meta = grp
    calls = None
    if k * d > 1:  # the pipe's own: a step that times out breaks it, never the caller's group
        calls = new_group([r for rep in replicas for r in rep], timeout=td, backend="gloo")
        created.append(calls)
    groups = Groups(replicas, pp, dp, p2p, meta, calls, created)
    if backend == "nccl":
        for grp in (pp, dp, *p2p.values()):  # this rank's communicators, in one fixed order
            if grp is not None:
                warm_up(grp, comm_device)
    return groups


def warm_up(group: Any, device: torch.device) -> None:
    """Make ``group``'s communicator exist now (NCCL creates it at its first collective)."""
    t = torch.zeros(1, device=device)
    dist.all_reduce(t, group=group)
