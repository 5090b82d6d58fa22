"""DistributedPipe takes any module too: a looping Transformer LM (tied embedding and head on
different ranks) captured on its sample trains as the plain model, over two gloo processes."""

from __future__ import annotations

import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from capture_models import loop_lm
from spawn_ranks import spawn


def _scenario(rank: int, path: Path) -> None:
    from gpipe.dist.pipe import DistributedPipe

    model, (x, _), y, loss_fn = loop_lm(dtype=torch.float64)
    names = {id(p): n for n, p in model.named_parameters()}
    with DistributedPipe(model, sample=x, chunks=4, schedule="1f1b", stages=2) as pipe:
        loss = pipe.step(x, y, loss_fn)
        grads = {names[id(p)]: p.grad.clone() for p in pipe.parameters() if p.grad is not None}
        torch.save({"loss": float(loss), "grads": grads}, path / f"out-{rank}.pt")


def _entry(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2,
                            timeout=timedelta(seconds=60))  # fmt: skip
    try:
        _scenario(rank, Path(out))
    except BaseException:
        (Path(out) / f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_distributed_pipe_captures_and_trains_any_module(tmp_path: Path) -> None:
    init = f"file://{tmp_path}/store"
    spawn(_entry, lambda r: (r, init, str(tmp_path)), world=2, limit=240)
    for r in range(2):
        err = tmp_path / f"error-{r}.txt"
        if err.exists():
            pytest.fail(f"rank {r} failed:\n{err.read_text()}")
    outs = [torch.load(tmp_path / f"out-{r}.pt") for r in range(2)]
    model, (x, _), y, loss_fn = loop_lm(dtype=torch.float64)
    ref = loss_fn(model(x), y)  # no mask: DistributedPipe.step passes one input
    ref.backward()
    assert outs[0]["loss"] == pytest.approx(ref.item(), rel=1e-10)
    seen = set()
    for out in outs:
        for name, g in out["grads"].items():
            torch.testing.assert_close(g, dict(model.named_parameters())[name].grad)
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}
