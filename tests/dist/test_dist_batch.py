"""What each rank of a 2 x 2 distributed pipe (2 stages, 2 data-parallel replicas) is given:
``batch="same"`` refuses ranks given different batches on every rank; ``batch="per_replica"``
takes each replica's own shard and equals the plain model on the union of the shards.

All cases run in ONE spawned gloo group of 4 ranks (each case a fresh pipe, every wait
bounded); each rank records each case's outcome and gradients, the parent checks them against
the plain model (float64, no pipeline) on the union of the shards.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from gpipe.core.reduction import count_items
from spawn_ranks import run_gloo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TIMEOUT = 8.0
TOL = 1e-10
K, D = 2, 2


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)
    ).double()


def shard(replica: int, rows: int = 8, ignored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Replica ``replica``'s own shard (what a DistributedSampler would give it); with
    ``ignored``, 3 of replica 0's targets are -100 and none of replica 1's."""
    g = torch.Generator().manual_seed(10 + replica)
    x = torch.randn(rows, 8, dtype=torch.float64, generator=g)
    y = torch.randint(0, 3, (rows,), generator=g)
    if ignored and replica == 0:
        y[1:4] = -100
    return x, y


CASES = {  # name: (each replica's rows, reduction, ignored targets)
    "mean": ((8, 8), "mean", False),
    "mean, shards of 8 and 4 rows": ((8, 4), "mean", False),
    "count_items": ((8, 8), count_items(), True),
}


def _pipe(**kw: Any) -> Any:
    from gpipe.dist.pipe import DistributedPipe

    return DistributedPipe(mlp(), stages=K, data_parallel=D, chunks=2, timeout=TIMEOUT, **kw)


def _grads(pipe: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.named_parameters()}


def _outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as e:
        return type(e).__name__, str(e)


def _scenario(rank: int, tmp: Path) -> None:
    replica = rank // K
    out: dict[str, Any] = {}

    def own_shards_same() -> Any:  # the DDP habit without saying so
        with _pipe() as pipe:
            return float(pipe.step(*shard(replica), F.cross_entropy))

    out["own shards, batch='same'"] = _outcome(own_shards_same)

    def one_rank_of_a_replica_differs() -> Any:
        with _pipe(batch="per_replica") as pipe:
            x, y = shard(replica + (1 if rank == 3 else 0))
            return float(pipe.step(x, y, F.cross_entropy))

    out["per_replica, rank 3 another shard"] = _outcome(one_rank_of_a_replica_differs)

    for name, (rows, reduction, ignored) in CASES.items():

        def per_replica(rows: tuple = rows, reduction: Any = reduction, ign: bool = ignored) -> Any:
            x, y = shard(replica, rows[replica], ign)
            with _pipe(batch="per_replica") as pipe:
                loss = pipe.step(x, y, F.cross_entropy, reduction=reduction)
                return float(loss), _grads(pipe)

        out[name] = _outcome(per_replica)
    torch.save(out, tmp / f"batch-{rank}.pt")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("batch")
    run_gloo(_scenario, tmp, world=K * D, limit=120)
    return [torch.load(tmp / f"batch-{r}.pt", weights_only=False) for r in range(K * D)]


def test_replicas_given_their_own_shards_are_refused_on_every_rank(results: list) -> None:
    for r in range(K * D):
        kind, message = results[r]["own shards, batch='same'"]
        assert kind == "ValueError", (r, kind, message)
        assert "rank 2's batch differs from rank 0's (inputs checksum" in message
        assert "needs the same mini-batch on every rank" in message
        assert "batch='per_replica'" in message


def test_per_replica_refuses_a_rank_whose_shard_differs_from_its_pipeline(results: list) -> None:
    for r in range(K * D):
        kind, message = results[r]["per_replica, rank 3 another shard"]
        assert kind == "ValueError", (r, kind, message)
        assert "rank 3's batch differs from rank 2's (inputs checksum" in message
        assert "rank 0" not in message  # replicas are not compared with each other
        assert (
            "(replica 1: ranks 2..3): DistributedPipe needs the same shard on every rank of one replica's pipeline"
            in message
        )


@pytest.mark.parametrize("case", list(CASES))
def test_per_replica_equals_the_plain_model_on_the_union_of_shards(
    results: list, case: str
) -> None:
    rows, _, ignored = CASES[case]
    parts = [shard(j, rows[j], ignored) for j in range(D)]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    model = mlp()
    loss = F.cross_entropy(model(x), y)  # the mean over the union (its targets not ignored)
    loss.backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    seen = set()
    for r in range(K * D):
        kind, got = results[r][case]
        assert kind == "ok", (r, got)
        got_loss, grads = got
        assert abs(got_loss - loss.item()) <= TOL, (r, got_loss, loss.item())
        for n, g in grads.items():
            assert float((g - want[n]).abs().max()) <= TOL, (r, n)
            seen.add(n)
    assert seen == set(want)
