"""The correctness half of the prepared GPU check: every schedule and remat mode on a device.

For each schedule x re-materialization mode x precision (fp32, and bf16 autocast),
a 2-stage ``gpipe.Pipe`` with both stages on ``--device`` (``devices=[d, d]``, timeout 30 s)
trains one step, by ``pipe.step`` and, for ``gpipe``, by ``loss_fn(pipe(x), y).backward()``;
its loss and gradients are compared with the plain model on the whole batch. Two workers on
one GPU each run on their own compute stream, so these cases also check the hand-off between
streams (events, ``record_stream``). The *wide* cases (width 2048, 8 micro-batches) make each
kernel long enough that a value read before its producer or its copy finished, or memory
reused while another stream still reads it, shows as a wrong gradient. With two or more GPUs
the wide cases also run across ``cuda:0`` and ``cuda:1`` (boundary copies on copy streams), and
``DistributedPipe`` on NCCL runs every schedule and one fault case in two spawned processes;
on one GPU those parts are skipped with a message. Then the user-path cases: a layer's own
``torch.utils.checkpoint`` around a dropout (on CUDA its recompute runs on the autograd
engine's device thread, so this is the check of ``gpipe.stage.rng_replay``'s per-device context),
an in-place ReLU right after a cut and a clipping gradient hook under zero bubble.

Every case prints one markdown row as soon as it ends, and a watchdog ends the process (exit
3) if a case hangs, so a GPU deadlock shows as the case it happened in, not as a silent
timeout.

    python benchmarks/gpu_check.py                       # on a CUDA machine
    python benchmarks/gpu_check.py --device cpu --quick  # dry run anywhere (CI runs this)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import threading
import time
from typing import Any

import torch
from torch import nn

import gpipe

SCHEDULES = [
    "gpipe",
    "1f1b",
    "interleaved",
    "interleaved-zb",
    "zb-h1",
    "zb-h2",
    "zb-v",
    "dualpipe-v",
]
REMATS = ["always", "except_last", "never"]
D = 64


def model(seed: int = 0, width: int = D) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(D, width), nn.GELU()]
    for _ in range(3):
        layers += [nn.Linear(width, width), nn.GELU()]
    return nn.Sequential(*layers, nn.Linear(width, 10))


def balance_for(schedule: str) -> list[int]:
    """The 9 layers cut for 2 devices: two stages each with two virtual stages per device."""
    from gpipe.schedules import ScheduleSpec

    return [2, 2, 2, 3] if ScheduleSpec(schedule, None).virtual_stages == 2 else [4, 5]


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(out.float(), y)


def autocast(dev: torch.device, precision: str) -> Any:
    if precision == "bf16":
        return torch.autocast(dev.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def plain_step(
    dev: torch.device, precision: str, x: torch.Tensor, y: torch.Tensor, width: int = D
) -> tuple:
    ref = model(width=width).to(dev)
    with autocast(dev, precision):
        loss = loss_fn(ref(x), y)
    loss.backward()
    return float(loss.detach()), [p.grad.float() for p in ref.parameters()]


def check(
    dev: torch.device,
    schedule: str,
    remat: str,
    precision: str,
    how: str,
    width: int = D,
    devices: list[torch.device] | None = None,
) -> dict:
    """One case: the pipe's loss and gradients against the plain model's (on ``dev``)."""
    g = torch.Generator().manual_seed(1)
    rows, chunks = (16, 4) if width == D else (64, 8)
    x = torch.randn(rows, D, generator=g).to(dev)
    y = torch.randint(0, 10, (rows,), generator=g).to(dev)
    want_loss, want = plain_step(dev, precision, x, y, width)
    m = model(width=width).to(dev)
    pipe = gpipe.Pipe(
        m,
        balance=balance_for(schedule),
        devices=devices or [dev, dev],
        chunks=chunks,
        schedule=schedule,
        remat=remat,
        timeout=30,
    )
    t0 = time.perf_counter()
    with autocast(dev, precision):
        if how == "step":
            loss = float(pipe.step(x, y, loss_fn))
        else:
            out = pipe(x)
    if how == "backward":
        lv = loss_fn(out, y.to(out.device))
        lv.backward()
        loss = float(lv.detach())
    if dev.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    got = [p.grad.float().to(dev) for p in m.parameters()]
    if len(got) != len(want):
        raise AssertionError(f"{len(got)} gradients, the plain model has {len(want)}")
    err = max(float((a - b).abs().max() / (b.abs().max() + 1e-12)) for a, b in zip(got, want))
    tol = 2e-2 if precision == "bf16" else 1e-4
    pipe.close()
    return {
        "schedule": schedule,
        "remat": remat,
        "precision": precision,
        "how": how if width == D and devices is None else f"{how}, {_where(width, devices)}",
        "loss": loss,
        "plain loss": want_loss,
        "max rel grad err": err,
        "ok": err <= tol and abs(loss - want_loss) <= tol * max(1.0, abs(want_loss)),
        "seconds": seconds,
    }


def _where(width: int, devices: list[torch.device] | None) -> str:
    on = "one device" if devices is None else "+".join(str(d) for d in devices)
    return f"width {width}, {on}"


def wide_cases(dev: torch.device, quick: bool) -> list[tuple]:
    """The wide cases: long kernels, every schedule, on one device and across two GPUs."""
    width = 256 if quick else 2048
    schedules = SCHEDULES[:2] if quick else SCHEDULES
    places: list[list[torch.device] | None] = [None]
    if dev.type == "cuda" and torch.cuda.device_count() >= 2:
        places.append([torch.device("cuda", 0), torch.device("cuda", 1)])
    cases = []
    for where in places:
        for s in schedules:
            for r in ["always", "never"]:
                cases.append((s, r, "fp32", "step", width, where))
        cases.append(("gpipe", "except_last", "fp32", "backward", width, where))
    return cases


def watchdog(limit: float, what: list[str]) -> threading.Event:
    """End the process (exit 3) if the current case runs past ``limit`` seconds."""
    done = threading.Event()

    def run() -> None:
        while not done.is_set():
            start, name = time.monotonic(), what[0]
            while what[0] == name and not done.is_set():
                if time.monotonic() - start > limit:
                    print(f"\nHANG: {name} ran past {limit:.0f}s", flush=True)
                    os._exit(3)
                time.sleep(0.2)

    threading.Thread(target=run, daemon=True).start()
    return done


def _nccl_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    rows = []
    dev = torch.device("cuda", rank)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, D, generator=g)
    y = torch.randint(0, 10, (16,), generator=g)
    want_loss, _ = plain_step(dev, "fp32", x.to(dev), y.to(dev))
    for schedule in SCHEDULES:
        pipe = gpipe.DistributedPipe(
            model(),
            balance=balance_for(schedule),
            chunks=4,
            schedule=schedule,
            timeout=30,
        )
        loss = float(pipe.step(x.to(dev), y.to(dev), loss_fn))
        rows.append({"schedule": schedule, "loss": loss, "plain loss": want_loss})
        pipe.close()
    fault = gpipe.DistributedPipe(model(), balance=[4, 5], chunks=4, schedule="1f1b", timeout=10)
    try:
        fault.step(x.to(dev), y.to(dev), lambda o, t: o.sum() * float("nan") + (1 / 0))
        rows.append({"fault": "no error raised"})
    except Exception as e:  # the failure must reach every rank, named
        rows.append({"fault": f"{type(e).__name__}: {str(e)[:120]}"})
    with open(f"{out}.{rank}", "w") as f:
        json.dump(rows, f)
    dist.destroy_process_group()


def nccl_section(out: str) -> list[str]:
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n < 2:
        return [f"DistributedPipe on NCCL: skipped ({n} GPU(s); it needs 2)"]
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_nccl_worker, args=(2, port, out), nprocs=2, start_method="spawn")
    lines = []
    for r in range(2):
        with open(f"{out}.{r}") as f:
            lines.append(f"rank {r}: {json.load(f)}")
    return lines


class _Checkpointed(nn.Module):
    """A block that checkpoints itself around a dropout (what ``gradient_checkpointing_enable``
    does); ``own=False`` is the same block without the checkpoint."""

    def __init__(self, own: bool) -> None:
        super().__init__()
        self.a, self.b, self.drop, self.own = nn.Linear(D, D), nn.Linear(D, D), nn.Dropout(0.3), own

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.b(self.drop(torch.tanh(self.a(x)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.own:
            return self.body(x)
        from torch.utils.checkpoint import checkpoint

        return checkpoint(self.body, x, use_reentrant=False)


def _user_model(case: str, twin: bool = False) -> nn.Sequential:
    torch.manual_seed(0)
    if case == "own checkpoint + dropout":
        return nn.Sequential(*[_Checkpointed(own=not twin) for _ in range(4)])
    layers: list[nn.Module] = []
    for _ in range(4):
        lin = nn.Linear(D, D)
        if case == "clipping grad hook":
            lin.weight.register_hook(lambda g: g.clamp(-1e-3, 1e-3))
        layers += [lin, nn.ReLU(inplace=True)]
    return nn.Sequential(*layers[:-1])


def user_path_rows(dev: torch.device, quick: bool) -> list[dict]:
    """The user-path cases on the device: a layer's own checkpoint around a dropout (its
    recompute runs on CUDA's autograd device thread: the per-device replay context), an
    in-place ReLU right after a cut, a clipping hook under zero bubble — each against the
    same model run plainly (for the checkpoint: without it, with the same keyed masks)."""
    rows = []
    cases = ["own checkpoint + dropout", "in-place after a cut", "clipping grad hook"]
    for case in cases:
        for schedule in ["zb-h1"] if quick else ["1f1b", "zb-h1", "zb-v"]:
            for remat in ["never", "always"]:
                t0 = time.perf_counter()
                g = torch.Generator().manual_seed(1)
                x = torch.randn(8, D, generator=g).to(dev)
                y = torch.randn(8, D, generator=g).to(dev)
                model = _user_model(case).to(dev)
                four = schedule == "zb-v"
                balance = [2, 1, 2, 2] if four and case != "own checkpoint + dropout" else None
                balance = balance or ([1] * 4 if four else [2, 2] if len(model) == 4 else [1, 6])
                row = {"case": case, "schedule": schedule, "remat": remat}
                try:
                    pipe = gpipe.Pipe(model, balance=balance, devices=[dev, dev], chunks=4,
                                      schedule=schedule, remat=remat, timeout=30)  # fmt: skip
                    try:
                        pipe.step(x, y, loss_fn)
                    finally:
                        pipe.close()
                    ref = _user_model(case, twin=True).to(dev)
                    gpipe.reference_step(ref, x, y, loss_fn, chunks=4)
                    row.update(_compared(model, ref))
                except Exception as e:
                    row.update(err=float("nan"), ok=False, error=f"{type(e).__name__}: {e}")
                row["seconds"] = time.perf_counter() - t0
                rows.append(row)
    return rows + item_mean_rows(dev, quick)


def _compared(model: nn.Module, ref: nn.Module) -> dict:
    """The largest relative gradient difference of ``model`` from ``ref``, and whether it
    is within 1e-4."""
    errs = [float((a.grad - b.grad).abs().max() / (b.grad.abs().max() + 1e-12))
            for a, b in zip(model.parameters(), ref.parameters())]  # fmt: skip
    return {"err": max(errs), "ok": max(errs) < 1e-4}


def item_mean_rows(dev: torch.device, quick: bool) -> list[dict]:
    """A cross-entropy over the targets not ignored (-100, unevenly per micro-batch) with
    ``reduction=gpipe.count_items()`` (the counts are read from targets on the device)
    against the plain model on the whole batch."""
    rows = []
    for schedule in ["1f1b"] if quick else ["gpipe", "1f1b", "zb-h1"]:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(2)
        x = torch.randn(8, D, generator=g).to(dev)
        y = torch.randint(0, 10, (8,), generator=g)
        y[:3] = -100
        y = y.to(dev)
        row = {"case": "mean over counted items", "schedule": schedule, "remat": "except_last"}
        try:
            ref = model().to(dev)
            nn.functional.cross_entropy(ref(x), y).backward()
            mine = model().to(dev)
            with gpipe.Pipe(mine, balance=[4, 5], devices=[dev, dev], chunks=4,
                            schedule=schedule, timeout=30) as pipe:  # fmt: skip
                pipe.step(x, y, nn.functional.cross_entropy, reduction=gpipe.count_items())
            row.update(_compared(mine, ref))
        except Exception as e:
            row.update(err=float("nan"), ok=False, error=f"{type(e).__name__}: {e}")
        row["seconds"] = time.perf_counter() - t0
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="fewer cases (the CI dry run)")
    ap.add_argument("--case-limit", type=float, default=60.0, help="seconds before HANG")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print(
            f"gpu_check: torch {torch.__version__} has no CUDA here (torch.version.cuda="
            f"{torch.version.cuda}); run with --device cpu for a dry run"
        )
        return 2
    precisions = ["fp32", "bf16"]
    schedules = SCHEDULES[:2] if args.quick else SCHEDULES
    remats = ["always", "never"] if args.quick else REMATS
    cases = [(s, r, p, "step") for s in schedules for r in remats for p in precisions]
    cases += [("gpipe", r, p, "backward") for r in remats for p in precisions]
    cases += wide_cases(dev, args.quick)
    print(f"device {dev}, torch {torch.__version__}, {len(cases)} cases\n")
    if dev.type != "cuda" or torch.cuda.device_count() < 2:
        print("(wide cases across two GPUs: skipped, they need 2)\n")
    print("| schedule | remat | precision | how | max rel grad err | ok | s |")
    print("| --- | --- | --- | --- | ---: | --- | ---: |")
    current = ["start"]
    done = watchdog(args.case_limit, current)
    rows, failed = [], 0
    for case in cases:
        current[0] = "/".join(str(c) for c in case)
        try:
            row = check(dev, *case)
        except Exception as e:
            how = case[3] if len(case) == 4 else f"{case[3]}, {_where(case[4], case[5])}"
            row = {"schedule": case[0], "remat": case[1], "precision": case[2], "how": how}
            row.update({"max rel grad err": float("nan"), "ok": False, "seconds": 0.0})
            row["error"] = f"{type(e).__name__}: {e}"
        failed += not row["ok"]
        rows.append(row)
        print(
            f"| {row['schedule']} | {row['remat']} | {row['precision']} | {row['how']} | "
            f"{row['max rel grad err']:.2e} | {'yes' if row['ok'] else 'NO'} | "
            f"{row['seconds']:.2f} |" + (f" {row['error']}" if "error" in row else ""),
            flush=True,
        )
    current[0] = "user path"
    print("\n| user-path case | schedule | remat | max rel grad err | ok | s |")
    print("| --- | --- | --- | ---: | --- | ---: |")
    for row in user_path_rows(dev, args.quick):
        failed += not row["ok"]
        print(
            f"| {row['case']} | {row['schedule']} | {row['remat']} | {row['err']:.2e} | "
            f"{'yes' if row['ok'] else 'NO'} | {row['seconds']:.2f} |"
            + (f" {row['error']}" if "error" in row else ""),
            flush=True,
        )
        cases.append(row)
    current[0] = "nccl"
    print()
    for line in nccl_section((args.json or "gpu_check") + ".nccl"):
        print(line, flush=True)
    done.set()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    print(f"\n{len(cases) - failed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
