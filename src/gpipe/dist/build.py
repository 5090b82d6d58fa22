"""Building one rank's share of a distributed pipeline: the balance every rank agrees on, this
rank's layers materialized on its device, its stages, and its copies of tied parameters.

The invariant: every rank ends with the same balance (rank 0's FLOPs balance when none was
given) and holds only its own layers; other ranks' layers are freed to the ``meta`` device. A
rank that cannot build raises its own error and every other rank raises one naming it, before
any collective that would leave them waiting. Tied copies start equal (broadcast from the rank
holding the tie group's first name), and data-parallel replicas start equal (broadcast from
replica 0).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpipe.base.microbatch import split
from gpipe.core import plan
from gpipe.core.materialize import free_layer, materialize_layers
from gpipe.dist import agree
from gpipe.dist.layout import Groups, Layout
from gpipe.stage.stage import Stage

__all__ = ["Built", "agree_balance", "build_rank", "local_params", "sample_microbatch"]


def sample_microbatch(
    sample: Any, data_parallel: int, batch_dim: int, num_microbatches: Callable[[Any], int]
) -> tuple:
    """Replica 0's first micro-batch of the global ``sample`` (what the balancer profiles)."""
    per_replica = split(sample, data_parallel, batch_dim=batch_dim)[0]
    m = num_microbatches(per_replica)
    return split((per_replica,), m, batch_dim=batch_dim)[0]


def agree_balance(
    named: Sequence[tuple[str, nn.Module]],
    sample_mb: tuple | None,
    local_error: BaseException | None,
    *,
    rank: int,
    num_stages: int,
    pinned: int,
    train: bool,
    group: Any,
    timeout: float,
    comm_device: torch.device,
    doing: str = "start the first step",
) -> list[int]:
    """Rank 0 balances by FLOPs on its micro-batch; every rank gets the same answer.

    One bounded all-gather also carries each rank's ``local_error`` (inputs that could not
    be split, say), so that every rank raises the real cause — the failing rank its own
    error, the others the same type naming that rank — instead of a symptom.
    """
    mine: dict[str, Any] = {
        "error": None if local_error is None else agree.describe_error(local_error),
        "balance": None,
        "balance_error": None,
    }
    if rank == 0 and local_error is None:
        try:
            if sample_mb is None:
                raise ValueError(
                    "rank 0 needs the inputs to balance the pipeline by FLOPs; pass them to "
                    "step() on rank 0, or give balance= or sample= to DistributedPipe"
                )
            mine["balance"], _ = plan.auto_balance(
                [m for _, m in named], sample_mb, num_stages, pinned=pinned, train=train
            )
        except Exception as e:
            mine["balance_error"] = f"{type(e).__name__}: {e}"
    every = agree.gather(
        mine, group, timeout, comm_device, rank, "to balance the pipeline before the first step"
    )
    if local_error is not None:
        raise local_error
    for r, theirs in enumerate(every):
        if theirs["error"] is not None:
            agree.raise_remote(r, theirs["error"], f"could not {doing}")
    if every[0]["balance_error"] is not None:
        raise RuntimeError(f"balancing the pipeline on rank 0 failed: {every[0]['balance_error']}")
    return list(every[0]["balance"])


@dataclass
class Built:
    """What :func:`build_rank` made: this rank's stages and its tied copies."""

    stages: list[Stage]
    # (local copy, its tie subgroup, the owner's rank in it, whether this rank is the owner)
    ties: list[tuple[nn.Parameter, Any, int, bool]] = field(default_factory=list)
    not_counted: set[int] = field(default_factory=set)  # ids of copies clip_grad_norm skips
    created: list[Any] = field(default_factory=list)  # the tie subgroups


def build_rank(
    named: Sequence[tuple[str, nn.Module]],
    balance: list[int],
    layout: Layout,
    groups: Groups,
    register: Callable[[str, nn.Module], None],
    *,
    device: torch.device,
    seed: int,
    init_fn: Callable[[nn.Module], None] | None,
    slots: Any,
    tie_groups: Sequence[Sequence[str]],
    remat: str,
    fetch_at: Any,
    process_group: Any,
    timeout: float,
    new_group: Any = None,
) -> Built:
    """Materialize this rank's layers on ``device``, free the others, ``register`` each local
    layer under its name, build this rank's stages, then its tied copies (one subgroup per
    replica, created in the same order on every rank, by ``new_group``: default
    ``dist.new_group``) and the replicas' broadcast."""
    new_group = new_group or dist.new_group
    me = layout.pipeline_device
    stage_of = plan.stage_of_layers(balance)
    dev_of = [layout.owner(s) for s in stage_of]
    local = [i for i, dd in enumerate(dev_of) if dd == me]
    error = None
    try:
        materialize_layers(named, local, device, seed, init_fn, tie_groups, slots)
    except Exception as e:
        error = e
    # Agree before any collective below: a rank that failed must not leave others waiting.
    errors: list[Any] = [None] * dist.get_world_size(process_group)
    text = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(errors, text, group=process_group)
    if error is not None:
        raise error
    for r, t in enumerate(errors):
        if t is not None:
            raise RuntimeError(f"rank {r} could not build its stages: {t}")
    for i, (_, layer) in enumerate(named):
        if dev_of[i] != me:
            free_layer(layer)
    for i in local:
        register(*named[i])
    stages = plan.build_stages(
        named,
        balance,
        layout.num_devices,
        lambda s: device,
        remat=remat,
        seed=seed,
        fetch_at=fetch_at,
        only_device=me,
        placement=layout.placement,
    )
    built = Built(stages)
    # Tie groups spanning several pipeline devices: one local copy each, one subgroup per
    # replica; every rank creates every subgroup in the same order.
    td = timedelta(seconds=timeout)
    replicas, mine = groups.replicas, groups.replicas[layout.replica]
    for grp in tie_groups:
        devs = sorted({dev_of[slots[n][0]] for n in grp})
        owner = dev_of[slots[grp[0]][0]]
        here = [n for n in grp if dev_of[slots[n][0]] == me]
        local_p = None
        if here:
            _, mod, attr, _ = slots[here[0]]
            local_p = getattr(mod, attr)  # the materialized one (slots hold the original)
            if owner != me:
                built.not_counted.add(id(local_p))
        if len(devs) < 2:
            continue
        subs = [new_group([rep[dd] for dd in devs], timeout=td) for rep in replicas]
        built.created += subs
        if local_p is not None:
            sub = subs[layout.replica]
            src = dist.get_group_rank(sub, mine[owner])
            with torch.no_grad():
                dist.broadcast(local_p.data, group=sub, group_src=src)
            built.ties.append((local_p, sub, src, owner == me))
    if groups.dp is not None:
        src = dist.get_group_rank(groups.dp, replicas[0][me])
        buffers = _unique(b for i in local for b in named[i][1].buffers())
        with torch.no_grad():
            for t in [*local_params(stages), *buffers]:
                dist.broadcast(t.data, group=groups.dp, group_src=src)
    return built


def local_params(stages: Sequence[Stage]) -> list[nn.Parameter]:
    """The parameters of ``stages``, each once."""
    return _unique(p for st in stages for p in st.parameters())


def _unique(tensors: Any) -> list[Any]:
    seen: dict[int, Any] = {}
    for t in tensors:
        seen.setdefault(id(t), t)
    return list(seen.values())
