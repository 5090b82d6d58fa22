"""Many machines, stood in for by two torchrun agents on this one.

``torchrun --nnodes 2 --nproc-per-node 1`` with a c10d rendezvous on localhost starts two
agents, as two machines would; ``gpipe.examples.dist_demo`` then trains a 2-stage
``DistributedPipe`` across them. Its losses must equal the one-agent run's
(``--nproc-per-node 2``) exactly: where the processes come from changes nothing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from agents import agents, run_all

DEMO = ["-m", "gpipe.examples.dist_demo", "--steps", "3", "--batch", "8", "--seq", "32"]


@pytest.mark.slow
def test_two_torchrun_agents_train_like_one(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "torch.distributed.run"]
    one = tmp_path / "one.json"
    run_all([[*run, "--standalone", "--nproc-per-node", "2", *DEMO, "--losses", str(one)]])
    two = tmp_path / "two.json"
    run_all(agents(2, "gpipe-two-agents", *DEMO, "--losses", str(two)))
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    assert len(a) == len(b) == 3
    assert a == b  # bit for bit: same model, same cut, same batches
    assert a[-1] < a[0]  # and it trains
