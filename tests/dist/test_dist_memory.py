"""What a distributed step holds does not grow with the number of micro-batches M.

Two spawned gloo ranks run 1F1B (in-flight bound K = 2 micro-batches per rank) with M = 8 and
16, and watch ``torch.distributed``'s point-to-point calls: the host buffers the transport
sends from and receives into are reused once their transfer completed and their value was
handed over, so a steady step touches a number of distinct buffers set by what is in flight,
not by M (holding every send until the end of the step, or every receive until the next one,
needs M of each). The step still equals the un-pipelined reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import reference_impl
from spawn_ranks import gloo_results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

CHUNKS = (8, 16)
STEPS = 3


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(m for _ in range(4) for m in (nn.Linear(8, 8), nn.Tanh()))).double()


def _batch(m: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(m)
    return torch.randn(2 * m, 8, dtype=torch.float64, generator=g), torch.randint(
        0, 8, (2 * m,), generator=g
    )


def _scenario(rank: int, path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from gpipe.dist.pipe import DistributedPipe

    used: list[int] = []  # storage of every tensor a point-to-point call reads or fills
    for name in ("isend", "irecv"):
        orig = getattr(c10d, name)

        def wrapper(tensor: torch.Tensor, *args: Any, _orig: Any = orig, **kwargs: Any) -> Any:
            used.append(tensor.untyped_storage().data_ptr())
            return _orig(tensor, *args, **kwargs)

        setattr(dist, name, wrapper)
        setattr(c10d, name, wrapper)
    out: dict[int, Any] = {}
    for m in CHUNKS:
        with DistributedPipe(_model(), chunks=m, balance=[4, 4], schedule="1f1b") as pipe:
            x, y = _batch(m)
            for _ in range(STEPS):
                used.clear()
                pipe.zero_grad()
                loss = float(pipe.step(x, y, F.cross_entropy))
            grads = {n: p.grad.clone() for n, p in pipe.named_parameters()}
            out[m] = (len(set(used)), len(used), loss, grads)
    torch.save(out, path / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict[int, Any]]:
    tmp = tmp_path_factory.mktemp("memory")
    return gloo_results(_scenario, tmp, limit=100)


@pytest.mark.parametrize("m", CHUNKS)
def test_a_steady_step_reuses_buffers_in_flight_not_one_per_micro_batch(runs, m):
    model = _model()
    x, y = _batch(m)
    ref_loss = float(reference_impl.step(model, x, y, F.cross_entropy, chunks=m, step=STEPS - 1))
    for r, res in enumerate(runs):
        distinct, calls, loss, grads = res[m]
        # each micro-batch's activation goes one way and its gradient the other: 2M transfers
        assert calls >= 2 * m, (r, m, calls)
        # 1F1B keeps K = 2 micro-batches in flight per rank: a few buffers each way, however
        # large M is (a buffer per message until the step ends would be about 2M)
        assert distinct <= 8, (r, m, distinct, calls)
        assert abs(loss - ref_loss) < 1e-10, (r, m, loss, ref_loss)
        for n, g in grads.items():
            assert torch.allclose(g, model.get_parameter(n).grad, atol=1e-10), (r, n)
