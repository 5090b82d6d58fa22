"""Test helper: launch a command on several torchrun agents, as on several machines.

``agents(n, rdzv_id, *args)`` gives the ``n`` command lines (``--nnodes n``, one process per
agent, a c10d rendezvous on a free localhost port); ``run_all`` runs them at once, bounded by
a timeout, and fails with the output of any that did not succeed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def agents(n: int, rdzv_id: str, *args: str) -> list[list[str]]:
    """The command line of each of ``n`` torchrun agents running ``args`` (``-m module ...``)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return [
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes",
            str(n),
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(rank),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            rdzv_id,
            *args,
        ]
        for rank in range(n)
    ]


def run_all(cmds: list[list[str]], timeout: float = 240) -> None:
    """Run ``cmds`` at once; each must exit 0 within ``timeout`` seconds.

    ``OMP_NUM_THREADS=1`` as torchrun sets it for several processes per agent, so a run on
    several agents uses the same kernels as one agent with several processes (bit-for-bit
    equal results)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for c in cmds
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-3000:]
