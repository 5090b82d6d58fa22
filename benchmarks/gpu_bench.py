"""GPU figures for one lent GPU: pipe overhead vs the plain model, memory by remat mode.

On one GPU both stages share the device, so this measures gpipe's *overhead* (micro-batching,
threads, keyed random streams, boundary hand-off) against the plain model, not a speed-up, and
the activation memory each re-materialization mode keeps (``torch.cuda.max_memory_allocated``).

    python benchmarks/gpu_bench.py                 # on a CUDA machine (bf16 autocast)
    python benchmarks/gpu_bench.py --device cpu --quick   # smoke test anywhere
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

import gpipe
from gpipe.models import TransformerConfig, TransformerLM, lm_loss


def timed(fn: Callable[[], object], steps: int, warmup: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if args.quick:
        cfg = TransformerConfig.preset("tiny").replace(dropout=0.1)
        batch, seq, steps, warmup = 8, 32, 2, 1
    else:
        cfg = TransformerConfig(
            vocab_size=32000,
            d_model=1024,
            n_heads=16,
            d_ff=4096,
            n_layers=8,
            max_seq_len=512,
            dropout=0.1,
        )
        batch, seq, steps, warmup = 32, 512, 10, 3
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dtype = torch.bfloat16 if cuda else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(dev)
    rows = []

    torch.manual_seed(0)
    model = TransformerLM(cfg).to(dev)

    def plain() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=dtype):
            loss = lm_loss(model(x), y)
        loss.backward()

    t_plain = timed(plain, steps, warmup, sync)
    rows.append({"config": "plain", "time": t_plain})
    for remat in ("never", "except_last", "always"):
        for m in (1, 4, 8):
            pipe = gpipe.Pipe(model, stages=2, devices=[dev, dev], chunks=m, remat=remat)

            def step(pipe: gpipe.Pipe = pipe) -> None:
                model.zero_grad(set_to_none=True)
                with torch.autocast(dev.type, dtype=dtype):
                    pipe.step(x, y, lm_loss)

            if cuda:
                torch.cuda.reset_peak_memory_stats()
            t = timed(step, steps, warmup, sync)
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
            rows.append(
                {
                    "config": f"Pipe K=2 on one device, M={m}, remat={remat}",
                    "time": t,
                    "peak_mib": peak,
                }
            )
            pipe.close()
    name = torch.cuda.get_device_name(dev) if cuda else "cpu"
    print(
        f"device: {name}; {'bf16 autocast' if cuda else 'fp32'}; TransformerLM d_model "
        f"{cfg.d_model}, {cfg.n_layers} layers, batch {batch} x {seq}"
    )
    print()
    print("| configuration | step (s) | vs plain | peak allocated (MiB) |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        peak = f"{r['peak_mib']:.0f}" if "peak_mib" in r else ""
        print(f"| {r['config']} | {r['time']:.4f} | {r['time'] / t_plain:.2f}x | {peak} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
