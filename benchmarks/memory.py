"""Peak memory of one training step by schedule x re-materialization mode (one process, CPU).

Each configuration runs in a fresh subprocess (so the peak is its own): build the flagship LM,
wrap it in ``gpipe.Pipe`` (K stages, M micro-batches), run one warm-up step under
``torch.no_grad()``, note the resident set size, run two training steps, and report the peak
RSS growth (``ru_maxrss`` minus the RSS before the steps) — the activations, gradients and
temporaries of a step. Next to it: the most micro-batches each device held at once, measured
by the runtime (``Pipe.peak_live``) and predicted by the simulator.

    python benchmarks/memory.py            # K=2, M=8, all schedules x remat modes
    python benchmarks/memory.py --quick    # two configurations
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def child(args: argparse.Namespace) -> None:
    import resource

    import torch

    import gpipe
    from gpipe.models import TransformerConfig, TransformerLM, lm_loss
    from gpipe.simulate import simulate

    torch.manual_seed(0)
    cfg = TransformerConfig.preset(args.preset).replace(dropout=0.0)
    model = TransformerLM(cfg)
    v = 2 if args.schedule == "interleaved" else None
    pipe = gpipe.Pipe(
        model,
        stages=args.stages,
        chunks=args.chunks,
        schedule=args.schedule,
        virtual_stages=v,
        remat=args.remat,
    )
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    with torch.no_grad():
        pipe.step(x, y, lm_loss)
    for p in model.parameters():  # gradients exist before the measured steps
        p.grad = torch.zeros_like(p)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize()
    for _ in range(2):
        pipe.step(x, y, lm_loss)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sim = simulate(pipe._schedule(len(x) // (args.batch // args.chunks)))
    print(
        json.dumps(
            {
                "schedule": args.schedule,
                "remat": args.remat,
                "peak_growth_mib": (peak - before) / 2**20,
                "peak_live": pipe.peak_live,
                "simulated": list(sim.peak_activations),
            }
        )
    )
    pipe.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--schedule", default=None)
    ap.add_argument("--remat", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    schedules = ["gpipe", "1f1b"] if args.quick else ["gpipe", "1f1b", "interleaved", "zb-h1"]
    remats = ["never"] if args.quick else ["never", "except_last", "always"]
    rows = []
    for sched in schedules:
        for remat in remats:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                "--schedule",
                sched,
                "--remat",
                remat,
                "--preset",
                args.preset,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--stages",
                str(args.stages),
                "--chunks",
                str(args.chunks),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"TransformerLM {args.preset}, batch {args.batch} x {args.seq}, K={args.stages}, "
        f"M={args.chunks}, one process, CPU"
    )
    print()
    print(
        "| schedule | remat | peak RSS growth (MiB) | peak live micro-batches per device "
        "(measured) | (simulated) |"
    )
    print("| --- | --- | ---: | --- | --- |")
    for r in rows:
        print(
            f"| {r['schedule']} | {r['remat']} | {r['peak_growth_mib']:.0f} | "
            f"{r['peak_live']} | {r['simulated']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
