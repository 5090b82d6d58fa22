"""How the distributed transport uses ``torch.distributed``: the rules NCCL imposes, checked on
gloo (CPU) by watching every call.

Two spawned ranks wrap ``torch.distributed``'s point-to-point functions and ``new_group`` and
record, for each call, the calling thread and the group. The pipe must issue every
point-to-point operation from the thread that called ``step`` (one thread per rank), only on
groups that existed when construction returned, and create no group during a step — while
still computing the reference gradients (tests/reference_impl.py), after a failed step too.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import reference_impl
from gpipe.dist import p2pproto
from gpipe.schedules import Action
from spawn_ranks import Raise, gloo_results

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

P2P = ("isend", "irecv", "send", "recv", "batch_isend_irecv")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
TOL = 1e-10


def _model(fail: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    if fail:
        layers.append(Raise())
    return nn.Sequential(*layers).double()


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 8, dtype=torch.float64, generator=g), torch.randint(
        0, 8, (8,), generator=g
    )


def _watch(log: list[tuple[str, int, int]]) -> None:
    """Wrap the point-to-point functions and new_group to log (name, thread, group id); in
    both namespaces, since ``P2POp`` checks its op against ``distributed_c10d``'s own."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    for name in (*P2P, "new_group"):
        orig = getattr(dist, name)

        def wrapper(*args: Any, _orig: Any = orig, _name: str = name, **kwargs: Any) -> Any:
            out = _orig(*args, **kwargs)
            if _name == "new_group":
                group = out
            elif _name == "batch_isend_irecv":
                group = args[0][0].group
            else:
                group = kwargs.get("group")
            log.append((_name, threading.get_ident(), id(group)))
            return out

        setattr(dist, name, wrapper)
        setattr(c10d, name, wrapper)


def _scenario(rank: int, path: Path) -> None:
    from gpipe.dist.pipe import DistributedPipe

    log: list[tuple[str, int, int]] = []
    _watch(log)
    res: dict[str, Any] = {"main": threading.get_ident()}
    for sched in SCHEDULES:
        balance = [2, 2, 2, 2] if sched == "interleaved" else [4, 4]
        model = _model()
        with DistributedPipe(model, chunks=4, balance=balance, schedule=sched, timeout=20) as pipe:
            built = len(log)
            x, y = _batch(1)
            loss = float(pipe.step(x, y, F.cross_entropy))
            grads = {n: p.grad.clone() for n, p in pipe.named_parameters()}
            res[sched] = (log[:built], log[built:], loss, grads)
    # the GPU path's way of issuing, on gloo: every message with its header (no inline
    # control) and each flush one coalesced batch_isend_irecv of P2POps; the second step's
    # tensors go direct (the first step's sizes are not known yet: bulk, on the header group)
    with DistributedPipe(_model(), chunks=4, balance=[4, 4], schedule="1f1b", timeout=20) as pipe:
        pipe.parts.transport.inline = False
        pipe.parts.transport.coalesce = True
        pipe.step(*_batch(1), F.cross_entropy)
        pipe.zero_grad()
        built = len(log)
        loss = float(pipe.step(*_batch(1), F.cross_entropy))
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters()}
        res["coalesced"] = (log[:built], log[built:], loss, grads)
    # a failed step, then a clean one, on the same channels
    model = _model(fail=True)
    with DistributedPipe(model, chunks=4, balance=[4, 5], schedule="1f1b", timeout=20) as pipe:
        built = len(log)
        Raise.on = True
        try:
            pipe.step(*_batch(2), F.cross_entropy)
            err = None
        except Exception as e:
            err = type(e).__name__
        Raise.on = False
        pipe.zero_grad()
        loss = float(pipe.step(*_batch(3), F.cross_entropy))
        grads = {n: p.grad.clone() for n, p in pipe.named_parameters()}
        res["recover"] = (log[:built], log[built:], loss, grads, err)
    torch.save(res, path / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def watched(tmp_path_factory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("transport")
    return gloo_results(_scenario, tmp, limit=100)


def _reference(seed: int, fail: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    model = _model(fail)
    x, y = _batch(seed)
    step = 1 if fail else 0  # the failed step counted as step 0 of the keyed streams
    loss = float(reference_impl.step(model, x, y, F.cross_entropy, chunks=4, step=step))
    return loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", [*SCHEDULES, "coalesced", "recover"])
def test_point_to_point_from_one_thread_on_groups_made_at_construction(watched, case):
    for r, res in enumerate(watched):
        before, during, loss, grads, *rest = res[case]
        p2p_during = [(n, t, g) for n, t, g in during if n in P2P]
        assert p2p_during, f"rank {r} {case}: no point-to-point call was recorded"
        # on the host each op is issued alone; the GPU path batches them as NCCL needs
        batched = any(n == "batch_isend_irecv" for n, _, _ in p2p_during)
        assert batched == (case == "coalesced"), (r, case)
        threads = {t for _, t, _ in p2p_during}
        assert threads == {res["main"]}, f"rank {r} {case}: P2P from threads {threads}"
        made = [n for n, _, _ in during if n == "new_group"]
        assert not made, f"rank {r} {case}: {len(made)} group(s) created during the step"
        groups = {g for n, _, g in before if n == "new_group"}
        used = {g for _, _, g in p2p_during}
        assert used <= groups, f"rank {r} {case}: P2P on a group not created at construction"
        ref_loss, ref_grads = _reference(3, fail=True) if case == "recover" else _reference(1)
        assert abs(loss - ref_loss) < TOL, (r, case, loss, ref_loss)
        assert grads, (r, case)
        for n, g in grads.items():
            assert (g - ref_grads[n]).abs().max().item() < TOL, (r, case, n)
        if case == "recover":
            assert rest[0] == ("PeerError" if r == 0 else "StageError"), (r, rest)


def test_channel_messages_follow_the_senders_order_and_skip_local_handoffs():
    # two devices, stages 0..3 on devices 0,1,0,1; device 0 runs F0 F2 B2 B0
    per_device = [
        [Action("F", 0, 0), Action("F", 2, 0), Action("B", 2, 0), Action("B", 0, 0)],
        [Action("F", 1, 0), Action("F", 3, 0), Action("B", 3, 0), Action("B", 1, 0)],
    ]
    seqs = p2pproto.channel_messages(per_device, lambda s: s % 2, 4)
    assert seqs[(0, 1)] == [("act", 1, 0), ("act", 3, 0), ("grad", 1, 0)]
    assert seqs[(1, 0)] == [("act", 2, 0), ("grad", 2, 0), ("grad", 0, 0)]
    # a V-shaped placement keeps stages 1 and 2 on device 1: their handoff is no message
    v_shape = [
        [Action("F", 0, 0), Action("F", 3, 0), Action("B", 3, 0), Action("B", 0, 0)],
        [Action("F", 1, 0), Action("F", 2, 0), Action("B", 2, 0), Action("B", 1, 0)],
    ]
    v = p2pproto.channel_messages(v_shape, lambda s: [0, 1, 1, 0][s], 4)
    assert v == {(0, 1): [("act", 1, 0), ("grad", 2, 0)], (1, 0): [("act", 3, 0), ("grad", 0, 0)]}
    wants = p2pproto.remote_inputs(per_device[0], 0, lambda s: s % 2, 4)
    assert wants == [("act", 2, 0), ("grad", 2, 0), ("grad", 0, 0)]
