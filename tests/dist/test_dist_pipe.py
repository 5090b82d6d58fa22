"""Tests for the distributed runtime: gpipe.dist.transport (P2PTransport) and gpipe.dist.pipe.

Multi-process tests spawn a few process groups (gloo on loopback, FileStore rendezvous) and run
many configurations inside each, so the whole file stays within a couple of minutes on two
cores. Workers write their results to files; the parent compares them with the single-process
independent reference (tests/reference_impl.py, which shares no code with gpipe). After every
injected fault the next step runs on a different batch and is checked by value: the workers
compute the reference step on that batch in-process and record the differences. Every launch
is bounded: processes are joined with a deadline and killed if they overstay.
"""

from __future__ import annotations

import os
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import reference_impl
from gpipe.dist.pipe import materialize
from gpipe.dist.transport import decode, encode
from gpipe.models import TransformerConfig, TransformerLM, lm_loss
from dist_mlp import ignored_batch, mlp, mlp_batch, mlp_no_dropout
from spawn_ranks import spawn

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")
MS = (1, 4, 8)
REMATS = ("always", "except_last", "never")
BALANCE = {  # for the 19-layer MLP
    (2, 1): [9, 10],
    (2, 2): [5, 5, 5, 4],
    (3, 1): [6, 6, 7],
    (3, 2): [3, 3, 3, 3, 3, 4],
}
TOL = 1e-10
FAIL_TIMEOUT = 10.0
STALL_TIMEOUT = 3.0


# ----------------------------------------------------------------------------- models


def tiny_lm() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(TransformerConfig.preset("tiny", tie_embeddings=True)).double()


def lm_batch(seq: int, seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, 256, (8, seq + 1), generator=g)
    return toks[:, :-1], toks[:, 1:]


META_CFG = dict(vocab_size=512, d_model=64, n_heads=2, d_ff=128, n_layers=2, max_seq_len=32)
BIG_CFG = dict(vocab_size=8192, d_model=512, n_heads=8, d_ff=2048, n_layers=6, max_seq_len=64)


def meta_lm(cfg: dict) -> TransformerLM:
    with torch.device("meta"):
        return TransformerLM(TransformerConfig(**cfg, tie_embeddings=True, dropout=0.1)).double()


class RaiseAt(nn.Module):
    """Identity that raises in its ``at``-th forward call of its first step."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at + 1:
            raise ValueError("boom in a layer")
        return x


class DieAt(nn.Module):
    """Identity that kills its process (exit code 17) in its ``at``-th forward call."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at, self.calls = at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.at + 1:
            os._exit(17)
        return x


class Fault(nn.Module):
    """Identity that fails in forward or backward (or stalls) on the micro-batch whose column 0
    holds ``tag``; :class:`TagLinear` layers keep column 0 intact across the pipeline."""

    def __init__(self) -> None:
        super().__init__()
        self.mode: str | None = None
        self.tag = -1.0
        self.stall = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode is None or not bool((x[:, 0] == self.tag).all()):
            return x
        if self.mode == "forward":
            raise ValueError("injected forward fault")
        if self.mode == "stall":
            time.sleep(self.stall)
            return x
        return _FailInBackward.apply(x)


class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise ValueError("injected backward fault")


class TagLinear(nn.Linear):
    """A linear layer with dropout that passes column 0 (the tag) through unchanged."""

    def __init__(self, n: int, m: int) -> None:
        super().__init__(n, m)
        self.drop = nn.Dropout(0.25)  # the recovery steps' random streams are checked too

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x[:, :1], self.drop(super().forward(x))[:, 1:]], dim=1)


def fault_model(k: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(k):
        layers += [TagLinear(8, 8), Fault()]  # Fault after a parameter: its backward runs
    return nn.Sequential(*layers).double()


def fault_batch(m: int, seed: int = 3) -> torch.Tensor:
    x = torch.randn(2 * m, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    x[:, 0] = torch.arange(m, dtype=torch.float64).repeat_interleave(2)
    return x


def _fault_matrix(k: int, rank: int, path: Path) -> None:
    """Forward and backward faults on every stage at the first and last micro-batch, each
    followed by a clean step on a new batch, compared with the reference in-process; then a
    stalled stage (which breaks the pipe: last)."""
    from gpipe.dist.pipe import DistributedPipe

    m = 4
    x = fault_batch(m)
    res: dict[Any, Any] = {}

    def loss(out: torch.Tensor, _: Any) -> torch.Tensor:
        return out.pow(2).mean()

    calls = 0  # training calls so far, failed ones included: the random streams' step
    model = fault_model(k)
    with DistributedPipe(
        model, chunks=m, balance=[2] * k, schedule="1f1b", remat="never", timeout=FAIL_TIMEOUT
    ) as pipe:
        for s in range(k):
            for mb in (0, m - 1):
                for where in ("forward", "backward"):
                    fault = model[2 * s + 1]
                    fault.mode, fault.tag = where, float(mb)
                    t0 = time.monotonic()
                    try:
                        pipe.step(x, None, loss)
                        err = None
                    except Exception as e:
                        err = (type(e).__name__, str(e))
                    elapsed = time.monotonic() - t0
                    fault.mode = None
                    pipe.zero_grad()
                    fresh = fault_batch(m, seed=100 + calls)
                    recovered = float(pipe.step(fresh, None, loss))
                    ref = fault_model(k)
                    ref_loss = reference_impl.step(ref, fresh, None, loss, chunks=m, step=calls + 1)
                    calls += 2
                    want = dict(ref.named_parameters())
                    grads = _grads(pipe)
                    grad_err = max(
                        ((g - want[n].grad).abs().max().item() for n, g in grads.items()),
                        default=float("inf"),
                    )
                    checked = (abs(recovered - float(ref_loss)), grad_err, sorted(grads))
                    res[(s, mb, where)] = (err, elapsed, checked)
    stalling = fault_model(k)
    layer = stalling[3]  # stage 1 sleeps past the timeout on micro-batch 1
    layer.mode, layer.tag, layer.stall = "stall", 1.0, 1.5 * STALL_TIMEOUT
    with DistributedPipe(
        stalling, chunks=m, balance=[2] * k, schedule="1f1b", timeout=STALL_TIMEOUT
    ) as pipe:
        t0 = time.monotonic()
        try:
            pipe.step(x, None, loss)
            err = None
        except Exception as e:
            err = (type(e).__name__, str(e))
        res["stall"] = (err, time.monotonic() - t0)
    _save(path, f"faults{k}", rank, res)


class Bare(nn.Module):
    """A layer whose parameter no reset_parameters() covers."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class Opaque(nn.Module):
    """Returns a value holding an object that cannot cross a process boundary."""

    def forward(self, x: torch.Tensor) -> Any:
        return (x, object())


class Unwrap(nn.Module):
    def forward(self, x: Any) -> torch.Tensor:
        return x[0]


# ----------------------------------------------------------------------------- launching


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _entry(rank: int, world: int, init: str, scenario: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    path = Path(out)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        SCENARIOS[scenario](rank, world, path)
    except BaseException:
        torch.save({"error": traceback.format_exc()}, path / f"{scenario}-error-{rank}.pt")
        raise
    dist.destroy_process_group()


def _launch(tmp: Path, world: int, scenario: str, limit: float = 150.0) -> list[int | None]:
    """Run ``scenario`` on ``world`` spawned ranks; return their exit codes (killed → None)."""
    init = f"file://{tmp}/store-{scenario}"
    codes = spawn(_entry, lambda r: (r, world, init, scenario, str(tmp)), world, limit)
    for r in range(world):
        err = tmp / f"{scenario}-error-{r}.pt"
        if err.exists():
            pytest.fail(f"rank {r} of {scenario} failed:\n{torch.load(err)['error']}")
    return codes


def _save(path: Path, name: str, rank: int, obj: Any) -> None:
    torch.save(obj, path / f"{name}-{rank}.pt")


def _load(tmp: Path, name: str, rank: int) -> Any:
    return torch.load(tmp / f"{name}-{rank}.pt", weights_only=False)


# ----------------------------------------------------------------------------- scenarios


def _grads(pipe: Any) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in pipe.named_parameters() if p.grad is not None}


def _sweep(k: int, out: dict) -> None:
    """Every schedule x M x remat on the dropout MLP: two steps (gradients accumulate)."""
    from gpipe.dist.pipe import DistributedPipe

    x, y = mlp_batch()
    for sched in SCHEDULES:
        v = 2 if sched == "interleaved" else 1
        for m in MS:
            for remat in REMATS:
                with DistributedPipe(
                    mlp(),
                    chunks=m,
                    schedule=sched,
                    remat=remat,
                    balance=BALANCE[(k, v)],
                    timeout=60,
                ) as pipe:
                    losses = [float(pipe.step(x, y, F.cross_entropy)) for _ in range(2)]
                    out[(sched, m, remat)] = (losses, _grads(pipe))


def _fail_and_recover(k: int, rank: int, path: Path) -> None:
    """A layer on stage 1 raises at micro-batch 2; then a second step must work."""
    from gpipe.dist.pipe import DistributedPipe

    x, y = mlp_batch()
    bal = [9, 11] if k == 2 else [6, 7, 7]
    at = bal[0]
    res: dict[str, Any] = {}
    with DistributedPipe(mlp(RaiseAt(2), at), chunks=4, balance=bal, timeout=FAIL_TIMEOUT) as pipe:
        t0 = time.monotonic()
        try:
            pipe.step(x, y, F.cross_entropy)
            res["error"] = None
        except Exception as e:
            res["error"] = (type(e).__name__, str(e))
        res["elapsed"] = time.monotonic() - t0
        pipe.zero_grad()
        res["loss"] = float(pipe.step(*mlp_batch(seed=4), F.cross_entropy))  # a new batch
        res["grads"] = _grads(pipe)
    _save(path, f"fail{k}", rank, res)


def scenario_pp2(rank: int, world: int, path: Path) -> None:
    from gpipe.dist.pipe import DistributedPipe

    out: dict[Any, Any] = {}
    _sweep(2, out)
    _save(path, "sweep2", rank, out)

    # Balance by FLOPs at the first step: every rank must agree.
    x, y = mlp_batch()
    with DistributedPipe(mlp(), chunks=4, schedule="1f1b") as pipe:
        loss = float(pipe.step(x, y, F.cross_entropy))
        _save(path, "auto", rank, (pipe.balance, loss, _grads(pipe)))

    # Tied embedding/head across the first and last stage, shapes changing between steps,
    # clip_grad_norm_, then an optimizer step keeps the copies equal.
    with DistributedPipe(
        tiny_lm(),
        chunks=4,
        balance=[2, 2],
        schedule="1f1b",
        tied=[("embed.tok.weight", "head.proj.weight")],
    ) as pipe:
        losses = []
        for seq in (16, 8):
            xs, ys = lm_batch(seq)
            losses.append(float(pipe.step(xs, ys, lm_loss)))
        norm = float(pipe.clip_grad_norm_(0.05))
        grads = _grads(pipe)
        torch.optim.SGD(pipe.parameters(), lr=0.1).step()
        params = {n: p.detach().clone() for n, p in pipe.named_parameters()}
        with torch.no_grad():
            evaluation = float(pipe.step(*lm_batch(12), lm_loss))
        _save(path, "tied", rank, (losses, norm, grads, params, evaluation))

    # A meta-built model: each rank materializes only its share.
    rss0 = _rss_mb()
    model = meta_lm(BIG_CFG)
    with DistributedPipe(model, chunks=2, balance=[4, 4]) as pipe:
        local = sum(p.numel() * p.element_size() for p in pipe.parameters())
        real = sum(p.numel() * p.element_size() for p in model.parameters() if not p.is_meta)
        expected = 0
        names = list(model._modules)
        mine = names[:4] if rank == 0 else names[4:]
        with torch.device("meta"):
            ref = TransformerLM(TransformerConfig(**BIG_CFG, tie_embeddings=True)).double()
        seen: set[int] = set()
        for n in mine:
            for p in ref._modules[n].parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    expected += p.numel() * p.element_size()
        _save(path, "meta", rank, (local, real, expected, rss0, _rss_mb(), pipe.stage_indices))

    # A small meta-built model trains like the single-process materialize() reference.
    with DistributedPipe(meta_lm(META_CFG), chunks=2, balance=[2, 2], seed=5) as pipe:
        xs, ys = lm_batch(16)
        loss = float(pipe.step(xs, ys, lm_loss))
        _save(path, "metagrad", rank, (loss, _grads(pipe)))

    # A layer that cannot be initialized from meta fails its rank's construction; the other
    # ranks learn it at once instead of waiting for it.
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), Bare())
    try:
        DistributedPipe(model, chunks=2, balance=[2, 1], timeout=FAIL_TIMEOUT)
        err = None
    except Exception as e:
        err = (type(e).__name__, str(e))
    _save(path, "uninit", rank, err)

    # A value that cannot cross a process boundary names the stage, micro-batch and path.
    model = nn.Sequential(nn.Linear(8, 8), Opaque(), Unwrap(), nn.Linear(8, 3)).double()
    with DistributedPipe(model, chunks=2, balance=[2, 2], timeout=FAIL_TIMEOUT) as pipe:
        try:
            pipe.step(x, y, F.cross_entropy)
            err = None
        except Exception as e:
            err = (type(e).__name__, str(e))
        _save(path, "opaque", rank, err)

    _fail_and_recover(2, rank, path)


def scenario_pp3(rank: int, world: int, path: Path) -> None:
    from gpipe.dist.pipe import DistributedPipe

    out: dict[Any, Any] = {}
    _sweep(3, out)
    _save(path, "sweep3", rank, out)
    _fail_and_recover(3, rank, path)
    _fault_matrix(3, rank, path)

    # Last: rank 1 dies inside a layer; the others must raise, not hang.
    x, y = mlp_batch()
    pipe = DistributedPipe(mlp(DieAt(2), 6), chunks=4, balance=[6, 7, 7], timeout=FAIL_TIMEOUT)
    t0 = time.monotonic()
    try:
        pipe.step(x, y, F.cross_entropy)
        err = None
    except Exception as e:
        err = (type(e).__name__, str(e))
    _save(path, "killed", rank, (err, time.monotonic() - t0))
    pipe.close()
    os._exit(0)  # the group lost a member: skip the collective teardown


def scenario_dp(rank: int, world: int, path: Path) -> None:
    from gpipe.dist.pipe import DistributedPipe

    x, y = mlp_batch()
    out: dict[Any, Any] = {}
    for sched in SCHEDULES:
        v = 2 if sched == "interleaved" else 1
        with DistributedPipe(
            mlp(), chunks=4, schedule=sched, balance=BALANCE[(2, v)], data_parallel=2
        ) as pipe:
            losses = [float(pipe.step(x, y, F.cross_entropy)) for _ in range(2)]
            norm = float(pipe.clip_grad_norm_(0.3))
            out[sched] = (losses, norm, _grads(pipe), pipe.replica, pipe.pipeline_device)
    with DistributedPipe(tiny_lm(), chunks=2, balance=[2, 2], data_parallel=2) as pipe:
        xs, ys = lm_batch(16)
        out["tied"] = (float(pipe.step(xs, ys, lm_loss)), _grads(pipe))
    with DistributedPipe(mlp(), chunks=2, balance=[9, 10], schedule="1f1b") as pipe:
        out["sum"] = (float(pipe.step(x, y, F.cross_entropy, reduction="sum")), _grads(pipe))
    import gpipe

    xi, yi = ignored_batch()
    with DistributedPipe(mlp_no_dropout(), chunks=2, balance=[9, 10], data_parallel=2) as pipe:
        loss = pipe.step(xi, yi, F.cross_entropy, reduction=gpipe.count_items())
        out["items"] = (float(loss), _grads(pipe))
    _save(path, "dp", rank, out)


SCENARIOS = {"pp2": scenario_pp2, "pp3": scenario_pp3, "dp": scenario_dp}


# ----------------------------------------------------------------------------- references


def _reference(model: nn.Module, steps: list[tuple], loss_fn: Any, chunks: int, seed: int = 0):
    losses = [
        float(reference_impl.step(model, xb, yb, loss_fn, chunks=chunks, seed=seed, step=s))
        for s, (xb, yb) in enumerate(steps)
    ]
    return losses, {n: p.grad.clone() for n, p in model.named_parameters()}


def _check(losses, grads, ref_losses, ref_grads, what: str) -> None:
    assert len(losses) == len(ref_losses) > 0, (what, losses, ref_losses)
    assert grads and set(grads) <= set(ref_grads), (what, set(grads) - set(ref_grads))
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) < TOL, f"{what}: loss {a} != reference {b}"
    for n, g in grads.items():
        err = (g - ref_grads[n]).abs().max().item()
        assert err < TOL, f"{what}: gradient of {n} differs by {err}"


@pytest.fixture(scope="module")
def pp2(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pp2")
    codes = _launch(tmp, 2, "pp2")
    assert codes == [0, 0], codes
    return tmp


@pytest.fixture(scope="module")
def pp3(tmp_path_factory) -> tuple[Path, list]:
    tmp = tmp_path_factory.mktemp("pp3")
    return tmp, _launch(tmp, 3, "pp3")


@pytest.fixture(scope="module")
def dp(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("dp")
    codes = _launch(tmp, 4, "dp")
    assert codes == [0, 0, 0, 0], codes
    return tmp


def _check_sweep(tmp: Path, k: int) -> None:
    x, y = mlp_batch()
    refs = {m: _reference(mlp(), [(x, y), (x, y)], F.cross_entropy, m) for m in MS}
    results = [_load(tmp, f"sweep{k}", r) for r in range(k)]
    names = set(dict(mlp().named_parameters()))
    for key in results[0]:
        ref_losses, ref_grads = refs[key[1]]
        covered: set[str] = set()
        for r in range(k):
            losses, grads = results[r][key]
            _check(losses, grads, ref_losses, ref_grads, f"K={k} {key} rank {r}")
            covered |= set(grads)
        assert covered == names, f"{key}: gradients missing for {names - covered}"
    assert len(results[0]) == len(SCHEDULES) * len(MS) * len(REMATS)


def _check_failure(tmp: Path, k: int) -> None:
    x, y = mlp_batch()
    ref_model = mlp(RaiseAt(-1), [9, 6][k - 2])
    # the failed step used random step 0; the recovery step is step 1, on a new batch
    x, y = mlp_batch(seed=4)
    ref_loss = float(reference_impl.step(ref_model, x, y, F.cross_entropy, chunks=4, step=1))
    ref_grads = {n: p.grad for n, p in ref_model.named_parameters()}
    for r in range(k):
        res = _load(tmp, f"fail{k}", r)
        kind, msg = res["error"]
        assert kind == ("StageError" if r == 1 else "PeerError"), (r, kind, msg)
        for part in ("rank 1", "stage 1", "micro-batch 2"):
            assert part in msg, (r, msg)
        assert res["elapsed"] < 2 * FAIL_TIMEOUT
        _check([res["loss"]], res["grads"], [ref_loss], ref_grads, f"recovery rank {r}")


# ----------------------------------------------------------------------------- tests


def test_encode_roundtrip_and_type_errors():
    value = {"a": (torch.arange(3), None, 2.5, "s", True), 3: [torch.zeros(0, 2), -7]}
    meta, tensors = encode(value)
    back = decode(meta, tensors)
    assert back[3][1] == -7 and back["a"][1:] == (None, 2.5, "s", True)
    assert torch.equal(back["a"][0], value["a"][0]) and back[3][0].shape == (0, 2)
    with pytest.raises(TypeError, match=r"stage 2, micro-batch 5.*value\['k'\]\[1\].*dict, list"):
        encode({"k": [1, object()]}, "stage 2, micro-batch 5")
    with pytest.raises(TypeError, match="meta tensor"):
        encode(torch.empty(2, device="meta"))


@pytest.mark.parametrize(
    "t",
    [
        torch.randn(2, 3),
        torch.randn(2, 3, requires_grad=True) * 2,
        torch.zeros(0, 4, dtype=torch.int64),
        torch.ones((), dtype=torch.bfloat16),
        torch.randn(4, 6).t(),  # not contiguous
    ],
)
def test_a_lone_tensors_cached_metadata_is_what_the_walk_gives(t):
    # a value that is one tensor skips the walk (its metadata is cached by shape, dtype and
    # requires_grad); the receiver must not be able to tell the difference
    from gpipe.dist import wire

    meta, tensors = encode(t)
    specs: list = []
    tree = wire._walk(t, "value", "value", [], specs)
    assert meta == wire._dumps(tree, specs)
    assert len(tensors) == 1 and not tensors[0].requires_grad
    back = decode(meta, tensors)
    assert torch.equal(back, t.detach())
    # a subclass (a Parameter) takes the walk and gives the same metadata
    p = torch.nn.Parameter(t.detach().clone().float(), requires_grad=t.requires_grad)
    assert encode(p)[0] == encode(p.detach().requires_grad_(t.requires_grad))[0]


def test_materialize_is_layer_keyed_and_keeps_ties():
    a, b = meta_lm(META_CFG), meta_lm(META_CFG)
    materialize(a, seed=3)
    materialize(b, seed=3)
    assert a.embed.tok.weight is a.head.proj.weight
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert not torch.equal(a.block0.qkv.weight, a.block1.qkv.weight)


def test_two_stages_equal_reference_every_schedule(pp2):
    _check_sweep(pp2, 2)


def test_three_stages_equal_reference_every_schedule(pp3):
    _check_sweep(pp3[0], 3)


def test_balance_by_flops_agrees_on_every_rank(pp2):
    x, y = mlp_batch()
    ref_losses, ref_grads = _reference(mlp(), [(x, y)], F.cross_entropy, 4)
    (b0, l0, g0), (b1, l1, g1) = _load(pp2, "auto", 0), _load(pp2, "auto", 1)
    assert b0 == b1 and sum(b0) == 19
    _check([l0, l1], {**g0, **g1}, ref_losses * 2, ref_grads, "auto balance")


def test_tied_embedding_clip_and_changing_shapes(pp2):
    model = tiny_lm()
    steps = [lm_batch(16), lm_batch(8)]
    ref_losses, _ = _reference(model, steps, lm_loss, 4)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05))
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters(remove_duplicate=False)}
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    ref_params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        ref_eval = float(reference_impl.step(model, *lm_batch(12), lm_loss, chunks=4, step=2))
    r0, r1 = _load(pp2, "tied", 0), _load(pp2, "tied", 1)
    assert "embed.tok.weight" in r0[2] and "head.proj.weight" in r1[2]
    for losses, norm, grads, params, evaluation in (r0, r1):
        _check(losses, grads, ref_losses, ref_grads, "tied")
        assert abs(norm - ref_norm) < TOL
        for n, p in params.items():
            assert (p - ref_params[n]).abs().max().item() < TOL, n
        assert abs(evaluation - ref_eval) < TOL
    assert torch.equal(r0[3]["embed.tok.weight"], r1[3]["head.proj.weight"])


def test_meta_model_materializes_only_the_local_share(pp2):
    for r in range(2):
        local, real, expected, rss0, rss1, stages = _load(pp2, "meta", r)
        assert local == expected == real, (r, local, real, expected)
        assert stages == [r]
        print(f"rank {r}: {local / 2**20:.1f} MiB of parameters, RSS {rss0:.0f} -> {rss1:.0f} MB")


def test_meta_model_gradients_equal_materialized_reference(pp2):
    model = materialize(meta_lm(META_CFG), seed=5)
    ref_losses, ref_grads = _reference(model, [lm_batch(16)], lm_loss, 2, seed=5)
    ref_grads = {n: p.grad for n, p in model.named_parameters(remove_duplicate=False)}
    for r in range(2):
        loss, grads = _load(pp2, "metagrad", r)
        _check([loss], grads, ref_losses, ref_grads, f"meta rank {r}")


def test_value_that_cannot_cross_names_stage_microbatch_and_path(pp2):
    kind, msg = _load(pp2, "opaque", 0)
    assert kind == "StageError"
    assert "TypeError" in msg and "stage 1, micro-batch 0" in msg and "value[1]" in msg
    kind1, msg1 = _load(pp2, "opaque", 1)
    assert kind1 == "PeerError" and "rank 0" in msg1 and "TypeError" in msg1


def test_layer_without_init_fails_construction_on_every_rank(pp2):
    kind1, msg1 = _load(pp2, "uninit", 1)
    assert kind1 == "ValueError" and "2.scale" in msg1 and "init_fn" in msg1
    kind0, msg0 = _load(pp2, "uninit", 0)
    assert kind0 == "RuntimeError" and "rank 1" in msg0 and "2.scale" in msg0


def test_raising_stage_fails_every_rank_then_recovers(pp2, pp3):
    _check_failure(pp2, 2)
    _check_failure(pp3[0], 3)


def test_fault_matrix_every_stage_forward_and_backward(pp3):
    tmp, _ = pp3
    results = [_load(tmp, "faults3", r) for r in range(3)]
    names = sorted(n for n, _ in fault_model(3).named_parameters())
    for s in range(3):
        for mb in (0, 3):
            for where in ("forward", "backward"):
                covered: list[str] = []
                for r in range(3):
                    err, elapsed, (loss_err, grad_err, local) = results[r][(s, mb, where)]
                    # the step after the fault, on a new batch, equals the reference step
                    assert loss_err < TOL and grad_err < TOL, (s, mb, where, r, loss_err, grad_err)
                    covered += local
                    assert err is not None, (s, mb, where, r)
                    kind, msg = err
                    assert kind == ("StageError" if r == s else "PeerError"), (s, mb, where, r, err)
                    for part in (f"stage {s}", f"micro-batch {mb}"):
                        assert part in msg, (s, mb, where, r, msg)
                    if r != s:
                        assert f"rank {s}" in msg, msg
                    assert elapsed < 2 * FAIL_TIMEOUT
                assert sorted(covered) == names, (s, mb, where, covered)
    for r in range(3):
        err, elapsed = results[r]["stall"]
        assert err is not None, r
        assert elapsed < 2 * STALL_TIMEOUT + 1.0, (r, elapsed, err)


def test_killed_rank_makes_the_others_raise(pp3):
    tmp, codes = pp3
    assert codes[1] == 17, codes
    for r in (0, 2):
        err, elapsed = _load(tmp, "killed", r)
        assert err is not None and "rank 1" in err[1], err
        assert elapsed < 2 * FAIL_TIMEOUT, elapsed
        assert codes[r] == 0


def test_data_parallel_times_pipeline_equals_reference(dp):
    x, y = mlp_batch()
    ref_losses, _ = _reference(model := mlp(), [(x, y), (x, y)], F.cross_entropy, 8)
    ref_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3))
    ref_grads = {n: p.grad for n, p in model.named_parameters()}
    results = [_load(dp, "dp", r) for r in range(4)]
    for sched in SCHEDULES:
        for r in range(4):
            losses, norm, grads, replica, device = results[r][sched]
            assert (replica, device) == (r // 2, r % 2)
            _check(losses, grads, ref_losses, ref_grads, f"DP {sched} rank {r}")
            assert abs(norm - ref_norm) < TOL
    lm = tiny_lm()
    ref_loss, ref_lm = _reference(lm, [lm_batch(16)], lm_loss, 4)
    ref_lm = {n: p.grad for n, p in lm.named_parameters(remove_duplicate=False)}
    for r in range(4):
        loss, grads = results[r]["tied"]
        _check([loss], grads, ref_loss, ref_lm, f"DP tied rank {r}")
    model = mlp()
    loss = float(reference_impl.step(model, x, y, F.cross_entropy, chunks=4, reduction="sum"))
    ref_sum = {n: p.grad for n, p in model.named_parameters()}
    for r in range(4):
        _check([results[r]["sum"][0]], results[r]["sum"][1], [loss], ref_sum, f"DP sum rank {r}")

    # a mean over the targets not ignored, items unevenly spread over replicas and
    # micro-batches (one without any): the plain model's loss on the whole batch
    model = mlp_no_dropout()
    xi, yi = ignored_batch()
    loss = F.cross_entropy(model(xi), yi)
    loss.backward()
    ref_items = {n: p.grad for n, p in model.named_parameters()}
    for r in range(4):
        got_loss, got = results[r]["items"]
        _check([got_loss], got, [loss.item()], ref_items, f"DP items rank {r}")
