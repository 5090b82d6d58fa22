"""``DistributedPipe(fsdp=True)``: 2 pipeline ranks x 2 FSDP replicas (4 gloo ranks), each
stage's parameters, gradients and optimizer state sharded over its 2 replicas with
``fully_shard``, trains equal to the plain model (float64, 2 steps of Adam with global-norm
clipping) under gpipe, 1f1b and interleaved; what cannot work is refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gpipe.core.reduction import count_items
from spawn_ranks import gloo_results
from test_mesh import full, refusal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(200)]

TIMEOUT = 8.0
TOL = 1e-10
K, D = 2, 2
STEPS = 2
MAX_NORM = 0.5
SCHEDULES = {"gpipe": None, "1f1b": None, "interleaved": 2}  # name: virtual stages


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 7), nn.Tanh(), nn.Linear(7, 5), nn.Linear(5, 3)
    ).double()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 3, (8,), generator=g)


def _train(schedule: str, v: int | None) -> dict[str, Any]:
    from gpipe.dist.pipe import DistributedPipe

    balance = [2, 2, 1, 1] if v else [3, 3]
    kw = {"virtual_stages": v} if v else {}
    with DistributedPipe(
        mlp(), balance=balance, chunks=2, schedule=schedule, data_parallel=D, fsdp=True,
        timeout=TIMEOUT, **kw,
    ) as pipe:  # fmt: skip
        opt = torch.optim.Adam(pipe.parameters(), lr=0.05)
        out: dict[str, Any] = {"losses": [], "grads": [], "norms": []}
        for s in range(STEPS):
            opt.zero_grad()
            out["losses"].append(float(pipe.step(*batch(s), F.cross_entropy)))
            out["grads"].append({n: full(p.grad) for n, p in pipe.named_parameters()})
            out["norms"].append(float(pipe.clip_grad_norm_(MAX_NORM)))
            opt.step()
        out["params"] = {n: full(p) for n, p in pipe.named_parameters()}
        out["local"] = {n: p.to_local().numel() for n, p in pipe.named_parameters()}
        out["state"] = sum(
            t.to_local().numel() if hasattr(t, "to_local") else 0
            for st in opt.state.values()
            for t in st.values()
        )
    return out


def _scenario(rank: int, tmp: Path) -> None:
    from gpipe.dist.pipe import DistributedPipe

    out: dict[str, Any] = {name: _train(name, v) for name, v in SCHEDULES.items()}

    def zero_bubble() -> None:
        with DistributedPipe(
            mlp(), balance=[3, 3], chunks=2, schedule="zb-h1", data_parallel=D, fsdp=True,
            timeout=TIMEOUT,
        ) as pipe:  # fmt: skip
            pipe.step(*batch(0), F.cross_entropy)

    def items() -> None:
        with DistributedPipe(
            mlp(), balance=[3, 3], chunks=2, data_parallel=D, fsdp=True, timeout=TIMEOUT
        ) as pipe:
            pipe.step(*batch(0), F.cross_entropy, reduction=count_items())

    out["zero-bubble"] = refusal(zero_bubble)
    out["count_items"] = refusal(items)
    out["no replicas"] = refusal(
        lambda: DistributedPipe(mlp(), stages=4, chunks=2, fsdp=True, timeout=TIMEOUT)
    )
    torch.save(out, tmp / f"rank{rank}.pt")


def _reference() -> dict[str, Any]:
    ref = mlp()
    opt = torch.optim.Adam(ref.parameters(), lr=0.05)
    out: dict[str, Any] = {"losses": [], "grads": [], "norms": []}
    for s in range(STEPS):
        opt.zero_grad()
        x, y = batch(s)
        loss = F.cross_entropy(ref(x), y)
        loss.backward()
        out["losses"].append(loss.item())
        out["grads"].append({n: p.grad.clone() for n, p in ref.named_parameters()})
        out["norms"].append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)))
        opt.step()
    out["params"] = {n: p.detach().clone() for n, p in ref.named_parameters()}
    return out


def test_pipeline_x_fsdp_equals_plain_model(tmp_path: Path) -> None:
    results = gloo_results(_scenario, tmp_path, world=K * D, limit=190)
    ref = _reference()
    for rank, got in enumerate(results):
        for name in SCHEDULES:
            run = got[name]
            where = f"rank {rank}, {name}"
            assert run["losses"] == pytest.approx(ref["losses"], abs=TOL), where
            assert run["norms"] == pytest.approx(ref["norms"], abs=TOL), where
            for s in range(STEPS):
                for n, g in run["grads"][s].items():
                    assert torch.allclose(g, ref["grads"][s][n], atol=TOL, rtol=0), (where, s, n)
            for n, p in run["params"].items():
                assert torch.allclose(p, ref["params"][n], atol=TOL, rtol=0), (where, n)
                # each replica holds its share of the parameter's rows (at most ceil(rows / D))
                rows = p.shape[0]
                assert run["local"][n] <= -(-rows // D) * (p.numel() // rows), (where, n)
            assert run["state"] > 0, where  # Adam's state is sharded DTensors too
        assert "zero-bubble" in got["zero-bubble"], got["zero-bubble"]
        assert "reduction='mean' or 'sum'" in got["count_items"], got["count_items"]
        assert "data_parallel=1" in got["no replicas"], got["no replicas"]
    names = {n for got in results for n in got["gpipe"]["params"]}
    assert names == set(ref["params"])
