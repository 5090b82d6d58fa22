"""``gpipe train --runtime dist`` with data parallelism: 2 replicas x 2 stages (4 processes
under torchrun, gloo on loopback) train as one process does with ``chunks = D·M``.

Each replica takes half of every batch as ``M`` micro-batches whose keyed random streams are
micro-batches ``j·M …`` of the whole batch, and the replicas' gradients are averaged; so with
dropout on, the losses of the 4-process run equal those of the one-process local run with
``D·M`` micro-batches, step by step (up to float rounding of the sums' order).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gpipe.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

D, M, STEPS = 2, 2, 3
ARGS = [
    "--model-preset", "tiny", "--dropout", "0.1", "--seq-len", "16", "--batch-size", "8",
    "--eval-batches", "1", "--max-bytes", "60000", "--warmup", "1", "--eval-interval", "0",
    "--checkpoint-interval", str(STEPS), "--keep", "1", "--no-progress", "--stages", "2",
    "--steps", str(STEPS),
]  # fmt: skip


def _losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "step"}


def test_data_parallel_dist_training_equals_one_process_with_d_times_m_chunks(tmp_path: Path):
    dp, one = tmp_path / "dp", tmp_path / "one"
    cmd = [sys.executable, "-m", "gpipe.cli", "train", *ARGS, "--runtime", "dist"]
    cmd += ["--data-parallel", str(D), "--chunks", str(M), "--out", str(dp)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    local = ["train", *ARGS, "--runtime", "local", "--chunks", str(D * M), "--out", str(one)]
    assert main(local) == 0
    got, want = _losses(dp), _losses(one)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    diffs = {s: abs(got[s] - want[s]) for s in want}
    assert max(diffs.values()) < 1e-5, (got, want)
    assert len(set(want.values())) == STEPS  # the model trains: every step's loss differs
