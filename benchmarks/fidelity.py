"""Simulator fidelity: the step time ``gpipe.planner.simulate`` predicts from measured per-stage costs
against the step time the one-process runtime measures.

For each schedule: run a few steps of ``gpipe.Pipe`` on the flagship LM, take the median
duration of each (stage, action kind) from the real timeline (``Pipe.last_events``), simulate
the schedule on those costs (communication free), and compare the predicted makespan with the
measured span of the same step's actions and with the wall-clock step time.

    python benchmarks/fidelity.py          # --quick for a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

import gpipe
from gpipe.models import TransformerConfig, TransformerLM, lm_loss
from gpipe.planner.simulate import simulate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps = 3 if args.quick else args.steps
    cfg = TransformerConfig.preset("small").replace(dropout=0.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (32, 128), generator=g)
    y = torch.randint(0, 256, (32, 128), generator=g)
    print(f"TransformerLM small, batch 32 x 128, K={args.stages}, M={args.chunks}, remat never")
    print()
    print("| schedule | predicted (s) | measured span (s) | predicted / measured | wall step (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for sched in ("gpipe", "1f1b", "interleaved", "zb-h1"):
        torch.manual_seed(0)
        v = 2 if sched == "interleaved" else None
        pipe = gpipe.Pipe(
            TransformerLM(cfg),
            stages=args.stages,
            chunks=args.chunks,
            schedule=sched,
            virtual_stages=v,
            remat="never",
        )
        walls = []
        for _ in range(steps):
            pipe.zero_grad(set_to_none=True)
            t = time.perf_counter()
            pipe.step(x, y, lm_loss)
            walls.append(time.perf_counter() - t)
        events = pipe.last_events
        durations: dict[tuple[int, str], list[float]] = defaultdict(list)
        for e in events:
            durations[(e.action.stage, e.action.kind)].append(e.end - e.start)
        schedule = pipe._schedule(args.chunks)
        n = schedule.num_stages

        def cost(stage: int, kind: str, durations: dict = durations) -> float:
            d = durations.get((stage, kind))
            return statistics.median(d) if d else 0.0

        fwd = [cost(s, "F") for s in range(n)]
        if schedule.split_backward:
            w = [cost(s, "W") for s in range(n)]
            bwd = [cost(s, "B") + w[s] for s in range(n)]
            sim = simulate(schedule, fwd, bwd, weight_costs=w)
        else:
            sim = simulate(schedule, fwd, [cost(s, "B") for s in range(n)])
        span = max(e.end for e in events) - min(e.start for e in events)
        print(
            f"| {sched} | {sim.makespan:.3f} | {span:.3f} | {sim.makespan / span:.2f} | "
            f"{statistics.median(walls):.3f} |"
        )
        pipe.close()


if __name__ == "__main__":
    main()
