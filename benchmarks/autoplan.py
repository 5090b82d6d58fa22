"""The planner against measurement: every configuration of a grid run for real, in one run.

For TransformerLM ``small`` (batch 32 x 128, dropout 0), K=2 CPU stages in one process, every
configuration of schedules x M in {2,4,8,16} x remat runs as ``gpipe.Pipe`` with the
planner's balance for it and Adam.

* Step time: in this process, round-robin over the configurations (``--rounds`` rounds, each
  building the pipe afresh and timing ``--steps`` steps after one untimed step), the median
  over rounds — so a change in the machine's load hits every configuration alike.
* Peak memory: each configuration in fresh subprocesses (``--memory-repeats``, median), as
  ``benchmarks/memory.py`` measures it — the peak resident-set growth (``VmHWM``, which,
  unlike ``ru_maxrss``, does not inherit a large parent's size across ``exec``) over
  the resident set before the training steps, when only the parameters exist (the pipe
  built, one step run under ``torch.no_grad()``) — plus the parameters' bytes, so it counts
  parameters, gradients, Adam's state and the step's activations and temporaries: what
  ``gpipe.autoplan`` predicts (the joint peak of both stages, which share one memory).
  The children run with ``MALLOC_ARENA_MAX=1``: on a loaded machine glibc otherwise opens a
  new arena whenever two threads contend, and the resident set then varies from run to run.

Reported: the rank of the planner's choice among the measured configurations, its measured
step against the fastest, the same for the choice of ``gpipe.local.autotune`` (the planner's top
``--tune`` configurations timed by the tuner itself, beforehand and on its own clock), predicted vs measured peak memory, and a memory limit that rules
out GPipe without re-materialization.

    python benchmarks/autoplan.py            # the whole grid (about 10 minutes on 2 cores)
    python benchmarks/autoplan.py --quick    # gpipe and 1f1b, M in {2, 8}
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _model(preset: str):
    import torch

    from gpipe.models import TransformerConfig, TransformerLM

    torch.manual_seed(0)
    cfg = TransformerConfig.preset(preset).replace(dropout=0.0)
    return cfg, TransformerLM(cfg)


def _pipe(args: argparse.Namespace, cfg: dict):
    import torch

    import gpipe

    vocab, model = _model(args.preset)
    pipe = gpipe.Pipe(
        model,
        balance=list(cfg["balance"]),
        devices=["cpu"] * args.stages,
        chunks=cfg["chunks"],
        schedule=cfg["schedule"],
        virtual_stages=cfg["virtual_stages"] if cfg["schedule"] == "interleaved" else None,
        remat=cfg["remat"],
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, vocab.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, vocab.vocab_size, (args.batch, args.seq), generator=g)
    return model, pipe, opt, x, y


def _train_step(pipe, opt, x, y) -> float:
    from gpipe.models import lm_loss

    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    pipe.step(x, y, lm_loss)
    opt.step()
    return time.perf_counter() - t0


def _high_water() -> int:
    """This process's peak resident set (``VmHWM``). Not ``ru_maxrss``: Linux carries that
    across ``exec`` from the forked parent, so a child of a large parent would report the
    parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def child(args: argparse.Namespace) -> None:
    cfg = json.loads(args.child)
    import resource

    import torch

    from gpipe.models import lm_loss

    model, pipe, opt, x, y = _pipe(args, cfg)
    with torch.no_grad():
        pipe.step(x, y, lm_loss)
    with open("/proc/self/statm") as f:
        before = int(f.read().split()[1]) * resource.getpagesize()
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    for _ in range(2):
        _train_step(pipe, opt, x, y)
    print(json.dumps({"peak": _high_water() - before + param_bytes}))
    pipe.close()


def _peak(cfg: dict, args: argparse.Namespace) -> list[int]:
    cmd = [sys.executable, __file__, "--preset", args.preset, "--batch", str(args.batch)]
    cmd += ["--seq", str(args.seq), "--stages", str(args.stages), "--child", json.dumps(cfg)]
    peaks = []
    for _ in range(args.memory_repeats):
        env = dict(os.environ, MALLOC_ARENA_MAX="1")  # no extra arenas when threads contend
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        if out.returncode:
            raise RuntimeError(f"{cfg}: {out.stderr[-2000:]}")
        peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak"])
    return peaks


def _times(cfgs: list[dict], args: argparse.Namespace) -> list[float]:
    per_round: list[list[float]] = [[] for _ in cfgs]
    for _ in range(args.rounds):
        for i, cfg in enumerate(cfgs):
            _, pipe, opt, x, y = _pipe(args, cfg)
            _train_step(pipe, opt, x, y)
            per_round[i].append(statistics.median(_train_step(pipe, opt, x, y)
                                                  for _ in range(args.steps)))  # fmt: skip
            pipe.close()
    return [statistics.median(t) for t in per_round]


def _tune(args: argparse.Namespace, ranked: list):
    """The choice of ``gpipe.local.autotune`` among ``ranked``'s top ``args.tune``, timed by it."""
    import torch

    from gpipe.local.autotune import autotune
    from gpipe.models import lm_loss

    cfg, model = _model(args.preset)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    measured = autotune(model, ranked, x, y, lm_loss, devices=["cpu"] * args.stages,
                        top=args.tune)  # fmt: skip
    return measured[0].configuration


def _key(c) -> tuple:
    return (c.schedule, c.virtual_stages, c.chunks, c.remat)


def _plan(args: argparse.Namespace, schedules: list[str], chunks: list[int], **kw):
    import torch

    from gpipe.planner.autoplan import autoplan

    cfg, model = _model(args.preset)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq))
    return autoplan(
        model, x, devices=["cpu"] * args.stages, schedules=schedules, chunks=chunks,
        virtual_stages=(2,), **kw,
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--memory-repeats", type=int, default=2)
    ap.add_argument("--tune", type=int, default=6, help="configurations gpipe.local.autotune times")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args()
    if args.child:
        child(args)
        return
    from gpipe.planner.autoplan import mm_fmt
    from gpipe.schedules import available

    schedules = ["gpipe", "1f1b"] if args.quick else available()
    chunks = [2, 8] if args.quick else [2, 4, 8, 16]
    t0 = time.perf_counter()
    ranked = _plan(args, schedules, chunks)
    plan_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    measured_plan = _plan(args, schedules, chunks, measure=True)
    measure_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    tuned = _tune(args, ranked)
    tune_s = time.perf_counter() - t0
    cfgs = [dict(schedule=c.schedule, virtual_stages=c.virtual_stages, chunks=c.chunks,
                 remat=c.remat, balance=list(c.balance)) for c in ranked]  # fmt: skip
    times = _times(cfgs, args)
    rows = []
    for c, cfg, step_s in zip(ranked, cfgs, times, strict=True):
        peaks = _peak(cfg, args)
        rows.append(dict(cfg, predicted_s=c.step_time, predicted_peak=c.peak_memory,
                         step_s=step_s, peak=statistics.median(peaks), peak_max=max(peaks)))  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr)
    by_key = {(r["schedule"], r["virtual_stages"], r["chunks"], r["remat"]): r for r in rows}
    fastest = min(rows, key=lambda r: r["step_s"])
    order = sorted(rows, key=lambda r: r["step_s"])

    def report(name: str, choice) -> None:
        r = by_key[_key(choice)]
        print(
            f"{name}: {choice.describe()} — measured rank {order.index(r) + 1} of {len(rows)}, "
            f"{r['step_s']:.3f} s vs fastest {fastest['step_s']:.3f} s "
            f"({r['step_s'] / fastest['step_s']:.2f}x)"
        )

    print(f"TransformerLM {args.preset}, batch {args.batch} x {args.seq}, K={args.stages}, CPU")
    print(f"planning took {plan_s:.1f} s (FLOPs), {measure_s:.1f} s (measure=True), "
          f"tuning the top {args.tune} {tune_s:.1f} s\n")  # fmt: skip
    print("| schedule | V | M | remat | predicted (s) | measured (s) | predicted peak | "
          "measured peak | predicted / measured peak |")  # fmt: skip
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in order:
        print(
            f"| {r['schedule']} | {r['virtual_stages']} | {r['chunks']} | {r['remat']} | "
            f"{r['predicted_s']:.3f} | {r['step_s']:.3f} | {mm_fmt(r['predicted_peak'])} | "
            f"{mm_fmt(r['peak'])} | {r['predicted_peak'] / r['peak']:.2f} |"
        )
    print()
    report("planner (FLOPs)", ranked[0])
    report("planner (measured costs)", measured_plan[0])
    report(f"planner (FLOPs) + autotune of its top {args.tune}", tuned)
    errors = [abs(r["predicted_peak"] / r["peak"] - 1) for r in rows]
    print(f"peak memory: median |error| {statistics.median(errors):.1%}, max {max(errors):.1%}")
    gpipe_never = [r for r in rows if r["schedule"] == "gpipe" and r["remat"] == "never"]
    if gpipe_never:
        limit = int(0.75 * min(min(r["peak"], r["predicted_peak"]) for r in gpipe_never))
        limited = _plan(args, schedules, chunks, memory_limit=limit)
        r = by_key[_key(limited[0])]
        print(
            f"limit {mm_fmt(limit)} (rules out gpipe/never): {limited[0].describe()}, measured "
            f"peak {mm_fmt(r['peak'])}, at most {mm_fmt(r['peak_max'])} "
            f"({'within' if r['peak_max'] <= limit else 'OVER'} the "
            f"limit), {r['step_s']:.3f} s"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
