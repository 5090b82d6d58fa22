"""The models, the trainer's schedule and DeferredBatchNorm against formulas written out here.

Every expected value is computed from the textbook definition (explicit matmuls, a causal mask,
softmax, LayerNorm, GELU; warm-up + cosine; batch mean and unbiased variance), never by calling
the code under test, so a wrong block, schedule or statistic fails instead of agreeing with
itself. float64 throughout, ≤ 1e-10 unless a documented float32 step says otherwise.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import gpipe
from gpipe.models import TransformerConfig, TransformerLM, lm_loss
from gpipe.models.transformer import Block, sinusoidal_positions
from gpipe.nn import DeferredBatchNorm, convert_deferred_batch_norm
from gpipe.train.data import Corpus
from gpipe.train.loop import TrainConfig, Trainer

TOL = 1e-10
CFG = TransformerConfig(
    vocab_size=19, d_model=12, n_heads=3, d_ff=20, n_layers=2, max_seq_len=16, dropout=0.0
)


def _randomize(module: nn.Module, seed: int) -> None:
    """Every parameter to random values (LayerNorm scales and all biases too, so none of them
    can hide behind its identity initialization)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.4)


# ----------------------------------------------------------------------------- formulas


def linear(x: torch.Tensor, lin: nn.Linear) -> torch.Tensor:
    return x @ lin.weight.T + lin.bias


def layer_norm(x: torch.Tensor, ln: nn.LayerNorm) -> torch.Tensor:
    mean = x.sum(-1, keepdim=True) / x.shape[-1]
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.shape[-1]  # biased, as LayerNorm's
    return (x - mean) / torch.sqrt(var + ln.eps) * ln.weight + ln.bias


def gelu(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))  # the exact (erf) GELU


def softmax(s: torch.Tensor) -> torch.Tensor:
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def causal_attention(h: torch.Tensor, block: Block, heads: int) -> torch.Tensor:
    """Multi-head causal self-attention of ``h [B, T, d]``: per head ``softmax(q kᵀ/√dₕ + mask) v``
    with ``mask[i, j] = -inf`` for ``j > i``, heads concatenated, then the output projection."""
    _, t, d = h.shape
    dh = d // heads
    wq, wk, wv = block.qkv.weight.split(d, dim=0)
    bq, bk, bv = block.qkv.bias.split(d, dim=0)
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    outs = []
    for i in range(heads):
        cols = slice(i * dh, (i + 1) * dh)
        q = h @ wq[cols].T + bq[cols]
        k = h @ wk[cols].T + bk[cols]
        v = h @ wv[cols].T + bv[cols]
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        scores = scores.masked_fill(future, -math.inf)
        outs.append(softmax(scores) @ v)
    return linear(torch.cat(outs, dim=-1), block.proj)


def block_formula(x: torch.Tensor, block: Block, heads: int) -> torch.Tensor:
    """Pre-LayerNorm residual block: ``x + attn(ln1(x))``, then ``+ ff2(gelu(ff1(ln2(·))))``."""
    x = x + causal_attention(layer_norm(x, block.ln1), block, heads)
    return x + linear(gelu(linear(layer_norm(x, block.ln2), block.ff1)), block.ff2)


def positions_formula(t: int, d: int) -> torch.Tensor:
    """``PE[p, 2i] = sin(p / 10000^(2i/d))``, ``PE[p, 2i+1] = cos(p / 10000^(2i/d))``."""
    table = torch.zeros(t, d, dtype=torch.float64)
    for p in range(t):
        for c in range(d):
            angle = p / 10000 ** ((c - c % 2) / d)
            table[p, c] = math.sin(angle) if c % 2 == 0 else math.cos(angle)
    return table


def cross_entropy_formula(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    z = logits.reshape(-1, logits.shape[-1])
    top = z.max(-1, keepdim=True).values
    log_norm = top.squeeze(-1) + torch.log(torch.exp(z - top).sum(-1))
    picked = z.gather(1, targets.reshape(-1, 1)).squeeze(1)
    return (log_norm - picked).mean()


# ----------------------------------------------------------------------------- Transformer


def _block() -> Block:
    block = Block(CFG).double()
    _randomize(block, 1)
    return block


def _hidden(b: int = 3, t: int = 7) -> torch.Tensor:
    return torch.randn(
        b, t, CFG.d_model, dtype=torch.float64, generator=torch.Generator().manual_seed(2)
    )


def test_attention_equals_explicit_causal_softmax() -> None:
    """With the feed-forward branch zeroed, the block is ``x + attention(ln1(x))``."""
    block = _block()
    with torch.no_grad():
        block.ff2.weight.zero_()
        block.ff2.bias.zero_()
    x = _hidden()
    want = x + causal_attention(layer_norm(x, block.ln1), block, CFG.n_heads)
    assert (block(x) - want).abs().max().item() <= TOL
    assert (want - x).abs().max().item() > 0.1  # the attention branch is not trivially small


def test_block_equals_formula_train_and_eval() -> None:
    block = _block()
    x = _hidden()
    want = block_formula(x, block, CFG.n_heads)
    assert (block.train()(x) - want).abs().max().item() <= TOL  # dropout 0: train == eval
    assert (block.eval()(x) - want).abs().max().item() <= TOL


def test_block_gradients_equal_formula_gradients() -> None:
    block = _block()
    x = _hidden().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    (block(x) ** 2).sum().backward()
    got = [p.grad.clone() for p in block.parameters()] + [x.grad]
    block.zero_grad()
    (block_formula(x2, block, CFG.n_heads) ** 2).sum().backward()
    want = [p.grad for p in block.parameters()] + [x2.grad]
    assert len(got) == len(want) == 13
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-9


def test_sinusoidal_positions_equal_formula() -> None:
    """The table is float32 by design (documented), so float32 accuracy is what it owes."""
    for t, d in [(9, 12), (5, 7)]:
        table = sinusoidal_positions(t, d)
        assert table.dtype == torch.float32 and table.shape == (t, d)
        assert (table.double() - positions_formula(t, d)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("tied", [False, True])
def test_transformer_lm_logits_equal_formula(tied: bool) -> None:
    torch.manual_seed(0)
    model = TransformerLM(CFG.replace(tie_embeddings=tied)).double()
    _randomize(model, 3)
    tokens = torch.randint(0, CFG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(4))
    emb = model[0].tok.weight
    # embedding: scaled token rows plus the (float32, see above) position table
    x = emb[tokens] * math.sqrt(CFG.d_model) + sinusoidal_positions(9, CFG.d_model).double()
    for i in range(CFG.n_layers):
        x = block_formula(x, model[1 + i], CFG.n_heads)
    head = model[-1]
    proj = emb if tied else head.proj.weight
    want = layer_norm(x, head.ln) @ proj.T + head.proj.bias
    got = model(tokens)
    assert got.shape == (2, 9, CFG.vocab_size)
    assert (got - want).abs().max().item() <= TOL


def test_lm_loss_equals_cross_entropy_formula_float32() -> None:
    logits = torch.randn(2, 5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(6))
    want = cross_entropy_formula(logits, targets)
    assert lm_loss(logits, targets).item() == pytest.approx(want.item(), rel=1e-6)


def test_lm_loss_keeps_float64_precision() -> None:
    logits = torch.randn(2, 5, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    targets = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(6))
    got = lm_loss(logits, targets)
    assert got.dtype == torch.float64
    assert abs(got.item() - cross_entropy_formula(logits, targets).item()) <= TOL


# ----------------------------------------------------------------------------- trainer


def schedule_formula(step: int, lr: float, warmup: int, steps: int, final: float) -> float:
    """Linear warm-up reaching ``lr`` at step ``warmup - 1``, then a half cosine from ``lr`` at
    step ``warmup`` down to ``lr * final`` at step ``steps``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / (steps - warmup)
    low = lr * final
    return low + (lr - low) * (1 + math.cos(math.pi * progress)) / 2


def test_trainer_applies_warmup_cosine_schedule_to_the_optimizer(tmp_path: Path) -> None:
    """A real (tiny) training run; the learning rate is read from the optimizer's param groups
    at the moment ``optimizer.step`` runs, i.e. what the update actually uses."""
    g = torch.Generator().manual_seed(0)
    text = torch.randint(0, 256, (3000,), generator=g, dtype=torch.uint8)
    corpus = Corpus(text[:2500], text[2500:], ("train",), ("val",), "random bytes")
    lr, warmup, steps, final = 2e-3, 3, 9, 0.2
    config = TrainConfig(
        model_preset="tiny",
        stages=2,
        chunks=2,
        batch_size=4,
        seq_len=8,
        steps=steps,
        warmup=warmup,
        lr=lr,
        final_lr_ratio=final,
        eval_interval=0,
        eval_batches=1,
        checkpoint_interval=0,
        out=str(tmp_path),
    )
    trainer = Trainer(config, corpus=corpus)
    seen: list[list[float]] = []
    real_step = trainer.optimizer.step

    def step(*args, **kwargs):
        seen.append([group["lr"] for group in trainer.optimizer.param_groups])
        return real_step(*args, **kwargs)

    trainer.optimizer.step = step
    try:
        records = [r for r in trainer.run() if r["kind"] == "step"]
    finally:
        trainer.close()
    want = [schedule_formula(s, lr, warmup, steps, final) for s in range(steps)]
    assert len(seen) == len(records) == steps
    assert want[warmup - 1] == lr and want[0] == lr / warmup  # the formula's own anchors
    for s, (groups, record) in enumerate(zip(seen, records)):
        assert len(groups) == len(trainer.optimizer.param_groups) >= 1
        for got in groups:
            assert got == pytest.approx(want[s], rel=1e-12, abs=0), (s, groups, want[s])
        assert record["lr"] == pytest.approx(want[s], rel=1e-12, abs=0)


# ----------------------------------------------------------------------------- DeferredBatchNorm

MOMENTA = [0.1, 0.5, None, 0.0, 1.0]
KINDS = [  # (layer, input shape): every kind convert() replaces, 1d with and without length
    (nn.BatchNorm1d, (8, 3)),
    (nn.BatchNorm1d, (8, 3, 5)),
    (nn.BatchNorm2d, (8, 3, 4, 2)),
    (nn.BatchNorm3d, (8, 3, 2, 3, 2)),
    (nn.SyncBatchNorm, (8, 3, 4)),  # converted before it ever runs (it needs a process group)
]


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-channel mean, biased and unbiased variance of ``x`` over all but dimension 1."""
    xc = x.transpose(0, 1).reshape(x.shape[1], -1)
    n = xc.shape[1]
    mean = xc.sum(1) / n
    sq = ((xc - mean[:, None]) ** 2).sum(1)
    return mean, sq / n, sq / (n - 1)


def _channel(v: torch.Tensor, dims: int) -> torch.Tensor:
    return v.reshape(1, -1, *([1] * (dims - 2)))


@pytest.mark.parametrize(  # by default each kind with one momentum, so every momentum once
    ("kind", "shape", "momentum", "chunks"),
    [
        pytest.param(
            kind,
            shape,
            momentum,
            chunks,
            id=f"{chunks}-{kind.__name__}-{len(shape)}d-{momentum}",
            marks=() if i == j else pytest.mark.slow,
        )
        for chunks in (1, 4)
        for i, (kind, shape) in enumerate(KINDS)
        for j, momentum in enumerate(MOMENTA)
    ],
)
def test_deferred_batchnorm_running_stats_equal_formula(
    kind: type, shape: tuple, momentum: float | None, chunks: int
) -> None:
    """Three steps of M micro-batches each; after every step the running statistics are the
    momentum update (or, for ``None``, the cumulative average over steps) of the whole
    mini-batch's mean and unbiased variance, and each micro-batch was normalized with its own
    biased statistics."""
    g = torch.Generator().manual_seed(7)
    plain = kind(3, momentum=momentum).double()
    with torch.no_grad():
        plain.weight.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
        plain.bias.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        plain.running_mean.copy_(torch.randn(3, generator=g, dtype=torch.float64))
        plain.running_var.copy_(torch.rand(3, generator=g, dtype=torch.float64) + 0.5)
    plain.num_batches_tracked.fill_(2)  # as if two steps had been tracked before conversion
    bn = convert_deferred_batch_norm(nn.Sequential(plain), chunks)[0]
    assert type(bn) is DeferredBatchNorm
    mean, var = plain.running_mean.clone(), plain.running_var.clone()
    tracked = 2
    for _ in range(3):
        x = torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1
        for mb in torch.chunk(x, chunks):
            out = bn(mb)
            mb_mean, mb_var, _ = _stats(mb)
            normed = (mb - _channel(mb_mean, mb.dim())) / torch.sqrt(
                _channel(mb_var, mb.dim()) + bn.eps
            )
            want = normed * _channel(plain.weight, mb.dim()) + _channel(plain.bias, mb.dim())
            assert (out - want).abs().max().item() <= TOL
        tracked += 1
        factor = 1.0 / tracked if momentum is None else momentum
        step_mean, _, step_var = _stats(x)
        mean = (1 - factor) * mean + factor * step_mean
        var = (1 - factor) * var + factor * step_var
        assert (bn.running_mean - mean).abs().max().item() <= TOL
        assert (bn.running_var - var).abs().max().item() <= TOL
        assert bn.num_batches_tracked.item() == tracked
    bn.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    want = (x - _channel(mean, x.dim())) / torch.sqrt(_channel(var, x.dim()) + bn.eps)
    want = want * _channel(plain.weight, x.dim()) + _channel(plain.bias, x.dim())
    assert (bn(x) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("momentum", [0.3, None], ids=str)
def test_deferred_batchnorm_in_a_pipe_with_remat_equals_formula(momentum: float | None) -> None:
    """Through the pipeline with re-materialization (the recompute must add nothing)."""
    g = torch.Generator().manual_seed(8)
    model = nn.Sequential(nn.BatchNorm2d(3, momentum=momentum), nn.Conv2d(3, 2, 1)).double()
    pipe = gpipe.Pipe(model, balance=[1, 1], chunks=4, remat="always", deferred_batch_norm=True)
    bn = pipe[0]
    mean, var = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    for step in range(2):
        x = torch.randn(8, 3, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
        pipe(x).sum().backward()
        factor = 1.0 / (step + 1) if momentum is None else momentum
        step_mean, _, step_var = _stats(x)
        mean = (1 - factor) * mean + factor * step_mean
        var = (1 - factor) * var + factor * step_var
        assert (bn.running_mean - mean).abs().max().item() <= TOL
        assert (bn.running_var - var).abs().max().item() <= TOL
    pipe.close()


# ----------------------------------------------------------------------------- schedules
# Idle time per device and peak live activations of the schedules, from the papers' tables,
# against the simulator. Costs F, B (input gradient), W (weight gradient) are per device (the
# whole model's share on it); V-shaped schedules split them over their two stages. Every
# device does the same work, so the idle time is makespan - busy on each.
#
# * 1F1B: (K-1)(F+B+W), K micro-batches on device 0 — Narayanan et al., "Efficient
#   Large-Scale Language Model Training on GPU Clusters" (2021), §2.2.1; and Table 1 below.
# * ZB-H1: (K-1)(F+B-W), at most K micro-batches; ZB-H2: (K-1)(F+B-2W), 2K-1 micro-batches —
#   Qi et al., "Zero Bubble Pipeline Parallelism", arXiv 2401.10241, §2.1-2.2. One step alone
#   cannot hide the ramp of the first forwards, (K-1)·F (the paper lets consecutive steps
#   overlap, its optimizer post-validation), so the simulated idle time is the larger.
# * ZB-V: same arXiv 2401.10241, §6: 1F1B's memory (K whole-device units, i.e. 2K stage
#   activations of half size) and, with F = W, idle (K-1)(F+B-2W) or the one-step ramp
#   (K-1)·F/2: zero bubble beyond the ramp when F = B = W.
# * DualPipeV: DeepSeek-AI, DualPipe (github.com/deepseek-ai/DualPipe, README table; DeepSeek-V3
#   technical report arXiv 2412.19437, Table 2): bubble (PP/2-1)(F&B + B - 3W) and PP+1
#   activations per device, with PP = 2K stages, per-stage costs F, B, W, and F&B the
#   overlapped pair (here run in turn: F + B + W).
# * Interleaved zero bubble (torch.distributed.pipelining's ScheduleInterleavedZeroBubble, the
#   paper's ZB-H1 rule on interleaved 1F1B's order): no published table, so the expectation is
#   ZB-H1's, arXiv 2401.10241 §2.1, with per-stage costs F/V, B/V, W/V — idle
#   (K-1)·max(F, F+B-W)/V per device (the ramp (K-1)·F/V when W > B) and ZB-H1's K
#   whole-device units of memory, i.e. V·K stage activations of 1/V size.

SCHED_KS = [2, 3, 4, 8]


def _idle(name: str, k: int, m: int, f: float, b: float, w: float, **kw: float) -> list[float]:
    from gpipe.planner.simulate import simulate
    from gpipe.schedules import get

    s = get(name, k, m)
    v = s.virtual_stages
    r = simulate(s, f / v, (b + w) / v, weight_costs=w / v, **kw)
    return [r.makespan - busy for busy in r.busy]


@pytest.mark.parametrize("k", SCHED_KS)
@pytest.mark.parametrize("mult", [2, 4])
@pytest.mark.parametrize(("f", "b", "w"), [(1, 1, 1), (1, 2, 1), (1, 1.5, 0.5), (2, 1, 1)])
def test_zero_bubble_idle_times_equal_published_formulas(
    k: int, mult: int, f: float, b: float, w: float
) -> None:
    m = k * mult
    expect = {
        "1f1b": (k - 1) * (f + b + w),
        "zb-h1": (k - 1) * (f + b - w),
        "zb-h2": (k - 1) * max(f, f + b - 2 * w),
        "interleaved-zb": (k - 1) * max(f, f + b - w) / 2,  # default V = 2
    }
    for name, want in expect.items():
        if name == "1f1b":
            from gpipe.planner.simulate import simulate
            from gpipe.schedules import get

            r = simulate(get(name, k, m), f, b + w)
            idle = [r.makespan - busy for busy in r.busy]
        else:
            idle = _idle(name, k, m, f, b, w)
        assert idle == pytest.approx([want] * k, abs=1e-9), name


@pytest.mark.parametrize("k", SCHED_KS)
@pytest.mark.parametrize("mult", [1, 2])
@pytest.mark.parametrize(("f", "b", "w"), [(1, 0.5, 1), (1, 1, 2), (2, 1, 1.5)])
def test_interleaved_zero_bubble_idles_the_ramp_when_w_exceeds_b(
    k: int, mult: int, f: float, b: float, w: float
) -> None:
    idle = _idle("interleaved-zb", k, k * mult, f, b, w)
    assert idle == pytest.approx([(k - 1) * f / 2] * k, abs=1e-9)


@pytest.mark.parametrize("k", SCHED_KS)
@pytest.mark.parametrize("mult", [2, 4])
@pytest.mark.parametrize(("f", "b"), [(1, 1), (1, 2), (1, 3), (0.5, 2)])
def test_zb_v_idle_time_equals_published_formula_with_f_equal_w(
    k: int, mult: int, f: float, b: float
) -> None:
    w = f
    idle = _idle("zb-v", k, k * mult, f, b, w)
    assert idle == pytest.approx([(k - 1) * max(f / 2, f + b - 2 * w)] * k, abs=1e-9)


@pytest.mark.parametrize("k", SCHED_KS)
@pytest.mark.parametrize("mult", [2, 4])
def test_dualpipe_v_bubble_and_activations_equal_published_formulas(k: int, mult: int) -> None:
    from gpipe.planner.simulate import simulate
    from gpipe.schedules import get

    c = 0.5  # F = B = W per stage (1 per device)
    pp = 2 * k
    f_and_b = c + c + c  # the pair and its W, in turn
    idle = _idle("dualpipe-v", k, k * mult, 2 * c, 2 * c, 2 * c)
    assert idle == pytest.approx([(pp / 2 - 1) * (f_and_b + c - 3 * c)] * k, abs=1e-9)
    assert simulate(get("dualpipe-v", k, k * mult)).peak_activations == (pp + 1,) * k


@pytest.mark.parametrize("k", SCHED_KS)
@pytest.mark.parametrize("mult", [2, 4])
def test_zero_bubble_peak_activations_equal_published_formulas(k: int, mult: int) -> None:
    from gpipe.planner.simulate import simulate
    from gpipe.schedules import get

    m = k * mult
    assert simulate(get("zb-h1", k, m)).peak_activations == (k,) * k
    assert simulate(get("zb-h2", k, m)).peak_activations == (2 * k - 1,) * k
    assert simulate(get("zb-v", k, m)).peak_activations == (2 * k,) * k  # K whole-device units
    for v in (2, 3):  # K whole-device units of V·K chunk activations
        s = get("interleaved-zb", k, m, virtual_stages=v)
        assert simulate(s).peak_activations == (v * k,) * k


def test_zb_v_beats_zb_h1_within_1f1b_memory() -> None:
    """K=4, M=16, F = B = W: ZB-V's bubble is below ZB-H1's, and its peak per device, in
    whole-device units (two half-size stages make one), is at most 1F1B's."""
    from gpipe.planner.simulate import simulate
    from gpipe.schedules import get

    zbv = simulate(get("zb-v", 4, 16), 0.5, 1.0, weight_costs=0.5)
    zbh1 = simulate(get("zb-h1", 4, 16), 1.0, 2.0, weight_costs=1.0)
    one = simulate(get("1f1b", 4, 16), 1.0, 3.0)
    assert zbv.bubble < zbh1.bubble < one.bubble
    assert max(p / 2 for p in zbv.peak_activations) <= max(one.peak_activations)
