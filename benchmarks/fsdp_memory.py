"""Per-rank bytes of parameters, gradients and optimizer state with and without
``DistributedPipe(fsdp=True)``: 2 pipeline ranks x D = 2 replicas (4 spawned gloo ranks),
an MLP trained two steps with Adam; counted between steps (a DTensor by its local shard).

With FSDP each rank holds about ``1/D`` of its stages' parameters, gradients and Adam state
(plus the row padding of uneven shards); within a step it gathers its stages' whole
parameters and gradients (not counted here).

    python benchmarks/fsdp_memory.py --width 512 --layers 8
"""

from __future__ import annotations

import argparse
import json
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

K, D = 2, 2


def _bytes(t: torch.Tensor) -> int:
    local = t.to_local() if hasattr(t, "to_local") else t
    return local.numel() * local.element_size()


def _rank(rank: int, store: str, width: int, layers: int, fsdp: bool, out: str) -> None:
    import torch.distributed as dist

    from gpipe.dist.pipe import DistributedPipe

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=K * D,
        timeout=timedelta(seconds=120),
    )  # fmt: skip
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(layers) for m in (nn.Linear(width, width), nn.Tanh())])
    with DistributedPipe(
        model, stages=K, data_parallel=D, chunks=4, fsdp=fsdp, balance=[layers, layers]
    ) as pipe:
        opt = torch.optim.Adam(pipe.parameters(), lr=1e-3)
        for s in range(2):
            g = torch.Generator().manual_seed(s)
            x = torch.randn(16, width, generator=g)
            opt.zero_grad()
            pipe.step(x, x, F.mse_loss)
            opt.step()
        params = list(pipe.parameters())
        row = {
            "rank": rank,
            "fsdp": fsdp,
            "params": sum(_bytes(p) for p in params),
            "grads": sum(_bytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(
                _bytes(t) for st in opt.state.values() for t in st.values() if t.dim() > 0
            ),
        }
    Path(out, f"{int(fsdp)}_{rank}.json").write_text(json.dumps(row))
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4, help="Linear+Tanh blocks per stage")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp()
    for fsdp in (False, True):
        store = str(Path(tmp) / f"store{int(fsdp)}")
        ctx = mp.get_context("spawn")
        procs = [
            ctx.Process(target=_rank, args=(r, store, args.width, args.layers, fsdp, tmp))
            for r in range(K * D)
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(300)
            if p.is_alive():
                p.kill()
                raise SystemExit("a rank did not finish within 300 s")
    rows = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("*_*.json"))]
    print(f"{K} pipeline ranks x D={D}, width {args.width}, {args.layers} blocks per stage")
    print("| fsdp | rank | params (B) | grads (B) | Adam state (B) | total (B) |")
    print("|---|---|---|---|---|---|")
    total = {False: 0, True: 0}
    for r in rows:
        t = r["params"] + r["grads"] + r["optimizer"]
        total[r["fsdp"]] += t
        print(
            f"| {r['fsdp']} | {r['rank']} | {r['params']} | {r['grads']} | {r['optimizer']} | {t} |"
        )
    print(f"FSDP / no FSDP, all ranks: {total[True] / total[False]:.3f}")


if __name__ == "__main__":
    main()
