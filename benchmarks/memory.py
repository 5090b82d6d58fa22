"""Peak memory of one training step by schedule x re-materialization mode (one process, CPU).

Each configuration runs in a fresh subprocess (so the peak is its own): build the flagship LM,
wrap it in ``gpipe.Pipe`` (K stages, M micro-batches), run one warm-up step under
``torch.no_grad()``, note the resident set size, run two training steps, and report the peak
RSS growth (``ru_maxrss`` minus the RSS before the steps) — the activations, gradients and
temporaries of a step. Next to it: the most micro-batches each device held at once, measured
by the runtime (``Pipe.peak_live``) and predicted by the simulator.

    python benchmarks/memory.py            # K=2, M=8, all schedules x remat modes
    python benchmarks/memory.py --quick    # two configurations

``--runtime dist``: each rank's peak RSS of ``gpipe.DistributedPipe`` (two spawned gloo
ranks, one intra-op thread each) over M at a fixed micro-batch size, beside
``torch.distributed.pipelining``'s ``Schedule1F1B`` on the same cut: a model of ``--blocks``
x (``Linear(width, width)`` + ``Tanh``), ``--rows`` rows per micro-batch, ``remat="never"``,
MSE against targets of the output's shape; every configuration in fresh processes, so the
peak is its own. Two peaks per rank: the resident set (``ru_maxrss``) and the heap in use
(glibc's ``mallinfo2``, sampled every millisecond by a thread): what the process holds, which
the RSS shows only up to the allocator keeping freed memory. The ranks run with glibc's mmap
threshold fixed (``MALLOC_MMAP_THRESHOLD_``; ``--glibc-default`` leaves it dynamic), so freed
large buffers go back to the system and the RSS follows what is live. A rank's memory should
grow with M only by the larger batch (inputs and targets, which every rank holds), not by what
the step keeps once a value is handed on:

    python benchmarks/memory.py --runtime dist                 # M in 4,8,16,32
    python benchmarks/memory.py --runtime dist --chunks 4,32   # the two ends
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Any


def child(args: argparse.Namespace) -> None:
    import resource

    import torch

    import gpipe
    from gpipe.models import TransformerConfig, TransformerLM, lm_loss
    from gpipe.planner.simulate import simulate

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


DIST_RUNNERS = ("gpipe 1f1b", "gpipe zb-h1", "torch Schedule1F1B")


def dist_worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    """One rank of one distributed configuration: ``args.steps`` training steps of
    ``args.runner`` at M = ``args.m``; rank 0 writes both ranks' peak RSS (MiB) to ``out``."""
    import resource

    import torch
    import torch.distributed as dist
    from peers import finish, init_gloo
    from torch import nn
    from torch.nn import functional as F

    import gpipe

    init_gloo(rank, port)
    heap = HeapPeak()
    torch.manual_seed(0)
    w, blocks = args.width, args.blocks
    model = nn.Sequential(*(m for _ in range(blocks) for m in (nn.Linear(w, w), nn.Tanh())))
    g = torch.Generator().manual_seed(0)
    rows = args.m * args.rows
    x, y = torch.randn(rows, w, generator=g), torch.randn(rows, w, generator=g)
    lib, name = args.runner.split()
    keep: list[object] = []
    if lib == "gpipe":
        pipe = gpipe.DistributedPipe(
            model, balance=[blocks, blocks], chunks=args.m, schedule=name, remat="never"
        )
        keep.append(pipe)

        def step() -> None:
            pipe.zero_grad(set_to_none=False)
            pipe.step(x, y, F.mse_loss)

    else:
        from torch.distributed import pipelining
        from torch.distributed.pipelining import PipelineStage

        mine = nn.Sequential(*list(model)[rank * blocks : (rank + 1) * blocks])
        stage = PipelineStage(mine, rank, 2, torch.device("cpu"))
        sched = getattr(pipelining.schedules, name)(stage, args.m, loss_fn=F.mse_loss)

        def step() -> None:
            mine.zero_grad(set_to_none=False)
            if rank == 0:
                sched.step(x)
            else:
                sched.step(target=y, losses=[])

    for _ in range(args.steps):
        step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    peaks: list[Any] = [None, None]
    dist.all_gather_object(peaks, (peak, heap.stop()))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(peaks, f)
    finish(keep)


class HeapPeak:
    """The most heap in use (MiB, glibc's ``mallinfo2``: allocated chunks and mmapped blocks)
    since construction, sampled every millisecond by a daemon thread; ``None`` without
    glibc."""

    def __init__(self) -> None:
        import ctypes
        import threading

        class MallInfo2(ctypes.Structure):
            _fields_ = [
                (n, ctypes.c_size_t)
                for n in (
                    "arena",
                    "ordblks",
                    "smblks",
                    "hblks",
                    "hblkhd",
                    "usmblks",
                    "fsmblks",
                    "uordblks",
                    "fordblks",
                    "keepcost",
                )
            ]

        try:
            self._info = ctypes.CDLL("libc.so.6").mallinfo2
        except (OSError, AttributeError):
            self._info = None
            return
        self._info.restype = MallInfo2
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(0.001):
            m = self._info()
            self.peak = max(self.peak, m.uordblks + m.hblkhd)

    def stop(self) -> float | None:
        """Stop sampling; the peak in MiB."""
        if self._info is None:
            return None
        self._done.set()
        self._thread.join()
        return self.peak / 2**20


def dist_main(args: argparse.Namespace) -> None:
    """Every runner x M of ``--runtime dist``, each in two fresh processes; the tables."""
    import os

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from peers import run_two

    if not args.glibc_default:  # the ranks inherit it at spawn
        os.environ["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    chunks = [int(c) for c in str(args.chunks).split(",")]
    peaks: dict[tuple[str, int], list[tuple[float, float | None]]] = {}
    for runner in DIST_RUNNERS:
        for m in chunks:
            args.runner, args.m = runner, m
            peaks[runner, m] = run_two(dist_worker, args)
    batch_mib = [2 * m * args.rows * args.width * 4 / 2**20 for m in chunks]  # x and y
    malloc = "glibc default" if args.glibc_default else "mmap threshold 128 KiB"
    print(
        f"{args.blocks} x (Linear {args.width} + Tanh), {args.rows} rows per micro-batch, K=2 "
        f"processes (gloo, 1 thread each), remat never, {args.steps} steps, {malloc}; peaks "
        "in MiB (RSS / heap in use)"
    )
    print()
    print(
        "| runtime | M | inputs + targets | rank 0 RSS | rank 1 RSS | rank 0 heap | rank 1 heap |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for runner in DIST_RUNNERS:
        for m, b in zip(chunks, batch_mib):
            (r0, h0), (r1, h1) = peaks[runner, m]
            print(f"| {runner} | {m} | {b:.0f} | {r0:.0f} | {r1:.0f} | {_mib(h0)} | {_mib(h1)} |")
    lo, hi = chunks[0], chunks[-1]
    grow_batch = batch_mib[-1] - batch_mib[0]
    print()
    print(f"Growth from M={lo} to M={hi} (the larger batch alone: {grow_batch:.0f} MiB)")
    print()
    print("| runtime | rank 0 RSS | rank 1 RSS | rank 0 heap | rank 1 heap |")
    print("| --- | ---: | ---: | ---: | ---: |")
    rows_out = []
    for runner in DIST_RUNNERS:
        grow = [
            [_less(peaks[runner, hi][r][i], peaks[runner, lo][r][i]) for r in range(2)]
            for i in range(2)
        ]
        rows_out.append({"runner": runner, "rss": grow[0], "heap": grow[1], "batch": grow_batch})
        print(
            f"| {runner} | {_mib(grow[0][0])} | {_mib(grow[0][1])} | {_mib(grow[1][0])} | "
            f"{_mib(grow[1][1])} |"
        )
    if args.json:
        table = [{"runner": r, "m": m, "peaks": peaks[r, m]} for r in DIST_RUNNERS for m in chunks]
        with open(args.json, "w") as f:
            json.dump({"peaks": table, "growth": rows_out}, f, indent=2)


def _mib(x: float | None) -> str:
    return "-" if x is None else f"{x:.0f}"


def _less(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runtime", choices=["local", "dist"], default="local")
    ap.add_argument("--width", type=int, default=2048, help="dist: Linear width")
    ap.add_argument("--blocks", type=int, default=4, help="dist: Linear + Tanh blocks")
    ap.add_argument("--rows", type=int, default=128, help="dist: rows per micro-batch")
    ap.add_argument("--steps", type=int, default=3, help="dist: training steps")
    ap.add_argument(
        "--glibc-default", action="store_true", help="dist: leave glibc's mmap threshold dynamic"
    )
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--chunks", default=None, help="M (dist: comma-separated, 4,8,16,32)")
    ap.add_argument("--schedule", default=None)
    ap.add_argument("--remat", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.runtime == "dist":
        args.chunks = args.chunks or "4,8,16,32"
        dist_main(args)
        return
    args.chunks = int(args.chunks or 8)
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
