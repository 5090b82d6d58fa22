"""Step time of the distributed runtime (K=2 processes, 1 thread each) against the plain model.

Measures, in interleaved rounds (so that other load on the machine hits every row alike):

* ``plain``: the un-pipelined model in one process with one thread
  (``lm_loss(model(x), y).backward()`` on the whole batch);
* ``local``: :class:`gpipe.Pipe` with K=2 worker threads of one thread each (one process);
* ``dist``: :class:`gpipe.dist.pipe.DistributedPipe`, K=2 spawned processes (gloo on
  loopback), one thread each, kept alive across rounds and idle while the others run;

for the GPipe and 1F1B schedules with M micro-batches. Each round takes the median step time
over ``--steps`` steps after ``--warmup`` warm-up steps; the table shows the best round (the
least disturbed by other processes) with the speedup over ``plain`` and its fraction of the
pipeline bound ``K·M/(M+K-1)`` (``2M/(M+1)`` for K=2). A second table says where the time
goes: the sum of all actions run one at a time (the plain step plus the cost of micro-batching)
and the schedule simulated on those measured per-stage costs (imbalance and bubble included,
communication free). The model is ``TransformerLM`` with ``TransformerConfig.preset("small")``
(GPT-like).

    python benchmarks/dist_step.py            # batch 32, seq 128, M=8, 7 steps, 3 rounds
    python benchmarks/dist_step.py --quick    # smaller, fewer steps, 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gpipe import Pipe
from gpipe.models import TransformerConfig, TransformerLM, lm_loss

K = 2


def _model(args: argparse.Namespace) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(
        TransformerConfig.preset("small", max_seq_len=args.seq, dropout=args.dropout)
    )


def _batch(args: argparse.Namespace, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    toks = torch.randint(0, 256, (args.batch, args.seq + 1), generator=g)
    return toks[:, :-1], toks[:, 1:]


def _median_step(fn: Callable[[int], None], args: argparse.Namespace) -> tuple[float, float]:
    """Median wall time and median CPU time of this process (all its threads) per step."""
    times, cpus = [], []
    for i in range(args.warmup + args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn(i)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
    return statistics.median(times), statistics.median(cpus)


def bench_plain(args: argparse.Namespace) -> tuple[float, float]:
    torch.set_num_threads(1)
    model = _model(args)

    def step(i: int) -> None:
        x, y = _batch(args, i)
        lm_loss(model(x), y).backward()

    return _median_step(step, args)


def bench_local(args: argparse.Namespace, schedule: str) -> tuple[float, float]:
    pipe = Pipe(
        _model(args),
        stages=K,
        chunks=args.chunks,
        schedule=schedule,
        remat=args.remat,
        threads_per_stage=1,
    )

    def step(i: int) -> None:
        pipe.step(*_batch(args, i), lm_loss)

    try:
        return _median_step(step, args)
    finally:
        pipe.close()


def _dist_worker(rank: int, init: str, args: argparse.Namespace, cmds: list, results) -> None:
    """One rank: build one DistributedPipe per schedule, then run a round per command."""
    from gpipe.dist.pipe import DistributedPipe

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=K, timeout=timedelta(seconds=300)
    )
    sample = torch.empty(args.batch, args.seq, dtype=torch.long, device="meta")
    pipes = {
        s: DistributedPipe(
            _model(args), chunks=args.chunks, schedule=s, remat=args.remat, sample=sample
        )
        for s in args.schedules
    }
    results.put((rank, "ready", None, None))
    while True:
        schedule = cmds[rank].get()
        if schedule is None:
            break
        pipe = pipes[schedule]

        def step(i: int, pipe: DistributedPipe = pipe) -> None:
            dist.barrier()  # start every step together
            pipe.step(*_batch(args, i), lm_loss)

        results.put((rank, schedule, _median_step(step, args), pipe.balance))
    for p in pipes.values():
        p.close()
    dist.destroy_process_group()


def analyze(args: argparse.Namespace, balance: list[int], schedule: str) -> dict:
    """Where the time goes, measured in this process with one thread (no concurrency).

    Runs each stage's forward and backward of every micro-batch with the runtime's own
    :class:`gpipe.stage.stage.Stage` objects, one after another, and returns ``sequential`` (the sum
    of all actions) and ``simulated`` (the schedule replayed on the measured per-stage costs:
    what a runtime with free communication would take, imbalance and bubble included).
    """
    from gpipe.planner.simulate import simulate
    from gpipe.schedules import get as get_schedule
    from gpipe.stage.stage import Stage

    torch.set_num_threads(1)
    layers = list(_model(args))
    stages, start = [], 0
    for s, count in enumerate(balance):
        idx = range(start, start + count)
        stages.append(
            Stage(
                s,
                [(i, layers[i]) for i in idx],
                torch.device("cpu"),
                is_first=s == 0,
                is_last=s == len(balance) - 1,
                remat=args.remat,
            )
        )
        start += count
    m = args.chunks
    fwd: list[list[float]] = [[] for _ in stages]
    bwd: list[list[float]] = [[] for _ in stages]
    for step in range(args.warmup + args.steps):
        x, y = _batch(args, step)
        xs, ys = x.chunk(m), y.chunk(m)
        for st in stages:
            st.begin_step(step, m, True, lm_loss, 1.0 / m)
        for i in range(m):
            val: object = (xs[i],)
            for s, st in enumerate(stages):
                t0 = time.perf_counter()
                val = st.forward(i, val, ys[i] if st.is_last else None).value
                if step >= args.warmup:
                    fwd[s].append(time.perf_counter() - t0)
        for i in reversed(range(m)):
            g = None
            for s in reversed(range(len(stages))):
                t0 = time.perf_counter()
                g = stages[s].backward(i, g)
                if step >= args.warmup:
                    bwd[s].append(time.perf_counter() - t0)
    f = [statistics.median(v) for v in fwd]
    b = [statistics.median(v) for v in bwd]
    sim = simulate(get_schedule(schedule, len(stages), m), f, b)
    return {"sequential": m * (sum(f) + sum(b)), "simulated": sim.makespan, "f": f, "b": b}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="batch 16, seq 64, 3 steps, 1 round")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--steps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--remat", default="never", help="re-materialization of the pipelines")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--schedules", default="gpipe,1f1b")
    args = p.parse_args()
    if args.quick:
        args.batch, args.seq, args.steps, args.warmup, args.rounds = 16, 64, 3, 1, 1
    args.schedules = args.schedules.split(",")
    m = args.chunks
    bound = K * m / (m + K - 1)
    torch.set_num_threads(1)

    ctx = mp.get_context("spawn")
    cmds = [ctx.Queue() for _ in range(K)]
    results = ctx.Queue()
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {}
    balances: dict[str, list[int]] = {}
    loads = []
    with tempfile.TemporaryDirectory() as tmp:
        procs = [
            ctx.Process(target=_dist_worker, args=(r, f"file://{tmp}/store", args, cmds, results))
            for r in range(K)
        ]
        for proc in procs:
            proc.start()
        try:
            for _ in range(K):  # measure nothing while the workers start up
                results.get(timeout=600)
            for _ in range(args.rounds):
                loads.append(os.getloadavg()[0])
                rows.setdefault(("plain (1 process, 1 thread)", "-"), []).append(bench_plain(args))
                for schedule in args.schedules:
                    for q in cmds:
                        q.put(schedule)
                    got = [results.get(timeout=600) for _ in range(K)]
                    t = next(r[2][0] for r in got if r[0] == 0)
                    cpu = sum(r[2][1] for r in got)
                    balances[schedule] = got[0][3]
                    rows.setdefault((f"DistributedPipe ({K} processes)", schedule), []).append(
                        (t, cpu)
                    )
                    torch.set_num_threads(K)
                    rows.setdefault((f"local Pipe ({K} threads)", schedule), []).append(
                        bench_local(args, schedule)
                    )
                    torch.set_num_threads(1)
        finally:
            for q in cmds:
                q.put(None)
            for proc in procs:
                proc.join(60)
                if proc.is_alive():
                    proc.kill()

    best = {key: min(v) for key, v in rows.items()}
    plain, plain_cpu = best[("plain (1 process, 1 thread)", "-")]
    print(
        f"\nTransformerLM small, batch {args.batch} x seq {args.seq}, M={m}, remat={args.remat}, "
        f"dropout={args.dropout}; best of {args.rounds} round(s) of the median of {args.steps} "
        f"steps after {args.warmup} warm-up; bound {K}M/(M+{K - 1}) = {bound:.3f}; "
        f"load average at the rounds' starts: {', '.join(f'{v:.2f}' for v in loads)}\n"
    )
    print(
        "| runtime | schedule | step (s) | speedup | fraction of bound | CPU s/step (all "
        "threads, all ranks) | CPU vs plain |"
    )
    print("|---|---|---|---|---|---|---|")
    for (name, sched), (t, cpu) in sorted(best.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        sp = plain / t
        frac = "-" if sched == "-" else f"{sp / bound:.3f}"
        print(
            f"| {name} | {sched} | {t:.3f} | {sp:.3f} | {frac} | {cpu:.3f} | "
            f"{cpu / plain_cpu:.2f} |"
        )
    print("\nWhere the time goes (per-stage costs measured one action at a time, 1 thread):\n")
    print(
        "| schedule | balance | plain | sum of actions | F, B per micro-batch (ms) | "
        "simulated pipeline | measured DistributedPipe |"
    )
    print("|---|---|---|---|---|---|---|")
    for schedule in args.schedules:
        a = analyze(args, balances[schedule], schedule)
        fb = f"F {[round(v * 1e3, 1) for v in a['f']]}, B {[round(v * 1e3, 1) for v in a['b']]}"
        t = best[(f"DistributedPipe ({K} processes)", schedule)][0]
        print(
            f"| {schedule} | {balances[schedule]} | {plain:.3f} | {a['sequential']:.3f} | {fb} "
            f"| {a['simulated']:.3f} | {t:.3f} |"
        )


if __name__ == "__main__":
    main()
