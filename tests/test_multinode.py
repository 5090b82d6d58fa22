"""Many machines, stood in for by two torchrun agents on this one.

``torchrun --nnodes 2 --nproc-per-node 1`` with a c10d rendezvous on localhost starts two
agents, as two machines would; ``gpipe.examples.dist_demo`` then trains a 2-stage
``DistributedPipe`` across them. Its losses must equal the one-agent run's
(``--nproc-per-node 2``) exactly: where the processes come from changes nothing.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

DEMO = ["-m", "gpipe.examples.dist_demo", "--steps", "3", "--batch", "8", "--seq", "32"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmds: list[list[str]], timeout: float = 240) -> None:
    procs = [
        subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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


@pytest.mark.slow
def test_two_torchrun_agents_train_like_one(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "torch.distributed.run"]
    one = tmp_path / "one.json"
    _run([[*run, "--standalone", "--nproc-per-node", "2", *DEMO, "--losses", str(one)]])
    two = tmp_path / "two.json"
    port = _port()
    agents = [
        [
            *run,
            "--nnodes",
            "2",
            "--nproc-per-node",
            "1",
            "--node-rank",
            str(rank),
            "--rdzv-backend",
            "c10d",
            "--rdzv-endpoint",
            f"127.0.0.1:{port}",
            "--rdzv-id",
            "gpipe-two-agents",
            *DEMO,
            "--losses",
            str(two),
        ]
        for rank in (0, 1)
    ]
    _run(agents)
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(a) == len(b) == 3
    assert a == b  # bit for bit: same model, same cut, same batches
    assert a[-1] < a[0]  # and it trains
