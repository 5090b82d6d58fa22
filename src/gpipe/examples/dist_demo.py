"""Train the tiny Transformer LM as a 2-process pipeline over ``torch.distributed`` (gloo, CPU).

``python -m gpipe.examples.dist_demo`` relaunches itself under
``python -m torch.distributed.run --standalone --nproc-per-node 2`` when it is not already
running under a launcher (no ``RANK`` in the environment). Every rank builds the same model on
the ``meta`` device, :class:`gpipe.dist.pipe.DistributedPipe` materializes only its own
stage, and each step trains on byte windows of the Python standard library's sources; rank 0
prints the loss per step. The invariant: the printed losses are those of un-pipelined training
of the same model on the same batches (see ``tests/dist/test_dist_pipe.py``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nproc", type=int, default=2, help="processes (pipeline stages x replicas)")
    p.add_argument("--stages", type=int, default=None, help="pipeline devices (default: nproc)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--chunks", type=int, default=4, help="micro-batches per step")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument(
        "--schedule",
        default="1f1b",
        help="gpipe, 1f1b, interleaved, interleaved-zb, zb-h1, zb-h2, zb-v or dualpipe-v",
    )
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--losses", default=None, help="rank 0 writes the losses (JSON) here")
    return p.parse_args(argv)


def _relaunch(args: argparse.Namespace, argv: list[str]) -> int:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={args.nproc}",
        "-m",
        "gpipe.examples.dist_demo",
        *argv,
    ]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"})


def train(args: argparse.Namespace) -> None:
    """The per-rank training loop (run under a launcher)."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from gpipe.dist.pipe import DistributedPipe
    from gpipe.models import TransformerConfig, TransformerLM, lm_loss
    from gpipe.train.data import get_batch, load_corpus

    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank = dist.get_rank()
    config = TransformerConfig.preset("tiny", max_seq_len=args.seq, tie_embeddings=True)
    with torch.device("meta"):
        model = TransformerLM(config)
    corpus = load_corpus(max_bytes=2**20, max_val_bytes=2**16)
    with DistributedPipe(
        model,
        stages=args.stages,
        chunks=args.chunks,
        schedule=args.schedule,
        seed=0,
        timeout=120,
        sample=torch.empty(args.batch, args.seq, dtype=torch.long, device="meta"),
    ) as pipe:
        opt = torch.optim.AdamW(pipe.parameters(), lr=args.lr)
        if rank == 0:
            print(
                f"{dist.get_world_size()} ranks, {pipe.num_devices} pipeline devices x "
                f"{pipe.data_parallel} replicas, balance {pipe.balance}, "
                f"schedule {args.schedule}, {args.chunks} micro-batches",
                flush=True,
            )
        losses = []
        for step in range(args.steps):
            x, y = get_batch(corpus.train, args.batch, args.seq, seed=0, step=step)
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = pipe.step(x, y, lm_loss)
            norm = pipe.clip_grad_norm_(1.0)
            opt.step()
            losses.append(loss.item())
            if rank == 0:
                print(
                    f"step {step:3d}  loss {loss.item():.4f}  grad-norm {norm.item():.3f}  "
                    f"{(time.perf_counter() - t0) * 1e3:.0f} ms",
                    flush=True,
                )
    if rank == 0 and args.losses:
        import json

        with open(args.losses, "w") as f:
            json.dump(losses, f)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    """Entry point: relaunch under torchrun, or train when already launched."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parse(argv)
    if "RANK" not in os.environ:
        return _relaunch(args, argv)
    train(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
