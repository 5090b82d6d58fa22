"""Per-action scheduling cost of the one-process runtime, with layers that cost nothing.

A pipeline of near-free layers (``nn.Linear(4, 4)`` on a 2-row micro-batch) makes a step's
time almost all runtime overhead: splitting, thread hand-offs, stage bookkeeping, keyed random
streams, merging. Reported: (step time − the same layers run plainly, micro-batch by
micro-batch) ÷ number of actions, per schedule and micro-batch count.

    python benchmarks/overhead.py          # --quick for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import gpipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 5 if args.quick else args.steps
    k = args.stages
    torch.manual_seed(0)
    print(
        f"K={k}, 4 x Linear(4, 4) per stage, 2 rows per micro-batch, {torch.get_num_threads()} threads"
    )
    print()
    print(
        "| schedule | M | dropout | actions | step (ms) | plain (ms) | overhead per action (µs) |"
    )
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    for dropout in (False, True):
        for sched in ("gpipe", "1f1b"):
            for m in (1, 4, 16):
                layers: list[nn.Module] = []
                for _ in range(4 * k):
                    layers.append(nn.Linear(4, 4))
                    if dropout:
                        layers.append(nn.Dropout(0.1))
                model = nn.Sequential(*layers)
                x = torch.randn(2 * m, 4)
                pipe = gpipe.Pipe(
                    model,
                    stages=k,
                    balance=[len(layers) // k] * k,
                    chunks=m,
                    schedule=sched,
                    remat="never",
                )

                def run(pipe: gpipe.Pipe = pipe, x: torch.Tensor = x) -> None:
                    pipe.step(x, None, lambda o, _: o.sum())

                def plain(model: nn.Sequential = model, x: torch.Tensor = x, m: int = m) -> None:
                    for xm in x.chunk(m):
                        model(xm).sum().backward()

                ts, tp = [], []
                for _ in range(3):
                    run()
                    plain()
                for _ in range(steps):
                    t = time.perf_counter()
                    run()
                    ts.append(time.perf_counter() - t)
                    t = time.perf_counter()
                    plain()
                    tp.append(time.perf_counter() - t)
                s, p = statistics.median(ts), statistics.median(tp)
                n = 2 * k * m
                print(
                    f"| {sched} | {m} | {'0.1' if dropout else 'none'} | {n} | {s * 1e3:.2f} | "
                    f"{p * 1e3:.2f} | {(s - p) / n * 1e6:.0f} |"
                )
                pipe.close()


if __name__ == "__main__":
    main()
