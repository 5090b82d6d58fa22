"""The schedules with two stages per rank through ``gpipe.DistributedPipe``: two ranks (gloo on
loopback), each holding two stages — of the V for ``zb-v`` and ``dualpipe-v`` (rank 0 stages 0
and 3, rank 1 stages 1 and 2, whose handoff stays on rank 1), round-robin for
``interleaved-zb`` (rank 0 stages 0 and 2, rank 1 stages 1 and 3) — gradients equal to the
independent reference in float64.
"""

from __future__ import annotations

import itertools
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

import reference_impl
from spawn_ranks import spawn

TOL = 1e-10
CASES = list(
    itertools.product(["zb-v", "dualpipe-v", "interleaved-zb"], [2, 4], ["always", "never"])
)
PLACEMENTS = {"zb-v": (0, 1, 1, 0), "dualpipe-v": (0, 1, 1, 0), "interleaved-zb": (0, 1, 0, 1)}


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(4, 4), nn.Tanh()]
    return nn.Sequential(*layers).double()


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(8, 4, generator=g, dtype=torch.float64)
    return x, torch.randn(8, 4, generator=g, dtype=torch.float64)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((out - y) ** 2).mean()


def _entry(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    from gpipe.dist.pipe import DistributedPipe

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    try:
        x, y = _batch()
        res = {}
        for sched, m, remat in CASES:
            with DistributedPipe(
                _model(), chunks=m, schedule=sched, remat=remat, balance=[2, 2, 2, 2], timeout=60
            ) as pipe:
                loss = float(pipe.step(x, y, _loss))
                grads = {n: p.grad.clone() for n, p in pipe.named_parameters()}
                res[(sched, m, remat)] = (loss, grads, pipe.placement)
        torch.save(res, Path(out) / f"res-{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out) / f"err-{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()


def test_two_stage_per_rank_schedules_across_two_processes_equal_reference(tmp_path: Path) -> None:
    init = f"file://{tmp_path}/store"
    spawn(_entry, lambda r: (r, init, str(tmp_path)), world=2, limit=240)
    for r in (0, 1):
        err = tmp_path / f"err-{r}.pt"
        if err.exists():
            pytest.fail(f"rank {r} failed:\n{torch.load(err)['error']}")
    results = [torch.load(tmp_path / f"res-{r}.pt", weights_only=False) for r in (0, 1)]
    x, y = _batch()
    names = {n for n, _ in _model().named_parameters()}
    for key in CASES:
        ref = _model()
        ref_loss = float(reference_impl.step(ref, x, y, _loss, chunks=key[1]))
        ref_grads = dict(ref.named_parameters())
        seen: set[str] = set()
        for r in (0, 1):
            loss, grads, placement = results[r][key]
            assert placement == PLACEMENTS[key[0]]
            if r == placement[-1]:  # the rank of the last stage reports the loss
                assert abs(loss - ref_loss) < TOL, (key, loss, ref_loss)
            for n, g in grads.items():
                err = (g - ref_grads[n].grad).abs().max().item()
                assert err < TOL, f"{key} rank {r}: gradient of {n} differs by {err}"
            seen |= set(grads)
        assert seen == names, key
