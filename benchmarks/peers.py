"""gpipe's distributed runtime against ``torch.distributed.pipelining``, same model, same run.

Two spawned processes (gloo on loopback, one intra-op thread each) hold the two pipeline
stages of the flagship ``TransformerLM`` (``small`` preset), cut at the same layers for both
libraries. In rounds, each configuration runs ``--warmup`` steps and then ``--steps`` timed
steps (median); the table reports the median over rounds, so load from other processes hits
every row alike:

* plain: the un-pipelined model, one process, one thread (rank 0 alone, rank 1 waits);
* gpipe: ``gpipe.DistributedPipe`` with schedules gpipe, 1f1b, interleaved and
  interleaved-zb (V=2, round-robin), and the V-shaped zb-v and dualpipe-v (device ``d`` holds
  stages ``d`` and ``2K-1-d``);
* torch: ``PipelineStage`` + ``ScheduleGPipe``, ``Schedule1F1B``, ``ScheduleInterleaved1F1B``,
  ``ScheduleInterleavedZeroBubble``, ``ScheduleZBVZeroBubble``, ``ScheduleDualPipeV`` (the same
  placement).

Speed-up is against the plain model; "of bound" divides it by K·M/(M+K−1); "vs torch" is the
torch step time over gpipe's for the matching schedule (> 1: gpipe is faster); "paired" is the
median over rounds of that ratio within each round (the two run back to back, gpipe first
in even rounds and torch first in odd ones).

    python benchmarks/peers.py                # M in 4,8, batch 32 x 128, 3 rounds
    python benchmarks/peers.py --quick        # smoke run
    python benchmarks/peers.py --cpu          # and each rank's CPU time and context switches
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import tempfile
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

# gpipe schedule -> (torch schedule class name, stages per process, V-shaped placement)
PAIRS = {
    "gpipe": ("ScheduleGPipe", 1, False),
    "1f1b": ("Schedule1F1B", 1, False),
    "interleaved": ("ScheduleInterleaved1F1B", 2, False),
    "interleaved-zb": ("ScheduleInterleavedZeroBubble", 2, False),
    "zb-v": ("ScheduleZBVZeroBubble", 2, True),
    "dualpipe-v": ("ScheduleDualPipeV", 2, True),
}
SCHEDULES = tuple(PAIRS)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn: Callable[[], object], steps: int, warmup: int) -> float:
    """``warmup`` steps, both ranks lined up, then the median of ``steps`` timed ones."""
    from gpipe.local.autotune import median_time

    for _ in range(warmup):
        fn()
    dist.barrier()
    return median_time(fn, steps, 0)


def _usage() -> tuple[float, int, int]:
    """This process's CPU seconds (every thread: compute, gloo's, autograd's) and its
    voluntary and involuntary context switches so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime, r.ru_nvcsw, r.ru_nivcsw


def _per_step_usage(fn: Callable[[], object], steps: int) -> list[float]:
    """CPU milliseconds and context switches (voluntary, involuntary) per step, over
    ``steps`` steps (run after :func:`_timed`, so the transfers are warm)."""
    a = _usage()
    for _ in range(steps):
        fn()
    b = _usage()
    return [(b[0] - a[0]) * 1e3 / steps, (b[1] - a[1]) / steps, (b[2] - a[2]) / steps]


def make_runners(
    rank: int, args: argparse.Namespace, hook: Callable[[list], None] | None = None
) -> tuple[dict[str, Callable[[], object]], list[object], Callable[[], object]]:
    """This rank's step functions, ``"gpipe <schedule> <M>"`` and ``"torch <schedule> <M>"``
    for every pair of ``args.schedule_list`` x ``args.chunk_list`` (same model, same cut),
    what must stay alive while they run, and the plain model's step (rank 0; a no-op on the
    other). ``hook`` sees every model's layer list before it is wrapped (instrumentation)."""
    from torch.distributed import pipelining
    from torch.distributed.pipelining import PipelineStage

    import gpipe
    from gpipe.models import TransformerConfig, TransformerLM, lm_loss

    cfg = TransformerConfig.preset(args.preset).replace(dropout=0.0)

    def build() -> TransformerLM:
        torch.manual_seed(0)
        model = TransformerLM(cfg)
        if hook is not None:
            hook(list(model))
        return model

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    y = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
    n_layers = len(build())
    half = n_layers // 2
    bal2 = [half, n_layers - half]
    q = n_layers // 4
    bal4 = [q, half - q, q, n_layers - half - q]

    runners: dict[str, Callable[[], object]] = {}
    keep: list[object] = []
    model = build()

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        lm_loss(model(x), y).backward()

    for m, sched in [(m, s) for m in args.chunk_list for s in args.schedule_list]:
        tname, per_rank, v_shape = PAIRS[sched]
        bal = bal4 if per_rank == 2 else bal2
        pipe = gpipe.DistributedPipe(
            build(), balance=bal, chunks=m, schedule=sched, remat="never", timeout=300
        )
        keep.append(pipe)

        def ours(pipe: gpipe.DistributedPipe = pipe) -> None:
            pipe.zero_grad(set_to_none=True)
            pipe.step(x, y, lm_loss)

        runners[f"gpipe {sched} {m}"] = ours

        layers = list(build())
        bounds = [0]
        for b in bal:
            bounds.append(bounds[-1] + b)
        mods = [torch.nn.Sequential(*layers[bounds[i] : bounds[i + 1]]) for i in range(len(bal))]
        n_stages = len(bal)
        if v_shape:  # device d holds stages d and 2K-1-d
            mine = [rank, n_stages - 1 - rank]
        else:
            mine = [i for i in range(n_stages) if i % 2 == rank]
        stages = [PipelineStage(mods[i], i, n_stages, torch.device("cpu")) for i in mine]
        tcls = getattr(pipelining.schedules, tname)
        tsched = tcls(stages[0] if per_rank == 1 else stages, m, loss_fn=lm_loss)
        keep.append((tsched, mods))
        first = 0 in mine
        last = (n_stages - 1) in mine

        def theirs(tsched=tsched, mods=mods, first=first, last=last) -> None:
            for mod in mods:
                mod.zero_grad(set_to_none=True)
            kwargs: dict = {}
            if last:
                kwargs = {"target": y, "losses": []}
            if first:
                tsched.step(x, **kwargs)
            else:
                tsched.step(**kwargs)

        runners[f"torch {sched} {m}"] = theirs
    return runners, keep, plain if rank == 0 else (lambda: None)


def init_gloo(rank: int, port: int) -> None:
    """One intra-op thread, and the two-rank gloo group on loopback."""
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=300),
    )


def finish(keep: list[object]) -> None:
    """Close the pipes and leave the process group together."""
    for p in keep:
        if hasattr(p, "close"):
            p.close()
    dist.barrier()
    dist.destroy_process_group()


def round_order(names: list[str], r: int) -> list[str]:
    """The order of round ``r``: as given, but in odd rounds each ``gpipe``/``torch`` pair
    the other way round, so a machine that speeds up or slows down during a round favours
    neither library (the paired ratio's median then cancels it)."""
    if r % 2 == 0:
        return names
    out = list(names)
    for i in range(len(out) - 1):
        a, b = out[i], out[i + 1]
        if a.startswith("gpipe ") and b == "torch " + a[len("gpipe ") :]:
            out[i], out[i + 1] = b, a
    return out


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    init_gloo(rank, port)
    pairs, keep, plain = make_runners(rank, args)
    runners = {"plain": plain, **pairs}
    results: dict[str, list[float]] = {k: [] for k in runners}
    usage: dict[str, list[list[float]]] = {k: [] for k in runners}
    for r in range(args.rounds):
        for name in round_order(list(runners), r):
            dist.barrier()
            results[name].append(_timed(runners[name], args.steps, args.warmup))
            if getattr(args, "cpu", False):
                dist.barrier()
                usage[name].append(_per_step_usage(runners[name], args.steps))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    if getattr(args, "cpu", False):
        with open(f"{out}.usage{rank}", "w") as f:
            json.dump(usage, f)
    finish(keep)


def parse_args(doc: str, schedules: str, quick: bool = False) -> argparse.Namespace:
    """The options both two-process benchmarks take (model, batch, M, schedules, steps,
    rounds, JSON), with ``chunk_list`` and ``schedule_list`` parsed from them."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--chunks", default="4,8", help="micro-batch counts, comma-separated")
    ap.add_argument("--schedules", default=schedules, help="comma-separated")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    if quick:
        ap.add_argument("--quick", action="store_true")
        ap.add_argument(
            "--cpu",
            action="store_true",
            help="also measure each rank's CPU time and context switches per step",
        )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if getattr(args, "quick", False):
        args.batch, args.seq, args.steps, args.warmup, args.rounds = 16, 64, 3, 1, 1
        args.chunks = "8"
    args.chunk_list = [int(c) for c in str(args.chunks).split(",")]
    args.schedule_list = [s for s in str(args.schedules).split(",") if s]
    return args


def run_two(worker: Callable[..., None], args: argparse.Namespace) -> Any:
    """Run ``worker(rank, args, port, out)`` on two spawned ranks; what rank 0 wrote to
    ``out`` (JSON), and in ``args.usage`` what each rank wrote to ``out.usage<rank>``."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "res.json")
        mp.start_processes(worker, args=(args, free_port(), out), nprocs=2, start_method="spawn")
        args.usage = []
        for rank in range(2):
            if os.path.exists(f"{out}.usage{rank}"):
                with open(f"{out}.usage{rank}") as f:
                    args.usage.append(json.load(f))
        with open(out) as f:
            return json.load(f)


def main() -> None:
    args = parse_args(__doc__ or "", ",".join(SCHEDULES), quick=True)
    load0 = os.getloadavg()[0]
    results = run_two(_worker, args)
    load1 = os.getloadavg()[0]
    med = {k: statistics.median(v) for k, v in results.items()}
    print(
        f"TransformerLM {args.preset}, batch {args.batch} x {args.seq}, K=2 processes (gloo, "
        f"1 thread each), remat never; median over {args.rounds} round(s) of the median "
        f"of {args.steps} steps; load average {load0:.2f} -> {load1:.2f}"
    )
    print()
    print(
        "| runtime | schedule | M | step (s) | speed-up vs plain | of bound | torch / gpipe "
        "| paired |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| plain (1 process, 1 thread) | - | - | {med['plain']:.3f} | 1.00x | | | |")
    for m in args.chunk_list:
        bound = 2 * m / (m + 1)
        for sched in args.schedule_list:
            ours, theirs = med[f"gpipe {sched} {m}"], med[f"torch {sched} {m}"]
            # the two run back to back in every round: the median of their per-round ratios
            # cancels the machine's slow spells, which the medians of the times do not
            rounds = zip(results[f"torch {sched} {m}"], results[f"gpipe {sched} {m}"])
            paired = statistics.median(a / b for a, b in rounds)
            for name, t in (
                ("gpipe.DistributedPipe", ours),
                ("torch.distributed.pipelining", theirs),
            ):
                sp = med["plain"] / t
                mine = name.startswith("gpipe")
                ratio = f"{theirs / ours:.2f} | {paired:.2f}" if mine else " |"
                print(
                    f"| {name} | {sched} | {m} | {t:.3f} | {sp:.2f}x | {sp / bound:.0%} | {ratio} |"
                )
    if args.usage:
        print_usage(args.usage)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "medians": med, "rounds": results}, f, indent=2)


def print_usage(usage: list[dict[str, list[list[float]]]]) -> None:
    """Per configuration and rank, the medians over rounds of CPU ms and context switches
    per step: what each library's step costs the machine's cores, beside its wall time."""
    print()
    print(
        "| configuration | rank 0 CPU ms | rank 1 CPU ms | rank 0 switches (vol/invol) "
        "| rank 1 switches (vol/invol) |"
    )
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in usage[0]:
        if name == "plain":
            continue
        cols = [[statistics.median(r[i] for r in u[name]) for i in range(3)] for u in usage]
        cpu = " | ".join(f"{c[0]:.1f}" for c in cols)
        sw = " | ".join(f"{c[1]:.0f} / {c[2]:.0f}" for c in cols)
        print(f"| {name} | {cpu} | {sw} |")


if __name__ == "__main__":
    main()
