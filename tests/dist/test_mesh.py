"""A distributed pipe on a DeviceMesh: 2 pipeline ranks x 2 tensor-parallel ranks (4 gloo
ranks), each stage a column/row-parallel MLP by torch's ``ColwiseParallel`` /
``RowwiseParallel`` through ``parallelize=``, trains (SGD, 3 steps) equal to the plain model
(float64); a mesh that does not fit the pipe is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from spawn_ranks import gloo_results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TIMEOUT = 8.0
TOL = 1e-10
PP, TP = 2, 2
STEPS = 3
LR = 0.1


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(8, 6, dtype=torch.float64, generator=g), torch.randint(
        0, 3, (8,), generator=g
    )


def tp_plan(stage: nn.Module, mesh: Any) -> None:
    """Column-parallel first Linear, row-parallel second, in each stage (layers 0, 2 / 3, 5)."""
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    names = [n for n, _ in stage.named_children() if isinstance(getattr(stage, n), nn.Linear)]
    plan = {names[0]: ColwiseParallel(), names[1]: RowwiseParallel()}
    parallelize_module(stage, mesh["tp"], plan)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a DTensor (a plain tensor as it is), detached."""
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach().clone()


def refusal(fn: Any) -> str:
    """What ``fn()`` raised, as ``"Type: message"`` (``"no error"`` when nothing)."""
    try:
        fn()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def _scenario(rank: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from gpipe.dist.pipe import DistributedPipe

    mesh = init_device_mesh("cpu", (PP, TP), mesh_dim_names=("pp", "tp"))
    out: dict[str, Any] = {
        "stages": refusal(lambda: DistributedPipe(mlp(), stages=4, mesh=mesh)),
        "order": refusal(
            lambda: DistributedPipe(
                mlp(), mesh=init_device_mesh("cpu", (TP, PP), mesh_dim_names=("pp", "dp"))
            )
        ),
    }
    pipe = DistributedPipe(
        mlp(), balance=[3, 3], chunks=2, mesh=mesh, parallelize=tp_plan, timeout=TIMEOUT
    )
    opt = torch.optim.SGD(pipe.parameters(), lr=LR)
    losses, grads = [], []
    for s in range(STEPS):
        opt.zero_grad()
        losses.append(float(pipe.step(*batch(s), F.cross_entropy)))
        grads.append({n: full(p.grad) for n, p in pipe.named_parameters()})
        opt.step()
    out["losses"], out["grads"] = losses, grads
    out["params"] = {n: full(p) for n, p in pipe.named_parameters()}
    out["dtensor"] = [type(p).__name__ for p in pipe.parameters()]
    pipe.close()
    torch.save(out, tmp / f"rank{rank}.pt")


def test_pipeline_x_tensor_parallel_equals_plain_model(tmp_path: Path) -> None:
    results = gloo_results(_scenario, tmp_path, world=PP * TP, limit=80)
    ref = mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=LR)
    ref_losses, ref_grads = [], []
    for s in range(STEPS):
        opt.zero_grad()
        x, y = batch(s)
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        ref_losses.append(loss.item())
        ref_grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})
        opt.step()
    ref_params = dict(ref.named_parameters())
    seen = set()
    for rank, got in enumerate(results):
        assert "'pp' dimension has 2 ranks" in got["stages"], got["stages"]
        assert "'dp' after 'pp'" in got["order"], got["order"]
        assert "DTensor" in got["dtensor"], f"rank {rank}: parameters not tensor-parallel"
        assert got["losses"] == pytest.approx(ref_losses, abs=TOL)
        for s in range(STEPS):
            for n, g in got["grads"][s].items():
                assert torch.allclose(g, ref_grads[s][n], atol=TOL, rtol=0), (rank, s, n)
        for n, p in got["params"].items():
            assert torch.allclose(p, ref_params[n].detach(), atol=TOL, rtol=0), (rank, n)
            seen.add(n)
    assert seen == set(ref_params)


def _scenario_3d(rank: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    from gpipe.dist.pipe import DistributedPipe

    mesh = init_device_mesh("cpu", (2, PP, TP), mesh_dim_names=("dp", "pp", "tp"))
    with DistributedPipe(
        mlp(), balance=[3, 3], chunks=2, mesh=mesh, parallelize=tp_plan, timeout=TIMEOUT
    ) as pipe:
        loss = float(pipe.step(*batch(0), F.cross_entropy))
        grads = {n: full(p.grad) for n, p in pipe.named_parameters()}
        where = (pipe.replica, pipe.pipeline_device)
    torch.save({"loss": loss, "grads": grads, "where": where}, tmp / f"rank{rank}.pt")


def test_data_x_pipeline_x_tensor_parallel_equals_plain_model(tmp_path: Path) -> None:
    """2 replicas x 2 pipeline ranks x 2 tensor-parallel ranks (8 gloo ranks): the replicas'
    tensor-parallel shards are all-reduced as whole replicas, equal to the plain model."""
    results = gloo_results(_scenario_3d, tmp_path, world=8, limit=140)
    ref = mlp()
    x, y = batch(0)
    loss = F.cross_entropy(ref(x), y)
    loss.backward()
    for rank, got in enumerate(results):
        dp, pp = rank // (PP * TP), (rank // TP) % PP
        assert got["where"] == (dp, pp), (rank, got["where"])
        assert got["loss"] == pytest.approx(loss.item(), abs=TOL), rank
        for n, g in got["grads"].items():
            ref_g = dict(ref.named_parameters())[n].grad
            assert torch.allclose(g, ref_g, atol=TOL, rtol=0), (rank, n)
