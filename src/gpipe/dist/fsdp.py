"""``DistributedPipe(fsdp=True)``: each stage's parameters, gradients and optimizer state
sharded over its data-parallel replicas with PyTorch's ``fully_shard`` (FSDP2).

Each stage of this rank becomes one FSDP module over the pipe's data-parallel group: a holder
of its layers that have parameters, ``fully_shard(holder, reshard_after_forward=False)``.
The stage keeps calling its layers itself, so the holder's forward hooks never fire; instead
a step gathers each stage's parameters once (``unshard()`` before the first action), every
micro-batch's backward accumulates into the gathered parameters' gradients, and after the
step's outcome is agreed each stage's gradients are reduce-scattered once into the sharded
gradients and the gathered parameters freed (FSDP's post-backward, as
``torch.distributed.pipelining``'s ``REDUCE_GRAD`` runs it). Memory: between steps a rank
holds ``1/D`` of its stages' parameters, gradients and optimizer state; during a step, its
stages' whole parameters and gradients (one all-gather and one reduce-scatter per stage and
step, not per micro-batch). The pipe's whole-replica all-reduce skips sharded parameters.

The replicas' gradients are combined by the reduce-scatter's one divide factor, so every
replica must weigh the same: ``reduction="mean"`` (factor ``D``) or ``"sum"`` (``1``) with
``batch="same"``; an item-count reduction or ``batch="per_replica"`` is refused, as are
zero-bubble schedules (their split weight gradients are computed outside autograd's
accumulation) and parameters tied across stages (one copy per rank cannot be one shard per
replica).

The invariant: after a step, the full tensor (``full_tensor()``) of every local gradient
equals that of un-pipelined training on the whole global batch, as without ``fsdp``; a
failed step drops its gradients and leaves the sharded ones as they were.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from gpipe.core import clip, plan
from gpipe.core.reduction import Reduction

__all__ = ["Sharded", "check_fsdp", "tied_across"]


def tied_across(tie_groups: Sequence[Sequence[str]], slots: Any, balance: Sequence[int]) -> bool:
    """Whether a tie group spans stages (``slots[name][0]``: the layer holding the name)."""
    stage_of = plan.stage_of_layers(list(balance))
    return any(len({stage_of[slots[n][0]] for n in grp}) > 1 for grp in tie_groups)


def check_fsdp(fsdp: Any, data_parallel: int, tied_across: bool) -> bool:
    """``fsdp`` must be a bool; ``True`` needs ``data_parallel > 1`` and no parameters tied
    across stages."""
    if not isinstance(fsdp, bool):
        raise TypeError(f"fsdp must be True or False, got {type(fsdp).__name__} {fsdp!r}")
    if fsdp and data_parallel < 2:
        raise ValueError(
            f"fsdp=True shards each stage over its data-parallel replicas, but "
            f"data_parallel={data_parallel}; launch stages x data_parallel ranks with "
            "data_parallel >= 2, or drop fsdp=True"
        )
    if fsdp and tied_across:
        raise ValueError(
            "fsdp=True cannot shard parameters tied across stages (each rank holds its own "
            "copy); keep tied layers in one stage (balance=) or drop fsdp=True"
        )
    return fsdp


class Sharded:
    """This rank's stages, each one FSDP module over the data-parallel group: a holder of
    the stage's layers that have parameters (the layers keep running as the stage calls
    them; the holder's own forward never runs, so FSDP's hooks never fire and this class
    gathers and reduces explicitly)."""

    def __init__(
        self, stage_layers: Sequence[Sequence[nn.Module]], dp_group: Any, device: torch.device
    ) -> None:
        # DeviceMesh equality ignores the group: a mesh over the same ranks as an earlier
        # (closed) pipe's would be taken for it and use its destroyed group, so the
        # dimension's name carries this group's name
        name = f"dp_{dp_group.group_name}"
        self.mesh = DeviceMesh.from_group(dp_group, device.type, mesh_dim_names=(name,))
        self.dp_group = dp_group
        self.holders: list[FSDPModule] = []
        for layers in stage_layers:
            if any(hasattr(p, "device_mesh") for m in layers for p in m.parameters()):
                raise ValueError(
                    "fsdp=True shards plain parameters over the pipe's replicas, but "
                    "parallelize= already made some DTensors (tensor parallelism); apply "
                    "fully_shard yourself inside parallelize= over mesh['dp', 'tp'] instead"
                )
            holder = nn.Module()
            held = [m for m in layers if any(True for _ in m.parameters())]
            for i, m in enumerate(held):
                holder.add_module(str(i), m)
            if held:
                self.holders.append(
                    fully_shard(holder, mesh=self.mesh, reshard_after_forward=False)
                )
        self.params = {id(p) for h in self.holders for p in h.parameters()}
        self._gathered = False

    def holds(self, p: nn.Parameter) -> bool:
        """Whether ``p`` is sharded here (the whole-replica all-reduce skips it)."""
        return id(p) in self.params

    def check_call(self, reduction: Reduction, batch: str) -> None:
        """Refuse a step whose replicas may weigh differently (see the module docstring)."""
        if reduction not in ("mean", "sum") or batch != "same":
            raise ValueError(
                f"fsdp=True combines the replicas' gradients with one divide factor, so every "
                f"replica must weigh the same: use reduction='mean' or 'sum' with "
                f"batch='same' (got reduction={reduction!r}, batch={batch!r})"
            )

    def begin(
        self, grad: bool, actions: Sequence[Any], reduction: Reduction, data_parallel: int
    ) -> None:
        """Before this rank's ``actions`` (every rank calls it): refuse a split weight
        gradient, then gather each stage's parameters once for the whole step (its layers
        then hold the unsharded parameters, into which every micro-batch's backward
        accumulates)."""
        if grad and any(getattr(a, "kind", None) == "W" for a in actions):
            raise ValueError(
                "fsdp=True cannot run a zero-bubble schedule's split weight gradient (W): its "
                "weight gradients are computed outside autograd's accumulation into the "
                "gathered parameters; use 'gpipe', '1f1b' or an interleaved schedule"
            )
        for h in self.holders:
            _lazy_init(h)
            h.set_gradient_divide_factor(float(data_parallel) if reduction == "mean" else 1.0)
            h.unshard()
        self._gathered = True

    def end(self, grad: bool, failed: bool) -> None:
        """After the step's outcome is agreed over the replicas. Success (every replica
        calls it): reduce-scatter each stage's accumulated gradients once (added to the
        sharded gradients held before) and free the unsharded parameters. Failure (no
        collective: replicas may have stopped anywhere): drop the step's gradients and free
        the unsharded parameters, the sharded gradients as they were."""
        if not self._gathered:
            return
        self._gathered = False
        for h in self.holders:
            if grad and not failed:
                _reduce_scatter(h)
            else:
                for p in h.parameters():  # the gathered ones, while unsharded
                    p.grad = None
            h.reshard()

    def clip_grad_norm(
        self,
        params: list[nn.Parameter],
        max_norm: float,
        norm_type: float,
        error_if_nonfinite: bool,
        pp_group: Any,
        out_device: torch.device,
    ) -> torch.Tensor:
        """Global-norm clip over sharded gradients: each rank's local shards' norm, reduced
        over the data-parallel group, then over the pipeline's ranks (``pp_group``)."""
        grads = [_local(p.grad) for p in params if p.grad is not None]
        dtype = grads[0].dtype if grads else torch.float32

        def reduce(acc: torch.Tensor, is_max: bool) -> torch.Tensor:
            op = dist.ReduceOp.MAX if is_max else dist.ReduceOp.SUM
            for grp in (self.dp_group, pp_group):
                if grp is not None:
                    dist.all_reduce(acc, op=op, group=grp)
            return acc

        total = clip.clip_grad_norm_(
            grads, grads, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite, reduce=reduce
        )
        return total.to(dtype).to(out_device)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t


def _lazy_init(module: FSDPModule) -> None:
    """FSDP's root initialization of ``module`` (its forward, which would do it, never runs
    here); a no-op after the first."""
    fully_shard.state(module)._lazy_init()


def _reduce_scatter(module: FSDPModule) -> None:
    """Reduce-scatter ``module``'s accumulated unsharded gradients into its sharded ones:
    FSDP's post-backward of its parameter groups with gradient sync on, then its root's final
    callback (FSDP2 has no public call for it; ``torch.distributed.pipelining.stage`` calls
    the same two in its ``REDUCE_GRAD``)."""
    module.set_requires_gradient_sync(True)
    module.set_is_last_backward(True)
    module.set_reshard_after_backward(True)
    state = fully_shard.state(module)
    for st in state._state_ctx.all_states:
        for group in st._fsdp_param_groups:
            group.post_backward()
    state._root_post_backward_final_callback()
