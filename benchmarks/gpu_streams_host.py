"""Host cost of the stream bookkeeping (``gpipe.local.streams``), measurable without a GPU.

On a GPU every boundary value goes through events, waits and ``record_stream`` calls; their
Python side (flattening the value, deciding what to copy, the bookkeeping of a step's edges)
costs host time per action that the CPU runtime does not pay. This script measures that part
alone: the same near-free pipeline (``Linear(4, 4)`` layers, 2 rows per micro-batch) steps
with the streams module off (the CPU path) and on over a CUDA layer whose calls do nothing, in
alternation, and reports the median step times and the difference per action. The CUDA calls'
own cost (a few µs each for event record/wait) is not in it; ``gpu_bench.py`` measures real
steps on a GPU.

    python benchmarks/gpu_streams_host.py           # --quick for a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

import gpipe
from gpipe.local import streams


class NullOps:
    """A CUDA layer whose calls do nothing (copies return their tensor)."""

    def new_stream(self, device: torch.device) -> object:
        return object()

    def current_stream(self, device: torch.device) -> object:
        return self

    def new_event(self) -> object:
        return object()

    def record(self, event: Any, stream: Any) -> None:
        pass

    def wait(self, stream: Any, event: Any) -> None:
        pass

    def synchronize(self, event: Any) -> None:
        pass

    def record_stream(self, tensor: torch.Tensor, stream: Any) -> None:
        pass

    @contextlib.contextmanager
    def use(self, streams_: Sequence[Any]) -> Iterator[None]:
        yield

    def copy(self, tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
        return tensor


@contextlib.contextmanager
def null_cuda(on: bool) -> Iterator[None]:
    """With ``on``, every device counts as a GPU whose CUDA calls are :class:`NullOps`."""
    real_ops, real_streamed = streams.OPS, streams.streamed
    if on:
        streams.OPS, streams.streamed = NullOps(), lambda d: True
    try:
        yield
    finally:
        streams.OPS, streams.streamed = real_ops, real_streamed


def make_pipe(k: int, m: int, schedule: str) -> gpipe.Pipe:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4 * k)])
    return gpipe.Pipe(
        model, balance=[4] * k, chunks=m, schedule=schedule, remat="never", devices=["cpu"] * k
    )


def transfer_cost(repeats: int, n: int) -> float:
    """Median µs of one ``send`` + ``receive`` of a one-tensor value between two workers."""
    with null_cuda(True):
        ds = streams.DeviceStreams([torch.device("cpu")] * 2)
        value = (torch.randn(2, 4),)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            for _ in range(n):
                ds.receive(ds.send(value, 0, 1), 1)
            times.append((time.perf_counter() - t) / n)
    return statistics.median(times) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    steps, repeats = (5, 2) if args.quick else (args.steps, args.repeats)
    k = args.stages
    print(f"K={k}, 4 x Linear(4, 4) per stage, 2 rows per micro-batch, medians of {repeats}")
    print()
    print(
        "| schedule | M | actions | streams off (ms) | on, null CUDA (ms) | extra per action (µs) |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for schedule in ("gpipe", "1f1b"):
        for m in (4, 16):
            x = torch.randn(2 * m, 4)
            pipes = {}
            for on in (False, True):
                with null_cuda(on):
                    pipes[on] = make_pipe(k, m, schedule)
            assert pipes[True]._runner.streams.active and not pipes[False]._runner.streams.active
            times: dict[bool, list[float]] = {False: [], True: []}
            for _ in range(repeats):
                for on in (False, True):
                    pipe = pipes[on]
                    with null_cuda(on):
                        for _ in range(2):
                            pipe.step(x, None, lambda o, _: o.sum())
                        t = time.perf_counter()
                        for _ in range(steps):
                            pipe.step(x, None, lambda o, _: o.sum())
                        times[on].append((time.perf_counter() - t) / steps)
            off, on_ = statistics.median(times[False]), statistics.median(times[True])
            n = 2 * k * m
            print(
                f"| {schedule} | {m} | {n} | {off * 1e3:.2f} | {on_ * 1e3:.2f} | "
                f"{(on_ - off) / n * 1e6:.0f} |",
                flush=True,
            )
            for p in pipes.values():
                p.close()
    n = 200 if args.quick else 5000
    print(f"\none send + receive (one tensor, null CUDA): {transfer_cost(repeats, n):.1f} µs")


if __name__ == "__main__":
    main()
