"""Inline control of the distributed transport (``runtime/p2pproto``): after the first step a
value both ends expect travels as one buffer with no header; a header travels only when the
value changes (shape, structure, ``requires_grad``) or a step fails.

Two spawned gloo ranks run the same sequence of steps with inline control on (the default on
the CPU) and off (every message with a header): a first step, a steady one, a smaller batch
(new shapes), a ``no_grad`` step (same bytes, another ``requires_grad``), a step whose last
stage raises, and a clean step after it. Every step's loss and gradients must equal the
un-pipelined reference (``tests/reference_impl.py``); the header group must carry only the
terminal message per step in the steady state with inline control; the failure must reach
both ranks naming rank, stage and micro-batch, and the next step must work.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import reference_impl
from spawn_ranks import Raise, run_gloo, spawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]

TOL = 1e-10
# (rows, grad enabled, last stage raises) per step
STEPS = [(8, True, False), (8, True, False), (4, True, False), (4, False, False),
         (4, True, True), (4, True, False)]  # fmt: skip


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Linear(8, 8), nn.Tanh()]
    return nn.Sequential(*layers, Raise()).double()


def _batch(seed: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 8, dtype=torch.float64, generator=g)
    return x, torch.randint(0, 8, (rows,), generator=g)


def _scenario(rank: int, inline: bool, path: Path) -> None:
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    from gpipe.dist.pipe import DistributedPipe

    sends: list[int] = []  # id of the group of every isend
    orig = c10d.isend

    def isend(*args: Any, **kwargs: Any) -> Any:
        sends.append(id(kwargs.get("group")))
        return orig(*args, **kwargs)

    c10d.isend = dist.isend = isend  # one object in both namespaces (P2POp checks identity)
    recvs: list[int] = []  # id of the group of every irecv
    orig_recv = c10d.irecv

    def irecv(*args: Any, **kwargs: Any) -> Any:
        recvs.append(id(kwargs.get("group")))
        return orig_recv(*args, **kwargs)

    c10d.irecv = dist.irecv = irecv
    pipe = DistributedPipe(_model(), chunks=2, balance=[4, 5], schedule="1f1b", timeout=30)
    pipe.parts.transport.inline = inline
    meta = id(pipe.parts.groups.meta)
    # per forward action of this rank's stage: point-to-point receives posted so far this step
    at_forward: list[int] = []
    stage = pipe.parts.stages[0]
    orig_forward = stage.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        at_forward.append(sum(g != meta for g in recvs[first_recv:]))
        return orig_forward(*args, **kwargs)

    stage.forward = forward  # type: ignore[method-assign]
    transport = pipe.parts.transport
    orig_finish = transport.finish_step
    ahead: list[bool] = []  # per step: the peer's terminal header receive already posted

    def finish_step(*args: Any, **kwargs: Any) -> Any:
        ends = [transport._slots[p][len(transport._in[p])] for p in transport.peers]
        ahead.append(all(slot.head_work is not None for slot in ends))
        return orig_finish(*args, **kwargs)

    transport.finish_step = finish_step  # type: ignore[method-assign]
    out: list[dict[str, Any]] = []
    for i, (rows, grad, fail) in enumerate(STEPS):
        pipe.zero_grad()
        Raise.on = fail
        before = len(sends)
        first_recv = len(recvs)
        at_forward.clear()
        res: dict[str, Any] = {"error": None}
        try:
            with torch.set_grad_enabled(grad):
                res["loss"] = float(pipe.step(*_batch(i, rows), F.cross_entropy))
        except Exception as e:
            res["error"] = (type(e).__name__, str(e))
        Raise.on = False
        res["headers"] = sum(g == meta for g in sends[before:])
        res["recvs_at_forward"] = list(at_forward)
        res["terminal_ahead"] = ahead[-1]
        res["grads"] = {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}
        out.append(res)
    pipe.close()
    torch.save(out, path / f"{'inline' if inline else 'header'}{rank}.pt")


def _both(rank: int, path: Path) -> None:
    for inline in (True, False):
        _scenario(rank, inline, path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[list[dict[str, Any]]]]:
    tmp = tmp_path_factory.mktemp("inline")
    run_gloo(_both, tmp, limit=120)
    return {
        mode: [torch.load(tmp / f"{mode}{r}.pt", weights_only=False) for r in range(2)]
        for mode in ("inline", "header")
    }


def _reference(i: int) -> tuple[float, dict[str, torch.Tensor]]:
    rows, grad, _ = STEPS[i]
    model = _model()
    with torch.set_grad_enabled(grad):
        loss = reference_impl.step(model, *_batch(i, rows), F.cross_entropy, chunks=2, step=i)
    return float(loss), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["inline", "header"])
@pytest.mark.parametrize("i", range(len(STEPS)))
def test_every_step_equals_the_reference_or_fails_on_every_rank(runs, mode, i):
    _, grad, fail = STEPS[i]
    for r, steps in enumerate(runs[mode]):
        res = steps[i]
        if fail:
            assert res["error"] is not None, (mode, r, "the failing step did not raise")
            name, text = res["error"]
            assert name == ("StageError" if r == 1 else "PeerError"), (mode, r, res["error"])
            for part in ("rank 1", "stage 1", "micro-batch 0"):
                assert part in text, (mode, r, part, text)
            continue
        assert res["error"] is None, (mode, r, res["error"])
        ref_loss, ref_grads = _reference(i)
        assert abs(res["loss"] - ref_loss) < TOL, (mode, r, i, res["loss"], ref_loss)
        assert bool(res["grads"]) == grad, (mode, r, i)
        for n, g in res["grads"].items():
            assert (g - ref_grads[n]).abs().max().item() < TOL, (mode, r, i, n)


def test_headers_travel_only_when_the_receiver_cannot_know_the_value(runs):
    # 1F1B with M=2 on two ranks: each rank sends 2 values and one END per step; a value
    # the receiver cannot know costs a header and its bytes (bulk) on the header group
    for r in range(2):
        inline = [s["headers"] for s in runs["inline"][r]]
        header = [s["headers"] for s in runs["header"][r]]
        assert header[1] == 3, (r, header)  # every value has a header, plus END
        assert inline[1] == 1, (r, inline)  # steady state: END only
        assert inline[0] == 5 and inline[2] == 5, (r, inline)  # first step, new shapes
        assert inline[5] == 1, (r, inline)  # after the failure the shapes are known again
        # no_grad: rank 1 sends no gradient; of rank 0's activations only micro-batch 1's
        # changes requires_grad (micro-batch 0 is re-materialized: its forward ran without
        # grad in the steps before too)
        assert inline[3] == (3 if r == 0 else 1), (r, inline)


def test_the_next_input_is_posted_before_a_forward_that_sends_nothing(runs):
    """The last stage's forward sends nothing; the receive of the next activation must
    already be posted when it runs, so that transfer overlaps its compute (it used to be
    posted only at the next send, after the forward: the receiver then waited for it)."""
    steady = runs["inline"][1][1]["recvs_at_forward"]  # rank 1, the steady step, M=2
    assert steady == [2, 2], steady  # at micro-batch 0's forward, micro-batch 1's is posted


def test_the_end_of_the_step_is_posted_before_the_rank_reaches_it(runs):
    """With inline control the peer's terminal header (END with the loss) is posted as soon
    as its channel's last value is read, so it arrives under this rank's last actions; it
    used to be posted in ``finish_step``, a round trip on every step's critical path. Every
    header mode posts all headers at the start of the step."""
    for mode in ("inline", "header"):
        for r in range(2):
            ahead = [s["terminal_ahead"] for s in runs[mode][r]]
            ok = [a for a, (_, _, fail) in zip(ahead, STEPS) if not fail]
            assert all(ok), (mode, r, ahead)


def _single(out: str) -> None:
    import torch.distributed as dist

    from gpipe.dist.pipe import DistributedPipe

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}/store1", rank=0, world_size=1)
    pipe = DistributedPipe(_model(), chunks=2, balance=[9], schedule="1f1b", timeout=30)
    losses, grads = [], []
    for i in range(2):  # the second step would reuse channels, if there were any
        pipe.zero_grad()
        losses.append(float(pipe.step(*_batch(i, 8), F.cross_entropy)))
        grads.append({n: p.grad.clone() for n, p in pipe.named_parameters()})
    pipe.close()
    dist.destroy_process_group()
    torch.save((losses, grads), f"{out}/single.pt")


def test_one_pipeline_device_needs_no_channel(tmp_path):
    (code,) = spawn(_single, lambda r: (str(tmp_path),), world=1, limit=60)
    assert code == 0, "the one-device pipe failed (see its stderr)"
    losses, grads = torch.load(tmp_path / "single.pt", weights_only=False)
    for i in range(2):
        model = _model()
        ref = reference_impl.step(model, *_batch(i, 8), F.cross_entropy, chunks=2, step=i)
        assert abs(losses[i] - float(ref)) < TOL, (i, losses[i], float(ref))
        for n, p in model.named_parameters():
            assert (grads[i][n] - p.grad).abs().max().item() < TOL, (i, n)
