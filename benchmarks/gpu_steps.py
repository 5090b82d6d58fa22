"""Training steps on a device: pipelined training over several steps equals plain training.

Where ``benchmarks/gpu_check.py`` checks one step's gradients, this checks what a training
loop sees: ``--steps`` steps (default 3) of ``pipe.step`` and an optimizer (SGD with
momentum) against the plain model trained on the whole mini-batch with the same optimizer;
each step's loss and the final parameters must agree. The sections:

* ``schedules``: every schedule, both stages on ``--device``;
* ``host``: a pipe across the host and the device (``devices=["cpu", dev]`` and the
  reverse), the caller's inputs on the host (so the device stage's inputs are pinned and
  copied on the host-to-device lane);
* ``dist``: ``DistributedPipe`` with 2 gloo ranks, both on ``--device``, in two spawned
  processes.

Under ``TORCH_CUDA_SANITIZER=1`` (CUDA's stream sanitizer, which torch enables in the thread
that imports it) each stage begins with a :class:`Sanitized` layer that enables it in the
pipe's worker thread too, so the workers' kernels and copies are checked as well.

Every case prints one markdown row as soon as it ends; ``--out DIR`` also writes the table
to ``DIR/gpu_steps.md``. A watchdog ends the process (exit 3) if a case hangs. With
``--device cpu`` the same cases run on the CPU (the dry run CI runs).

    python benchmarks/gpu_steps.py                          # on a CUDA machine
    TORCH_CUDA_SANITIZER=1 python benchmarks/gpu_steps.py --sections host --schedules 1f1b
    python benchmarks/gpu_steps.py --device cpu --quick     # dry run anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_check import SCHEDULES, balance_for, loss_fn, model, watchdog

import gpipe

ROWS, D = 16, 64
TOL = 1e-4
SANITIZER = os.environ.get("TORCH_CUDA_SANITIZER", "") not in ("", "0")


class Sanitized(nn.Module):
    """The identity, which enables CUDA's stream sanitizer in the thread it first runs in (a
    pipe's worker: the sanitizer's dispatch mode is per thread)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        me = threading.get_ident()
        if me not in self.threads:
            self.threads.add(me)
            from torch.cuda._sanitizer import enable_cuda_sanitizer

            enable_cuda_sanitizer()
        return x


def staged(schedule: str) -> tuple[nn.Sequential, list[int]]:
    """The model and its balance; under the sanitizer each stage begins with a
    :class:`Sanitized` layer (no parameters: the model computes the same)."""
    m, balance = model(), balance_for(schedule)
    if not SANITIZER:
        return m, balance
    layers, start = [], 0
    for n in balance:
        layers += [Sanitized(), *m[start : start + n]]
        start += n
    return nn.Sequential(*layers), [n + 1 for n in balance]


def batch(dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(ROWS, D, generator=g)
    return x.to(dev), torch.randint(0, 10, (ROWS,), generator=g).to(dev)


def optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)


def plain_run(dev: torch.device, steps: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The plain model trained ``steps`` steps on the whole mini-batch: losses, parameters."""
    ref = model().to(dev)
    opt = optimizer(ref.parameters())
    x, y = batch(dev)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(ref(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, [p.detach().cpu() for p in ref.parameters()]


def compare(
    losses: list[float], params: list[torch.Tensor], want: tuple[list[float], list]
) -> dict:
    """The largest relative difference of the losses and of ``params`` (in the model's
    order) from the plain run's."""
    want_losses, want_params = want
    loss_err = max(abs(a - b) / max(1.0, abs(b)) for a, b in zip(losses, want_losses))
    errs = [
        float((p.cpu() - w).abs().max() / (w.abs().max() + 1e-12))
        for p, w in zip(params, want_params, strict=True)
    ]
    err = max([loss_err, *errs])
    return {"err": err, "ok": len(losses) == len(want_losses) and bool(errs) and err <= TOL}


def pipe_run(devices: list[torch.device], schedule: str, steps: int, inputs_on: torch.device):
    """A ``gpipe.Pipe`` on ``devices`` trained ``steps`` steps: losses, parameters."""
    m, balance = staged(schedule)
    pipe = gpipe.Pipe(m, balance=balance, devices=devices, chunks=4, schedule=schedule, timeout=30)
    opt = optimizer(pipe.parameters())
    x, y = batch(inputs_on)
    losses = []
    try:
        for _ in range(steps):
            opt.zero_grad()
            losses.append(float(pipe.step(x, y, loss_fn)))
            opt.step()
        events = pipe.last_events  # the last step's device timeline, read when asked
        if not events:
            raise AssertionError("the last step left no timeline")
    finally:
        pipe.close()
    return losses, [p.detach().cpu() for p in m.parameters()]


def _dist_worker(rank: int, port: int, dev: str, steps: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    device = torch.device(dev)
    row: dict[str, Any] = {}
    try:
        pipe = gpipe.DistributedPipe(
            model(), balance=[4, 5], chunks=4, schedule="1f1b", device=device, timeout=30
        )
        x, y = batch(torch.device("cpu"))
        losses, opt = [], None
        for _ in range(steps):
            losses.append(float(pipe.step(x.to(device), y.to(device), loss_fn)))
            opt = opt or optimizer(pipe.parameters())  # parameters exist after the first step
            opt.step()
            opt.zero_grad()
        mine = dict(pipe.named_parameters())  # this rank's, named as in the full model
        want_losses, want_params = plain_run(device, steps)
        names = [k for k, _ in model().named_parameters()]
        want = (want_losses, [w for k, w in zip(names, want_params) if k in mine])
        row = compare(losses, [mine[k].detach() for k in names if k in mine], want)
        pipe.close()
    except Exception as e:
        row = {"err": float("nan"), "ok": False, "error": f"{type(e).__name__}: {e}"}
    with open(f"{out}.{rank}", "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def dist_run(dev: torch.device, steps: int, out: str) -> dict:
    """``DistributedPipe`` on 2 gloo ranks, both on ``dev``: the worse rank's comparison."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(
        _dist_worker, args=(port, str(dev), steps, out), nprocs=2, start_method="spawn"
    )
    rows = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(2)]
    bad = [r for r in rows if not r["ok"]]
    worst = bad[0] if bad else max(rows, key=lambda r: r["err"])
    return worst


def cases(dev: torch.device, sections: list[str], schedules: list[str]) -> list[tuple]:
    host = torch.device("cpu")
    out: list[tuple] = []
    if "schedules" in sections:
        out += [("schedules", s, [dev, dev], dev) for s in schedules]
    if "host" in sections:
        out += [("host", "1f1b", [host, dev], host), ("host", "1f1b", [dev, host], host)]
    if "dist" in sections:
        out.append(("dist", "1f1b", [dev, dev], dev))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--sections", default="schedules,host,dist")
    ap.add_argument("--schedules", default=",".join(SCHEDULES))
    ap.add_argument("--quick", action="store_true", help="two schedules (the CI dry run)")
    ap.add_argument("--case-limit", type=float, default=90.0, help="seconds before HANG")
    ap.add_argument("--out", default=None, help="folder for gpu_steps.md")
    ap.add_argument("--title", default="training steps")
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(f"gpu_steps: torch {torch.__version__} has no CUDA here; use --device cpu")
        return 2
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the plain model is the reference
        torch.backends.cudnn.allow_tf32 = False
    schedules = args.schedules.split(",")[: 2 if args.quick else None]
    todo = cases(dev, args.sections.split(","), schedules)
    lines = [
        f"### {args.title}: {args.steps} steps + SGD vs the plain model, torch "
        f"{torch.__version__}, {dev}{', CUDA sanitizer on' if SANITIZER else ''}",
        "",
        "| section | schedule | devices | max rel err | ok | s |",
        "| --- | --- | --- | ---: | --- | ---: |",
    ]
    sink = open(Path(args.out) / "gpu_steps.md", "a") if args.out else None  # noqa: SIM115

    def emit(line: str) -> None:
        print(line, flush=True)
        if sink is not None:
            sink.write(line + "\n")
            sink.flush()

    for line in lines:
        emit(line)
    want = plain_run(dev, args.steps)
    current = ["start"]
    done = watchdog(args.case_limit, current)
    failed = 0
    out_base = str(Path(args.out or ".") / "gpu_steps_dist")
    for section, schedule, devices, inputs_on in todo:
        current[0] = f"{section}/{schedule}/{devices}"
        t0 = time.perf_counter()
        try:
            if section == "dist":
                row = dist_run(dev, args.steps, out_base)
            else:
                row = compare(*pipe_run(devices, schedule, args.steps, inputs_on), want)
        except Exception as e:
            row = {"err": float("nan"), "ok": False, "error": f"{type(e).__name__}: {e}"}
        failed += not row["ok"]
        where = "+".join(str(d) for d in devices) + (" (2 gloo ranks)" if section == "dist" else "")
        line = (
            f"| {section} | {schedule} | {where} | {row['err']:.2e} | "
            f"{'yes' if row['ok'] else 'NO'} | {time.perf_counter() - t0:.2f} |"
            + (f" {row['error']}" if "error" in row else "")
        )
        emit(line)
    done.set()
    emit(f"\n{len(todo) - failed} passed, {failed} failed\n")
    if sink is not None:
        sink.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
