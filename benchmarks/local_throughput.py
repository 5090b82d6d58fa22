"""Step time of the one-process runtime (``gpipe.Pipe``) against the plain model.

Trains the flagship Transformer LM (``small`` preset by default) for a few steps and reports
the median step time of: the plain model with 1 and with all intra-op threads, the plain model
run micro-batch by micro-batch on 1 thread (what a pipeline stage really computes), and
``gpipe.Pipe`` for every schedule and micro-batch count. Speed-ups are against the 1-thread plain
model; "of bound" compares with the ideal K·M/(M+K−1).

    python benchmarks/local_throughput.py            # full table
    python benchmarks/local_throughput.py --quick    # smoke run (< 1 minute)

Prints a markdown table and writes JSON next to it (``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable

import torch

import gpipe
from gpipe.models import TransformerConfig, TransformerLM, lm_loss
from gpipe.trace import bubble_fraction


def median_time(fn: Callable[[], object], steps: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


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
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--quick", action="store_true", help="few configurations, few steps")
    ap.add_argument("--json", default=None, help="write results here")
    args = ap.parse_args()
    if args.quick:
        args.chunks, args.schedules, args.steps, args.warmup = "4", "gpipe,1f1b", 3, 1

    cfg = TransformerConfig.preset(args.preset).replace(dropout=args.dropout)
    k = args.stages
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    cores = torch.get_num_threads()
    rows = []

    torch.manual_seed(0)
    model = TransformerLM(cfg)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        lm_loss(model(x), y).backward()

    torch.set_num_threads(1)
    t_plain1 = median_time(plain, args.steps, args.warmup)
    rows.append({"config": "plain, 1 thread", "time": t_plain1})
    torch.set_num_threads(cores)
    t_plainn = median_time(plain, args.steps, args.warmup)
    rows.append({"config": f"plain, {cores} threads", "time": t_plainn})

    for m in [int(c) for c in args.chunks.split(",")]:
        torch.set_num_threads(1)

        def plain_micro(m: int = m) -> None:
            model.zero_grad(set_to_none=True)
            for xm, ym in zip(x.chunk(m), y.chunk(m)):
                (lm_loss(model(xm), ym) / m).backward()

        rows.append(
            {
                "config": f"plain, 1 thread, M={m} sequential",
                "time": median_time(plain_micro, args.steps, args.warmup),
            }
        )
        torch.set_num_threads(cores)
        for sched in args.schedules.split(","):
            torch.manual_seed(0)
            lm = TransformerLM(cfg)
            v = 2 if sched == "interleaved" else None
            if (v or 1) * k > len(lm):
                continue
            pipe = gpipe.Pipe(
                lm, stages=k, chunks=m, schedule=sched, virtual_stages=v, remat=args.remat
            )

            def step(pipe: gpipe.Pipe = pipe, lm: TransformerLM = lm) -> None:
                lm.zero_grad(set_to_none=True)
                pipe.step(x, y, lm_loss)

            t = median_time(step, args.steps, args.warmup)
            rows.append(
                {
                    "config": f"gpipe.Pipe {sched}, K={k}, M={m}, remat={args.remat}",
                    "time": t,
                    "bound": k * m / (m + k - 1),
                    "bubble": bubble_fraction(pipe.last_events, k),
                    "balance": pipe.balance,
                }
            )
            pipe.close()

    print(f"machine: {platform.machine()}, {cores} threads, torch {torch.__version__}")
    print(
        f"model: TransformerLM {args.preset} (dropout {args.dropout}), batch {args.batch} x {args.seq}"
    )
    print()
    print("| configuration | step (s) | speed-up vs 1-thread plain | of bound | measured bubble |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        sp = t_plain1 / r["time"]
        r["speedup"] = sp
        ofb = f"{sp / r['bound']:.0%}" if "bound" in r else ""
        bub = f"{r['bubble']:.0%}" if "bubble" in r else ""
        print(f"| {r['config']} | {r['time']:.3f} | {sp:.2f}x | {ofb} | {bub} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
