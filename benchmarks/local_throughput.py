"""Step time of the one-process runtime (``gpipe.Pipe``) against the plain model.

Trains the flagship Transformer LM (``small`` preset by default) for a few steps and reports
the median step time of: the plain model with 1 and with all intra-op threads, the plain model
run micro-batch by micro-batch on 1 thread (what a pipeline stage really computes), and
``gpipe.Pipe`` for every schedule and micro-batch count. Speed-ups are against the 1-thread plain
model; "of bound" compares with the ideal K·M/(M+K−1).

    python benchmarks/local_throughput.py            # full table
    python benchmarks/local_throughput.py --quick    # smoke run (< 1 minute)
    python benchmarks/local_throughput.py --schedules zb-h1,zb-h1:every   # NAME:every is the
        # zero-bubble schedule with every backward split, as its paper lays it out

Prints a markdown table and writes JSON next to it (``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

import gpipe
from gpipe import schedules
from gpipe.local.autotune import median_time
from gpipe.models import TransformerConfig, TransformerLM, lm_loss
from gpipe.models.transformer import Block
from gpipe.schedules.zero_bubble import every_split
from gpipe.stage.stage import Stage
from gpipe.trace import bubble_fraction

# thread CPU time of every Stage action, by (stage object id, action kind): a measure of the
# work itself that the other processes on a shared machine disturb far less than wall time
CPU: dict[tuple[int, str], list[float]] = {}


def _timed_stage_actions() -> None:
    """Record each ``Stage.backward`` / ``backward_weight`` call's thread CPU time in ``CPU``."""
    for name, kind in (("backward", "B"), ("backward_weight", "W")):
        orig = getattr(Stage, name)

        def timed(self: Stage, *a: object, _orig=orig, _kind=kind, **k: object) -> object:
            t = time.thread_time()
            try:
                return _orig(self, *a, **k)
            finally:
                CPU.setdefault((id(self), _kind), []).append(time.thread_time() - t)

        setattr(Stage, name, timed)


@dataclass
class Config:
    """One row: what one step runs, with how many intra-op threads, and what it measured."""

    name: str
    fn: Callable[[], object]
    threads: int
    pipe: gpipe.Pipe | None = None
    meta: dict = field(default_factory=dict)
    times: list[float] = field(default_factory=list)  # one median per round
    # per stage and action kind ("B", "W"): durations of every timed action, in seconds
    actions: dict[tuple[int, str], list[float]] = field(default_factory=dict)

    def record(self) -> None:
        """Keep the durations of the last step's backward actions."""
        assert self.pipe is not None
        for e in self.pipe.last_events:
            if e.action.kind in "BW":
                key = (e.action.stage, e.action.kind)
                self.actions.setdefault(key, []).append(e.end - e.start)

    def backward_cpu_ms(self) -> list[float]:
        """Per stage: the thread CPU time of one micro-batch's backward (its ``B`` and, where
        split, its ``W``), the mean over all micro-batches (a schedule may split some only)."""
        assert self.pipe is not None and self.pipe._stages is not None
        return [_per_backward(CPU.get((id(st), "B")), CPU.get((id(st), "W"))) for st in
                self.pipe._stages]  # fmt: skip

    def backward_ms(self, num_stages: int) -> list[float]:
        """Per stage: one micro-batch's backward (``B``, plus ``W`` where split), the mean."""
        return [
            _per_backward(self.actions.get((s, "B")), self.actions.get((s, "W")))
            for s in range(num_stages)
        ]


def _per_backward(b: list[float] | None, w: list[float] | None) -> float:
    """Milliseconds of backward per micro-batch: all ``B`` and ``W`` time over the ``B`` count."""
    return (sum(b or []) + sum(w or [])) / max(len(b or []), 1) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--chunks", default="1,2,4,8")
    ap.add_argument("--schedules", default="gpipe,1f1b,interleaved,zb-h1")
    ap.add_argument("--remat", default="never")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="configurations alternate this often")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument(
        "--uniform",
        type=int,
        default=0,
        metavar="N",
        help="instead of the LM, N identical Transformer blocks on float input with an MSE loss: "
        "every stage costs the same, so the rows compare the schedules alone (the LM's "
        "embedding and head make some placements uneven)",
    )
    ap.add_argument("--quick", action="store_true", help="few configurations, few steps")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    _timed_stage_actions()
    if args.quick:
        args.chunks, args.schedules, args.steps, args.warmup = "4", "gpipe,1f1b,zb-h1", 3, 1
        args.rounds = 1

    cfg = TransformerConfig.preset(args.preset).replace(dropout=args.dropout)
    k = args.stages
    g = torch.Generator().manual_seed(0)
    if args.uniform:
        x = torch.randn(args.batch, args.seq, cfg.d_model, generator=g)
        y = torch.randn(args.batch, args.seq, cfg.d_model, generator=g)
        loss_fn: Callable[..., torch.Tensor] = _mse

        def make() -> nn.Sequential:
            torch.manual_seed(0)
            return nn.Sequential(*[Block(cfg) for _ in range(args.uniform)])
    else:
        x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
        y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
        loss_fn = lm_loss

        def make() -> nn.Sequential:
            torch.manual_seed(0)
            return TransformerLM(cfg)

    cores = torch.get_num_threads()
    configs: list[Config] = []
    model = make()

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    configs.append(Config("plain, 1 thread", plain, 1))
    configs.append(Config(f"plain, {cores} threads", plain, cores))
    for m in [int(c) for c in args.chunks.split(",")]:

        def plain_micro(m: int = m) -> None:
            model.zero_grad(set_to_none=True)
            for xm, ym in zip(x.chunk(m), y.chunk(m)):
                (loss_fn(model(xm), ym) / m).backward()

        configs.append(Config(f"plain, 1 thread, M={m} sequential", plain_micro, 1))
        for sched in args.schedules.split(","):
            lm = make()
            name, _, how = sched.partition(":")  # "zb-h1:every": every backward split
            v = 2 if name.startswith("interleaved") else None
            if (v or 1) * k > len(lm):
                continue
            built = every_split(name, k, m, v) if how == "every" else name
            pipe = gpipe.Pipe(
                lm, stages=k, chunks=m, schedule=built, virtual_stages=v, remat=args.remat
            )
            c = Config(f"gpipe.Pipe {sched}, K={k}, M={m}, remat={args.remat}", plain, cores, pipe)

            def step(pipe: gpipe.Pipe = pipe, lm: nn.Module = lm, c: Config = c) -> None:
                lm.zero_grad(set_to_none=True)
                pipe.step(x, y, loss_fn)
                c.record()

            c.fn = step
            c.meta = {"sched": sched, "m": m, "bound": k * m / (m + k - 1)}
            configs.append(c)

    for r in range(args.rounds):
        # odd rounds run the configurations in reverse, so the machine's drift within a round
        # favours neither side of a paired ratio
        for c in configs if r % 2 == 0 else configs[::-1]:
            torch.set_num_threads(c.threads)
            c.times.append(median_time(c.fn, args.steps, args.warmup if r == 0 else 1))
    torch.set_num_threads(cores)

    t_plain1 = statistics.median(configs[0].times)
    rows = []
    for c in configs:
        row = {"config": c.name, "time": statistics.median(c.times), "rounds": c.times}
        if c.pipe is not None:
            n_stages = len(c.pipe.balance)
            row.update(
                bound=c.meta["bound"],
                bubble=bubble_fraction(c.pipe.last_events, k),
                balance=c.pipe.balance,
                backward_ms=c.backward_ms(n_stages),
                backward_cpu_ms=c.backward_cpu_ms(),
                schedule=c.meta["sched"],
                m=c.meta["m"],
                fallback=[len(st.fallback_parameters()) for st in c.pipe._stages or []],
            )
            c.pipe.close()
        rows.append(row)

    what = (
        f"{args.uniform} Transformer blocks of {args.preset} on float input, MSE"
        if args.uniform
        else f"TransformerLM {args.preset}"
    )
    print(f"machine: {platform.machine()}, {cores} threads, torch {torch.__version__}")
    print(f"model: {what} (dropout {args.dropout}), batch {args.batch} x {args.seq}")
    print(
        f"median of {args.rounds} rounds (configurations alternate), each the median of "
        f"{args.steps} steps"
    )
    print()
    print(
        "| configuration | step (s) | speed-up vs 1-thread plain | of bound | measured bubble "
        "| backward per micro-batch, per stage (ms) | same, thread CPU time (ms) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | --- | --- |")
    for r in rows:
        sp = t_plain1 / r["time"]
        r["speedup"] = sp
        ofb = f"{sp / r['bound']:.0%}" if "bound" in r else ""
        bub = f"{r['bubble']:.0%}" if "bubble" in r else ""
        bwd = " / ".join(f"{t:.1f}" for t in r["backward_ms"]) if "backward_ms" in r else ""
        cpu = " / ".join(f"{t:.1f}" for t in r.get("backward_cpu_ms", []))
        print(f"| {r['config']} | {r['time']:.3f} | {sp:.2f}x | {ofb} | {bub} | {bwd} | {cpu} |")
    _split_versus_whole(rows)
    _paired(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


def _paired(rows: list[dict]) -> None:
    """Each schedule against 1F1B and interleaved at the same M, paired round by round: the
    median over rounds of the ratio of the two rounds' times. Configurations of one round run
    seconds apart, so a slow spell of the machine (rounds here differ by up to 25%) slows
    both sides of a ratio alike, where the medians of the times above do not cancel it."""
    pipes = [r for r in rows if "schedule" in r]
    print("\npaired with the same round's 1f1b / interleaved (median over rounds):")
    for r in pipes:
        out = []
        for base in ("1f1b", "interleaved"):
            b = next((x for x in pipes if x["schedule"] == base and x["m"] == r["m"]), None)
            if b is not None and b is not r:
                ratios = [t / u for t, u in zip(r["rounds"], b["rounds"])]
                r[f"paired_{base}"] = statistics.median(ratios)
                out.append(f"{statistics.median(ratios):.3f}x {base}")
        if out:
            print(f"- {r['schedule']}, M={r['m']}: " + ", ".join(out))


def _mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return ((out - target) ** 2).mean()


def _split_versus_whole(rows: list[dict]) -> None:
    """One line per M: each split schedule's B+W per stage against 1F1B's whole backward."""
    whole = {r["m"]: r for r in rows if r.get("schedule") == "1f1b"}
    lines = []
    for r in rows:
        base = whole.get(r.get("m"))
        if base is None or r.get("schedule") in (None, "1f1b") or "fallback" not in r:
            continue
        if r["schedule"].partition(":")[0] not in _split_names():
            continue
        ratios = ", ".join(
            f"stage {s}: {a:.1f} vs {b:.1f} ms ({a / b:.2f}x; CPU {ac:.1f} vs {bc:.1f}, "
            f"{ac / bc:.2f}x)"
            for s, (a, b, ac, bc) in enumerate(
                zip(
                    r["backward_ms"],
                    base["backward_ms"],
                    r["backward_cpu_ms"],
                    base["backward_cpu_ms"],
                )
            )
        )
        lines.append(
            f"- {r['schedule']}, M={r['m']}: B+W per micro-batch vs 1f1b's backward — {ratios}; "
            f"step {r['time'] / base['time']:.2f}x 1f1b's; parameters on the graph fallback "
            f"per stage: {r['fallback']}"
        )
    if lines:
        print()
        print("\n".join(lines))


def _split_names() -> list[str]:
    return [n for n in schedules.available() if schedules.get(n, 2, 4).split_backward]


if __name__ == "__main__":
    main()
