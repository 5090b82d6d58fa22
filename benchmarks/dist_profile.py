"""Where a distributed step's time goes, gpipe against ``torch.distributed.pipelining``.

The same two spawned processes (gloo on loopback, one intra-op thread each), model and cut as
``benchmarks/peers.py``. Every rank wraps, for the whole run:

* each top-level layer's forward (hooks) and ``torch.autograd.backward`` / ``grad``: compute;
* ``Work.wait``: time blocked on communication;
* every ``torch.distributed`` point-to-point call and collective: messages per step.

Configurations alternate in rounds; per rank and configuration the table gives medians over
steps of the wall time and its split into forward, backward, waits and the rest (Python,
packing, the loss, what the runtime does around the compute), and the messages per step.

    python benchmarks/dist_profile.py --schedules gpipe,1f1b,interleaved --chunks 4,8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable

import torch
import torch.distributed as dist
from peers import finish, init_gloo, make_runners, parse_args, run_two

CALLS = (
    "isend", "irecv", "send", "recv", "batch_isend_irecv", "all_reduce", "all_gather",
    "broadcast", "barrier", "all_gather_object", "broadcast_object_list",
)  # fmt: skip


class Meter:
    """Seconds in each kind of work and calls counted, since the last :meth:`take`."""

    def __init__(self) -> None:
        self.t: Counter[str] = Counter()
        self.n: Counter[str] = Counter()
        self.on = False

    def take(self) -> tuple[dict[str, float], dict[str, int]]:
        t, n = dict(self.t), dict(self.n)
        self.t.clear()
        self.n.clear()
        return t, n


METER = Meter()


def _instrument() -> None:
    from torch.distributed import distributed_c10d as c10d

    work = dist.Work
    orig_wait = work.wait

    def wait(self: object, *a: object) -> object:
        t = time.perf_counter()
        try:
            return orig_wait(self, *a)
        finally:
            METER.t["wait"] += time.perf_counter() - t

    work.wait = wait  # type: ignore[method-assign]
    for name in CALLS:  # one wrapper in both namespaces: P2POp checks its op by identity
        orig = getattr(c10d, name, None)
        if orig is None:
            continue

        def wrapper(*args: object, _orig: Callable = orig, _name: str = name, **kw: object):
            METER.n[_name] += 1
            return _orig(*args, **kw)

        setattr(c10d, name, wrapper)
        setattr(dist, name, wrapper)
    for name in ("backward", "grad"):
        orig = getattr(torch.autograd, name)

        def timed(*args: object, _orig: Callable = orig, **kw: object) -> object:
            t = time.perf_counter()
            try:
                return _orig(*args, **kw)
            finally:
                METER.t["bwd"] += time.perf_counter() - t

        setattr(torch.autograd, name, timed)


def _hook_layers(layers: list[torch.nn.Module]) -> None:
    starts: list[float] = []

    def pre(_m: object, _a: object) -> None:
        starts.append(time.perf_counter())

    def post(_m: object, _a: object, _o: object) -> None:
        METER.t["fwd"] += time.perf_counter() - starts.pop()

    for layer in layers:
        layer.register_forward_pre_hook(pre)
        layer.register_forward_hook(post)


def _worker(rank: int, args: argparse.Namespace, port: int, out: str) -> None:
    init_gloo(rank, port)
    _instrument()
    runners, keep, _ = make_runners(rank, args, hook=_hook_layers)
    rows: dict[str, list[dict]] = {k: [] for k in runners}
    for _ in range(args.rounds):
        for name, fn in runners.items():
            for _ in range(args.warmup):
                fn()
            dist.barrier()
            for _ in range(args.steps):
                METER.take()
                t = time.perf_counter()
                fn()
                wall = time.perf_counter() - t
                times, counts = METER.take()
                rows[name].append({"wall": wall, **times, "counts": counts})
    gathered: list = [None, None]
    dist.all_gather_object(gathered, rows)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    finish(keep)


def main() -> None:
    args = parse_args(__doc__ or "", "gpipe,1f1b,interleaved")
    load0 = os.getloadavg()[0]
    per_rank = run_two(_worker, args)
    print(
        f"TransformerLM {args.preset}, batch {args.batch} x {args.seq}, 2 gloo processes; "
        f"medians over {args.rounds} x {args.steps} steps (ms); load {load0:.2f} -> "
        f"{os.getloadavg()[0]:.2f}\n"
    )
    print("| config | rank | wall | fwd | bwd | wait | rest | messages per step |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in per_rank[0]:
        for r, rows in enumerate(per_rank):
            med = {
                k: 1e3 * statistics.median(row.get(k, 0.0) for row in rows[name])
                for k in ("wall", "fwd", "bwd", "wait")
            }
            rest = med["wall"] - med["fwd"] - med["bwd"] - med["wait"]
            c = rows[name][-1]["counts"]
            msgs = ", ".join(f"{k} {v}" for k, v in sorted(c.items()))
            print(
                f"| {name} | {r} | {med['wall']:.1f} | {med['fwd']:.1f} | {med['bwd']:.1f} | "
                f"{med['wait']:.1f} | {rest:.1f} | {msgs} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(per_rank, f)


if __name__ == "__main__":
    main()
