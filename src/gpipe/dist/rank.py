"""What one rank holds of a distributed pipeline: its process groups, its transport and, once
the pipeline is cut, its stages and tied copies.

:func:`connect` creates every process group of the job — in one order on every rank, since
``new_group`` is collective (:func:`gpipe.dist.layout.create_groups`) — and this rank's
:class:`~gpipe.dist.transport.P2PTransport`; :meth:`RankParts.attach` takes what
:func:`gpipe.dist.build.build_rank` made. The invariant: ``stages`` is ``None`` until the
pipeline is cut, and from then on ``stage_map``, ``ties`` and ``deferred_bn`` describe exactly
those stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gpipe.dist.build import Built
from gpipe.dist.config import DistConfig
from gpipe.dist.layout import Groups, create_groups
from gpipe.dist.transport import P2PTransport
from gpipe.nn import deferred_in
from gpipe.stage.stage import Stage

__all__ = ["RankParts", "connect"]


@dataclass
class RankParts:
    """This rank's share of the pipeline's running parts (see the module docstring)."""

    groups: Groups
    transport: P2PTransport
    global_rank: int  # in the default group: what failures name
    created: list[Any]  # every group this pipe created, to release at close
    stages: list[Stage] | None = None
    balance: list[int] | None = None
    # (local copy, its tie subgroup, the owner's rank in it, whether this rank is the owner)
    ties: list[tuple[nn.Parameter, Any, int, bool]] = field(default_factory=list)
    not_counted: set[int] = field(default_factory=set)  # ids of copies clip_grad_norm skips
    stage_map: dict[int, Stage] = field(default_factory=dict)
    deferred_bn: list[Any] = field(default_factory=list)  # in stage order
    sharded: Any = None  # gpipe.dist.fsdp.Sharded with fsdp=True, once the stages are built

    def attach(self, balance: list[int], built: Built) -> None:
        """Take this rank's stages, cut by ``balance``, and their tied copies."""
        self.balance = list(balance)
        self.stages = built.stages
        self.stage_map = {st.index: st for st in built.stages}
        self.deferred_bn = deferred_in(layer for st in built.stages for _, layer in st.layers)
        self.ties, self.not_counted = built.ties, built.not_counted
        self.created += built.created


def connect(
    config: DistConfig, process_group: Any, backend: str, new_group: Any = None
) -> RankParts:
    """Create every group of the job (collective: every rank calls it, in the same order)
    and this rank's transport; point-to-point traffic goes through the rank's GPU under NCCL,
    the CPU otherwise. ``new_group`` creates a group (default ``dist.new_group``; with a mesh,
    the one that creates the sibling slices' groups alike)."""
    layout = config.layout
    comm_device = config.device if backend == "nccl" else torch.device("cpu")
    groups = create_groups(
        layout, process_group, config.options.timeout, backend, comm_device, new_group
    )
    mine = groups.replicas[layout.replica]
    transport = P2PTransport(
        layout.pipeline_device,
        mine,
        groups.p2p,
        groups.meta,
        layout.owner,
        layout.num_stages,
        timeout=config.options.timeout,
        comm_device=comm_device,
    )
    return RankParts(groups, transport, mine[layout.pipeline_device], list(groups.created))
